"""Inception-v3 as FID uses it: the 2015-12-05 TensorFlow graph's network, written here in plain torch.

FID-50k is defined on the 2048-d pool features of one particular Inception-v3 (the TF graph of 2015-12-05), whose
weights torch-fidelity (`weights-inception-2015-12-05-6726825d.pth`) and pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`) ship as state dicts with the same layer names. This module builds that
network without torchvision, so a cluster with only the weights file on disk can compute standard FID. Its
differences from ImageNet's Inception-v3 are the graph's: average pools that do not count padding, and a max pool
in the last block's pooling branch. Inputs are images in [-1, 1] (gray is repeated to RGB), quantised to 8 bits as
a saved PNG would be, resized to 299 x 299 by TF1's bilinear resize (source = target index x in / out, no half-pixel
offset, as the graph and torch-fidelity do; torch's own bilinear resize shifts the image by half an input pixel) and
scaled by (x - 128) / 128. Without the real weights here, equality with torch-fidelity's features is not checked.

No weights are downloaded; `load_inception` reads a file and refuses one whose layers do not match (ImageNet heads
such as `AuxLogits` are ignored).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

INCEPTION_WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FEATURES = 2048


class BasicConv2d(nn.Module):
    """Convolution (no bias), batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # the TF graph ignores padding


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """The last blocks; `max_pool` picks the pooling branch (the graph's final block uses a max pool)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                          self.branch_pool(pool)], 1)


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TF1's `resize_bilinear` (align_corners=False, no half-pixel centres) of [B, C, H, W] to size x size: output
    index i reads input position i * in / out, interpolating linearly between its floor and the next pixel (the last
    pixel repeats at the edge)."""
    for dim in (2, 3):
        n = x.shape[dim]
        src = torch.arange(size, device=x.device, dtype=torch.float64) * (n / size)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo).to(x.dtype).reshape([size if d == dim else 1 for d in range(x.dim())])
        x = x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w
    return x


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 up to its 2048-d pool features (`fc`, the 1008-way head, is kept only so that the
    weights files load as they are). Feature-net interface: images [B, 1 or 3, H, W] in [-1, 1] -> [B, 2048]."""

    num_features = FEATURES
    batch_size = 64  # 299 x 299 activations are large
    accuracy = float("nan")

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def preprocess(x: Tensor) -> Tensor:
        """[-1, 1] gray/RGB at any size -> the graph's input: 8-bit levels, 299 x 299 (TF1 bilinear), (x - 128) / 128."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round()
        return (resize_bilinear_tf1(x, 299) - 128) / 128

    def forward(self, x: Tensor) -> Tensor:
        x = self.preprocess(x.float())
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(self, name)(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # global average pool: the 2048-d "pool3" features


def find_inception_weights(path: str | os.PathLike | None = None) -> Path | None:
    """`path` if given; else $DIFFUSION_RL_INCEPTION_WEIGHTS, else a known weights file in torch hub's checkpoint
    folder. None when nothing is on disk (nothing is downloaded)."""
    if path:
        return Path(path)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [os.environ.get("DIFFUSION_RL_INCEPTION_WEIGHTS"), *(hub / f for f in INCEPTION_WEIGHTS_FILES)]
    return next((Path(p) for p in candidates if p and os.path.isfile(p)), None)


def load_inception(path: str | os.PathLike) -> InceptionV3FID:
    """The FID Inception-v3 with the weights in `path` (a state dict), in eval mode. ConfigError for a missing,
    unreadable or mismatched file, naming it and the first differing layers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Inception weights file {str(path)!r} does not exist; accepted: a state dict of the FID "
                          f"Inception-v3 ({' or '.join(INCEPTION_WEIGHTS_FILES)})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"Inception weights file {str(path)!r} cannot be read as a torch state dict ({e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"Inception weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.") and not k.endswith("num_batches_tracked")}
    net = InceptionV3FID()
    own = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        what = "; ".join(f"{name}: {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
                         (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys)
        raise ConfigError(f"Inception weights file {str(path)!r} does not match the FID Inception-v3 ({what})")
    net.load_state_dict(state, strict=False)  # the BN counters were dropped above
    return net.eval().requires_grad_(False)
