"""LPIPS as a consistency distance, from a weights file the user brings (method.md §10.4).

The consistency-model release measures its consistency loss with LPIPS (VGG features with learned linear heads),
images resized to 224 x 224 (bilinear) when smaller than 256 and mapped from [-1, 1] to [0, 1]. Its weights cannot
be fetched here, so the library's default is l2 and every record names the distance it used. A user with LPIPS
weights saves the metric as a TorchScript module taking two [B, 3, H, W] batches in [0, 1] and returning one
distance per sample ([B] or [B, 1, 1, 1]), e.g. `torch.jit.script(lpips.LPIPS(net="vgg")).save("lpips.pt")` (or a
`torch.export` program saved as .pt2), and passes `--ct-distance lpips:lpips.pt`. The module is frozen (and in eval mode where it has one); gradients flow
through it to the online network's output. It loads when training starts (a missing file is refused before any
work); sampling from a checkpoint trained with it never needs the file.
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
        self.path = str(path)
        self._net = None  # loaded by `load` (training checks it before any work) or on the first call

    def __deepcopy__(self, memo: dict) -> "LPIPSDistance":
        return self  # a frozen metric: the EMA and target copies of a denoiser share it

    def load(self) -> "LPIPSDistance":
        """Load the module now (ConfigError naming the file when it is missing or not a module). Training calls
        it before any work; a checkpoint only sampled from never needs the file."""
        if self._net is not None:
            return self
        path = Path(self.path)
        if not path.is_file():
            raise ConfigError(f"LPIPS weights {str(path)!r} do not exist; accepted: a TorchScript LPIPS module file "
                              f"(see diffusion_rl/lpips.py), or --ct-distance l2 / pseudo_huber")
        try:
            if path.suffix == ".pt2":  # a torch.export program
                net = torch.export.load(str(path)).module()
            else:
                with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, still loads
                    warnings.simplefilter("ignore", DeprecationWarning)
                    net = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"LPIPS weights {str(path)!r} are neither a TorchScript module nor a torch.export "
                              f"program (.pt2): {e}") from None
        try:
            net.eval()
        except (NotImplementedError, RuntimeError):  # an exported program's module has no train/eval switch
            pass
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = net
        return self

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ConfigError(f"LPIPS needs image batches [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] < 256:
            x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
        return (x + 1) / 2

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        net = self._net = self.load()._net.to(a.device)
        out = net(self._prepare(a.float()), self._prepare(b.float()))
        return out.reshape(a.shape[0], -1).mean(1).to(a.dtype)
