"""Fused token losses for training code: per-row cross-entropy and the KL preservation
divergence, forward and gradient in one pass over the logits (or, fused with the output layer,
without the logits at all). Triton on CUDA tensors; a CPU backend otherwise."""

from sku_fast.ops.fused_linear import FusedLinearTokenLoss, fused_linear_token_loss
from sku_fast.ops.token_loss import TokenLoss, cross_entropy, kl_div, token_loss

__all__ = [
    "FusedLinearTokenLoss",
    "TokenLoss",
    "cross_entropy",
    "fused_linear_token_loss",
    "kl_div",
    "token_loss",
]
