"""Baselines: plain denoising score matching in any formulation (EDM loss, DDPM eps loss, ...)."""
from __future__ import annotations

from tensordict import TensorDict, TensorDictBase

from diffusion_rl.training import Learner

__all__ = ["DiffusionBaseline"]


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
        return self.env.reset_training(self.config.batch_size).to(self.device)

    def loss(self, batch: TensorDictBase) -> TensorDict:
        denoised = self.denoiser(batch["x"], batch["level"], self.labels_for_net(batch["label"]))
        loss_base = self.formulation.base_loss(denoised, batch["x0"], batch["level"])
        return TensorDict({"loss_base": loss_base.mean(), "sample_base": loss_base.detach()}, batch_size=[])
