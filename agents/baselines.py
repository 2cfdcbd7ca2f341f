"""Baselines: plain denoising score matching in any formulation (EDM loss, DDPM eps loss, ...), and consistency
training (CT, improved CT) for the consistency formulations."""
from __future__ import annotations

from tensordict import TensorDict, TensorDictBase

from diffusion_rl.errors import ConfigError
from diffusion_rl.training import Learner

from .td_evaluator import TDEvaluator

__all__ = ["DiffusionBaseline", "ConsistencyBaseline"]


class DiffusionBaseline(Learner):
    """The formulation's own loss: w(level) * mean_pixels (D(x_level) - x0)^2 at its training levels.

    With the EDM formulation this is EDM's loss (log-normal sigma, w = 1/c_out^2); with VP it is DDPM's eps loss.
    Its batches are the env's training resets (`env.reset_training`), the very start states of the TD agent's
    batches: with one env seed the baseline and the TD agent draw identical x0 and levels at every step.

    Args: as for `diffusion_rl.training.Learner` (env, denoiser, config, out_dir, device).
    """

    def __init__(self, env, **kwargs) -> None:
        super().__init__(env, **kwargs)
        self.method = f"{self.formulation.name}-baseline"

    def collect(self) -> TensorDictBase:
        return self.env.reset_training(self.local_batch).to(self.device)

    def loss(self, batch: TensorDictBase) -> TensorDict:
        denoised = self.denoiser(batch["x"], batch["level"], self.labels_for_net(batch["label"]))
        loss_base = self.formulation.base_loss(denoised, batch["x0"], batch["level"])
        return TensorDict({"loss_base": loss_base.mean(), "sample_base": loss_base.detach()}, batch_size=[])


class ConsistencyBaseline(TDEvaluator):
    """Consistency training without the TD term (method.md §10): the formulation's consistency loss
    w(t) d(f_theta(x_t, t), f-(x_t2, t2)) on every pair of the env's `sample_pairs` (stride 1, shared noise), each
    sample weighing 1.

    It is the TD-CT agent configured, not rewritten: `td_term=False` and uniform base weights, so the pairs, the
    target network, its schedule and its dropout semantics (§10.3) are TD-CT's own: the control that makes a CT vs
    TD-CT comparison fair. Improved CT's stop-gradient teacher is `tau=0` (the target then equals the online network
    of the previous step, i.e. the current one under no-grad). Args: as for `TDEvaluator` (the TD settings
    estimator, reweighting and base_lambda do not apply).
    """

    def __init__(self, env, **kwargs) -> None:
        if not getattr(getattr(env, "formulation", None), "consistency", False):
            raise ConfigError(f"ConsistencyBaseline needs a consistency formulation (ct, ict), got "
                              f"{getattr(getattr(env, 'formulation', None), 'name', env)!r}; use DiffusionBaseline")
        super().__init__(env, td_term=False, base_weights="uniform", **kwargs)
        self.method = f"{self.formulation.name}-baseline"

    def method_config(self) -> dict:
        mc = super().method_config()
        keys = ("target_update", "tau", "hard_period", "target_halflife_images", "target_rampup", "stride", "one_step",
                "coupling", "ct_target", "tau_schedule")
        return {k: mc[k] for k in keys if k in mc}
