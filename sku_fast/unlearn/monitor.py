"""Watching stage 1 for the runaway of a diverging preservation term.

SKU as published maximises KL(h_θo ‖ h_θ) on normal data, and −KL is unbounded below: after a
few hundred steps it can own the objective, the KL climbing to hundreds of nats per token while
the harmful model stops modelling even the harmful answers (gd rising). The monitor follows
smoothed values of both and says so, once per doubling of the KL, so that the progress bar and
the log carry the warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING = 0.1  # weight of the newest step in the running averages


@dataclass
class RunawayMonitor:
    """`check(step, record)` returns a warning when the smoothed KL of the "pd" term is above
    `bound` nats per token while the smoothed "gd" term has risen `rise` (relative) above
    its lowest value so far."""

    bound: float = 1.0
    rise: float = 0.1
    _kl: float | None = None
    _gd: float | None = None
    _lowest_gd: float = math.inf
    _warned_at: float = 0.0

    def check(self, step: int, record: dict[str, float]) -> str | None:
        kl, gd = record.get("pd"), record.get("gd")
        if kl is None:
            return None
        self._kl = kl if self._kl is None else (1 - SMOOTHING) * self._kl + SMOOTHING * kl
        if gd is not None:
            self._gd = gd if self._gd is None else (1 - SMOOTHING) * self._gd + SMOOTHING * gd
            self._lowest_gd = min(self._lowest_gd, self._gd)
        rising = self._gd is None or self._gd > self._lowest_gd * (1 + self.rise)
        if self._kl <= self.bound or self._kl < 2 * self._warned_at or not rising:
            return None
        self._warned_at = self._kl
        detail = (
            ""
            if self._gd is None
            else (f" while gd rose from {self._lowest_gd:.3g} to {self._gd:.3g}")
        )
        return (
            f"step {step}: the preservation KL is {self._kl:.3g} nats per token{detail}: the "
            "diverging term is running away (cap it with --kl-cap, lower ε3, or stop earlier)"
        )
