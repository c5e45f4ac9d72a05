"""The runaway monitor: quiet while the KL is small or gd keeps falling, one warning per
doubling of the KL once gd rises."""

from sku_fast.unlearn.monitor import RunawayMonitor


def _feed(monitor, records):
    return [monitor.check(step, r) for step, r in enumerate(records, start=1)]


def test_quiet_while_the_kl_is_small_or_gd_falls():
    monitor = RunawayMonitor(bound=1.0)
    small = [{"pd": 0.5, "gd": 3.0}] * 50
    assert _feed(monitor, small) == [None] * 50
    growing_but_learning = [{"pd": 2.0 + i, "gd": 3.0 - 0.01 * i} for i in range(50)]
    assert _feed(RunawayMonitor(), growing_but_learning) == [None] * 50


def test_warns_once_per_doubling_when_gd_rises():
    records = [
        {"pd": 0.1 * 1.1**i, "gd": 2.0 if i < 20 else 2.0 + 0.2 * (i - 20)} for i in range(80)
    ]
    warnings = [w for w in _feed(RunawayMonitor(), records) if w]
    assert 2 <= len(warnings) <= 8
    assert warnings[0].startswith("step ") and "gd rose from 2 to" in warnings[0]
    values = [float(w.split("KL is ")[1].split(" ")[0]) for w in warnings]
    assert all(b >= 2 * a for a, b in zip(values, values[1:], strict=False))
