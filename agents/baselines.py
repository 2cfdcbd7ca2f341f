"""Baselines: plain denoising score matching in any formulation (EDM loss, DDPM eps loss, ...)."""
from __future__ import annotations

from pathlib import Path

import torch
from tensordict import TensorDict

from diffusion_rl.training import Learner, TrainConfig
from diffusion_rl.networks import Denoiser

__all__ = ["DiffusionBaseline"]


class DiffusionBaseline(Learner):
    """The formulation's own loss: w(level) * mean_pixels (D(x_level) - x0)^2 at its training levels.

    With the EDM formulation this is EDM's loss (log-normal sigma, w = 1/c_out^2); with VP it is DDPM's eps loss.
    """

    def __init__(self, denoiser: Denoiser, dataset, config: TrainConfig | None = None,
                 out_dir: str | Path | None = None, device: str | torch.device = "auto") -> None:
        super().__init__(denoiser, dataset, config, out_dir, device)
        self.method = f"{self.formulation.name}-baseline"

    def collect(self) -> TensorDict:
        x0, labels = self.draw_data()
        n = x0.shape[0]
        level = self.formulation.sample_training_level(n, self.generator, self.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        x = self.formulation.add_noise(x0, level, noise)
        return TensorDict({"x0": x0, "label": labels, "x": x, "level": level}, batch_size=[n])

    def loss(self, batch: TensorDict) -> TensorDict:
        denoised = self.denoiser(batch["x"], batch["level"], self.labels_for_net(batch["label"]))
        loss_base = self.formulation.base_loss(denoised, batch["x0"], batch["level"])
        return TensorDict({"loss_base": loss_base, "loss": loss_base.mean()}, batch_size=[])
