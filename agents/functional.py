"""The TD loss's maths as pure functions on tensors (method.md §5, §6, §10): no modules, no TensorDicts.

`TDLoss` (agents/td_loss.py) is a thin TorchRL wrapper around these, as TorchRL keeps its value functionals
apart from its estimator classes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import mean_pixels  # re-exported: the per-sample mean of method.md §5.3

__all__ = ["REWEIGHTINGS", "td_weight", "mean_pixels", "combine_losses", "split_objective", "chain_mask"]

REWEIGHTINGS: tuple[str, ...] = ("edm", "pairwise", "linear", "none")


def td_weight(reweighting: str, A_t: Tensor, A_next: Tensor, c_out_t: Tensor) -> Tensor:
    """Per-sample weight w_td of the TD term (method.md §6).

    "edm":      1 / max(A_t^2 c_out(level_t)^2, 1e-8) with the formulation's own preconditioning c_out (EDM: equals
                w_edm / A_t^2; VP: c_out^2 = (1 - abar)/abar, so it equals the eps-loss weight / A_t^2);
    "pairwise": 1 / max(A_t^2 + A_t'^2, 0.01);   "linear": 1 / max(A_t + A_t', 0.01);   "none": 1.
    """
    if reweighting == "edm":
        return 1.0 / (A_t.pow(2) * c_out_t.pow(2)).clamp(min=1e-8)
    if reweighting == "pairwise":
        return 1.0 / (A_t.pow(2) + A_next.pow(2)).clamp(min=0.01)
    if reweighting == "linear":
        return 1.0 / (A_t + A_next).clamp(min=0.01)
    if reweighting == "none":
        return torch.ones_like(A_t)
    raise ConfigError(f"unknown reweighting {reweighting!r}; accepted: {', '.join(REWEIGHTINGS)}")


def _terms(loss_td: Tensor, loss_base: Tensor, valid: Tensor, base_lambda: float) -> tuple[Tensor, Tensor]:
    """Per-sample (TD, base) parts of method.md §5.5: valid -> (td, lambda base); invalid -> (0, (1 + lambda) base)."""
    base_w = torch.where(valid, torch.full_like(loss_base, base_lambda), torch.full_like(loss_base, 1.0 + base_lambda))
    return torch.where(valid, loss_td, torch.zeros_like(loss_td)), base_w * loss_base


def combine_losses(loss_td: Tensor, loss_base: Tensor, valid: Tensor, base_lambda: float) -> Tensor:
    """Per-sample loss of method.md §5.5: valid -> td + lambda * base; invalid -> (1 + lambda) * base."""
    td, base = _terms(loss_td, loss_base, valid, base_lambda)
    return td + base


def split_objective(loss_td: Tensor, loss_base: Tensor, valid: Tensor, base_lambda: float) -> tuple[Tensor, Tensor]:
    """The batch mean of `combine_losses` as two scalar terms (TD, base) whose sum is the objective:

        TD term   = mean_i [valid_i] td_i
        base term = mean_i (lambda if valid_i else 1 + lambda) base_i
    """
    td, base = _terms(loss_td, loss_base, valid, base_lambda)
    return td.mean(), base.mean()


def chain_mask(valid: Tensor, done: Tensor) -> Tensor:
    """used[b, j]: transition j of chain b belongs to the chain that starts at row 0 and is TD-valid.

    A chain [B, T] ends at its first TD-invalid transition or after its first "done" (a new episode follows):
    used[:, j] = valid[:, 0..j] all true and done[:, 0..j-1] all false (method.md §2, §7).
    """
    ok = valid.clone()
    ok[:, 1:] &= ~done[:, :-1]
    return ok.cumprod(dim=1).bool()
