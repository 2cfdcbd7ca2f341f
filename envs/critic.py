"""The critic of the diffusion MRP: the state value is the model's one-step posterior mean (method.md §2-§4).

V_theta(s) = mu_theta(x, level) = A D_theta(x; level) + kappa x, with (A, kappa) the formulation's one-step
posterior coefficients `one_step` index units ahead under the coupling, and D_theta the x0-predicting denoiser.
The critic reads only the observable state ("x", "level", "label"); the clean sample "x0" is reward-only
information and `make_critic` refuses to read it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict.nn import TensorDictModule
from torch import Tensor, nn

from diffusion_rl.errors import ConfigError, check_positive
from diffusion_rl.formulations import Formulation, make_formulation, parse_coupling
from diffusion_rl.networks import Denoiser

__all__ = ["ValueNet", "make_critic", "check_critic_keys", "CRITIC_IN_KEYS", "CRITIC_OUT_KEYS"]

CRITIC_IN_KEYS: tuple[str, ...] = ("x", "level", "label")
CRITIC_OUT_KEYS: tuple[str, ...] = ("denoised", "state_value")


class ValueNet(nn.Module):
    """(x, level, label) -> (denoised D(x), state value A D(x) + kappa x).

    Args:
        denoiser: the x0-predicting `Denoiser`.
        formulation: the formulation giving (A, kappa); defaults to the denoiser's.
        one_step: delta in index units (default: the formulation's `default_one_step`).
        coupling: "markov", "shared" or "mixed:M" (method.md §8); must match the env's for the TD errors to make sense (None: the
            formulation's `default_coupling`).

    Inputs may carry any batch dims [*B] (level [*B], x [*B, *F], label [*B]); they are flattened for the network.
    Labels reach the network only when it is class-conditional (`denoiser.conditional`).
    """

    def __init__(self, denoiser: Denoiser, formulation: Formulation | str | None = None,
                 one_step: float | None = None, coupling: str | None = None) -> None:
        super().__init__()
        if coupling is not None:
            parse_coupling(coupling)  # markov | shared | mixed:M
        form = getattr(denoiser, "formulation", None) if formulation is None else make_formulation(formulation)
        if form is None:
            raise ConfigError("ValueNet needs a formulation: the denoiser has none and none was given")
        one_step = form.default_one_step if one_step is None else one_step
        check_positive("one_step", one_step, integer=False)
        last = getattr(form, "max_steps", form.steps) - 1  # a schedule's final grid
        if one_step > last:
            raise ConfigError(f"one_step must be in (0, {last}] index units, got {one_step}")
        self.denoiser = denoiser
        self.formulation = form
        self.one_step = float(one_step)
        self.coupling = coupling or form.default_coupling

    @property
    def conditional(self) -> bool:
        return self.denoiser.conditional

    def forward(self, x: Tensor, level: Tensor, label: Tensor | None = None) -> tuple[Tensor, Tensor]:
        level = torch.as_tensor(level, device=x.device)
        batch = level.shape
        n = batch.numel()
        feat = x.shape[len(batch):]
        xf = x.reshape(n, *feat)
        lf = level.reshape(n).to(x.dtype)
        labels = label.reshape(n) if (self.conditional and label is not None) else None
        denoised = self.denoiser(xf, lf, labels)
        value = self.formulation.one_step_mean(denoised, xf, lf, self.one_step, self.coupling)
        return denoised.reshape(*batch, *feat), value.reshape(*batch, *feat)


def check_critic_keys(in_keys: Sequence) -> None:
    """Raise ConfigError if a critic's in_keys would read the clean sample "x0" (nested keys included)."""
    for key in in_keys:
        leaf = key[-1] if isinstance(key, tuple) else key
        if leaf == "x0":
            raise ConfigError(f"the critic must not read the clean sample: in_keys {list(in_keys)} include "
                              f"{key!r}; accepted: observable state keys such as {list(CRITIC_IN_KEYS)}")


def make_critic(denoiser: Denoiser, formulation: Formulation | str | None = None, one_step: float | None = None,
                coupling: str | None = None, in_keys: Sequence = CRITIC_IN_KEYS,
                out_keys: Sequence = CRITIC_OUT_KEYS) -> TensorDictModule:
    """A TensorDictModule reading ("x", "level", "label") and writing ("denoised", "state_value").

    Raises ConfigError if `in_keys` would read the clean sample "x0" (the critic must never see it), or if the
    keys are not one value key, one level key and an optional label key.
    """
    in_keys, out_keys = list(in_keys), list(out_keys)
    check_critic_keys(in_keys)
    if len(in_keys) not in (2, 3):
        raise ConfigError(f"in_keys must name (x, level[, label]), got {in_keys}")
    if len(out_keys) != 2:
        raise ConfigError(f"out_keys must name (denoised, state_value), got {out_keys}")
    module = ValueNet(denoiser, formulation, one_step, coupling)
    return TensorDictModule(module, in_keys=in_keys, out_keys=out_keys)
