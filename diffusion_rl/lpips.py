"""LPIPS as a consistency distance, from a weights file the user brings (method.md §10.3).

The consistency-model release measures its consistency loss with LPIPS (VGG features with learned linear heads),
images resized to 224 x 224 (bilinear) when smaller than 256 and mapped from [-1, 1] to [0, 1]. Its weights cannot
be fetched here, so the library's default is l2 and every record names the distance it used. A user with LPIPS
weights saves the metric as a TorchScript module taking two [B, 3, H, W] batches in [0, 1] and returning one
distance per sample ([B] or [B, 1, 1, 1]), e.g. `torch.jit.script(lpips.LPIPS(net="vgg")).save("lpips.pt")` (or a
`torch.export` program saved as .pt2), and passes `--ct-distance lpips:lpips.pt`. The module is frozen and kept in eval mode; gradients flow through it to the
online network's output.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

__all__ = ["LPIPSDistance"]


class LPIPSDistance:
    """Per-sample LPIPS(a, b) with the release's input handling: grey images repeated to 3 channels, sides below 256
    resized to 224 (bilinear), values mapped from [-1, 1] to [0, 1]."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"LPIPS weights {str(path)!r} do not exist; accepted: a TorchScript LPIPS module file "
                              f"(see diffusion_rl/lpips.py), or --ct-distance l2 / pseudo_huber")
        try:
            if path.suffix == ".pt2":  # a torch.export program
                self.net = torch.export.load(str(path)).module()
            else:
                with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, still loads
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"LPIPS weights {str(path)!r} are neither a TorchScript module nor a torch.export "
                              f"program (.pt2): {e}") from None
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.path = str(path)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ConfigError(f"LPIPS needs image batches [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] < 256:
            x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
        return (x + 1) / 2

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        net = self.net.to(a.device)
        self.net = net
        out = net(self._prepare(a.float()), self._prepare(b.float()))
        return out.reshape(a.shape[0], -1).mean(1).to(a.dtype)
