"""Raw networks and the preconditioned denoiser (EDM's split).

A raw network F(x_in, c_noise, labels) knows nothing of noise schedules. `Denoiser` wraps it with a formulation's
preconditioning, D(x; level) = c_skip x + c_out F(c_in x, c_noise), so D always predicts x0.
"""
from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, check_choice, check_positive
from .formulations import Formulation, expand_as_image
from .limits import check_limit

__all__ = ["FourierEmbedding", "UNet", "MLP", "Denoiser", "build_network", "network_from_config", "checked_size",
           "check_dropout", "unet_parameters", "mlp_parameters"]


class FourierEmbedding(nn.Module):
    """Random Fourier features of the scalar noise conditioning c_noise (as in EDM's NCSN++)."""

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        arg = c_noise.float()[:, None] * self.freqs[None, :] * (2 * math.pi)
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class _NoiseLabelEmbedding(nn.Module):
    """Noise embedding plus an optional class embedding, mapped to `dim` features."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fourier = FourierEmbedding(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes, dim) if num_classes > 0 else None

    def forward(self, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        emb = self.fourier(c_noise)
        if self.label is not None and labels is not None:
            emb = emb + self.label(labels.long())
        return self.mlp(emb)


class _SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (PyTorch's fused SDPA), residual, output zeroed."""

    def __init__(self, channels: int, head_dim: int = 64) -> None:
        super().__init__()
        self.heads = max(channels // head_dim, 1)
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c / heads]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, attention: bool = False,
                 skip_scale: float = 1.0) -> None:
        super().__init__()
        self.attn = _SelfAttention(cout) if attention else None
        self.skip_scale = skip_scale
        self.norm1 = nn.GroupNorm(math.gcd(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(math.gcd(8, cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = (self.skip(x) + h) * self.skip_scale
        return h if self.attn is None else self.attn(h)


_Block = tuple[int, int, bool]  # a residual block's (input channels, output channels, self-attention after it)


def _unet_layout(resolution: int, width: int, depth: int, channel_mult: Sequence[int],
                 attn_resolutions: Sequence[int]) -> tuple[list[_Block | None], list[_Block], list[_Block | None], int]:
    """The UNet's blocks in build order: (down, mid, up, channels of the last block); None stands for a resampling
    layer (AvgPool2d down, Upsample up). Plain integers: it allocates nothing."""
    down: list[_Block | None] = []
    skips, c = [width], width
    attn = lambda level: resolution // 2 ** level in attn_resolutions  # noqa: E731
    for level, mult in enumerate(channel_mult):
        for _ in range(depth):
            down.append((c, width * mult, attn(level)))
            c = width * mult
            skips.append(c)
        if level < len(channel_mult) - 1:
            down.append(None)
            skips.append(c)
    mid = [(c, c, bool(attn_resolutions)), (c, c, False)]
    up: list[_Block | None] = []
    for level, mult in reversed(list(enumerate(channel_mult))):
        for _ in range(depth + 1):
            up.append((c + skips.pop(), width * mult, attn(level)))
            c = width * mult
        if level > 0:
            up.append(None)
    return down, mid, up, c


def _embedding_parameters(dim: int, num_classes: int) -> int:
    classes = num_classes * dim if num_classes > 0 else 0  # the class embedding, when there is one
    return 2 * (dim * dim + dim) + classes  # _NoiseLabelEmbedding: two Linear(dim, dim)


def _block_parameters(cin: int, cout: int, emb_dim: int, attention: bool) -> int:
    n = 2 * cin + 9 * cin * cout + cout + emb_dim * cout + cout + 2 * cout + 9 * cout * cout + cout  # _ResBlock
    n += cin * cout + cout if cin != cout else 0  # the 1x1 skip convolution
    return n + (4 * cout * cout + 6 * cout if attention else 0)  # _SelfAttention: norm, qkv, proj


def unet_parameters(resolution: int, channels: int = 1, width: int = 32, depth: int = 1,
                    channel_mult: Sequence[int] = (1, 2), num_classes: int = 0,
                    attn_resolutions: Sequence[int] = ()) -> int:
    """The parameter count of `UNet(...)` with these settings, by arithmetic on Python integers (no allocation,
    no overflow, however large the width)."""
    down, mid, up, c = _unet_layout(resolution, width, depth, channel_mult, attn_resolutions)
    emb_dim = 4 * width
    n = _embedding_parameters(emb_dim, num_classes) + 9 * channels * width + width  # embedding, conv_in
    n += sum(_block_parameters(b[0], b[1], emb_dim, b[2]) for b in (*down, *mid, *up) if b is not None)
    return n + 2 * c + 9 * c * channels + channels  # norm_out, conv_out


def mlp_parameters(dim: int = 2, width: int = 128, depth: int = 3, num_classes: int = 0) -> int:
    """The parameter count of `MLP(...)` with these settings, by arithmetic (no allocation)."""
    block = 2 * width + 2 * (width * width + width)  # LayerNorm, two Linear(width, width)
    return _embedding_parameters(width, num_classes) + (dim * width + width) + depth * block + (width * dim + dim)


def _check_size(width: int, depth: int, num_classes: int, count: Callable[[], int]) -> None:
    """The limits a network's settings must meet before any layer is allocated: depth, classes, parameters."""
    check_limit("depth", depth, "depth")
    if num_classes > 0:
        check_limit("num_classes", num_classes, "classes")
    check_limit(f"network parameters (width {width:,}, depth {depth:,})", count(), "parameters")


class UNet(nn.Module):
    """A small UNet for gray or RGB images.

    Args:
        resolution: image side (square images); must be divisible by 2^(len(channel_mult) - 1).
        channels: 1 (gray) or 3 (RGB).
        width: base channel count; level l has width * channel_mult[l] channels.
        depth: residual blocks per level.
        num_classes: > 0 adds a class embedding (class-conditional); 0 is unconditional.
        dropout: dropout rate inside residual blocks.
        attn_resolutions: feature-map sides after whose residual blocks a self-attention layer follows (e.g. (16,)
            for 32x32 data, as DDPM++); the middle blocks then attend too.
        skip_scale: residual outputs are multiplied by it (1 / sqrt(2) in DDPM++).
    """

    def __init__(self, resolution: int, channels: int = 1, width: int = 32, depth: int = 1,
                 channel_mult: Sequence[int] = (1, 2), num_classes: int = 0, dropout: float = 0.0,
                 attn_resolutions: Sequence[int] = (), skip_scale: float = 1.0) -> None:
        super().__init__()
        for what, v in (("resolution", resolution), ("channels", channels), ("width", width), ("depth", depth)):
            check_positive(what, v)
        factor = 2 ** (len(channel_mult) - 1)
        if resolution % factor:
            raise ConfigError(f"resolution {resolution} is not divisible by {factor} (channel_mult={tuple(channel_mult)})")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        sides = {resolution // 2 ** level for level in range(len(channel_mult))}
        bad = [r for r in attn_resolutions if r not in sides]
        if bad:
            raise ConfigError(f"attention resolutions {bad} are not feature-map sides of this UNet; accepted: "
                              f"{sorted(sides, reverse=True)}")
        check_positive("skip_scale", skip_scale, integer=False)
        if not all(isinstance(m, numbers.Integral) and not isinstance(m, bool) and m > 0 for m in channel_mult):
            raise ConfigError(f"channel_mult must be positive integers, got {tuple(channel_mult)}")
        _check_size(width, depth, num_classes, lambda: unet_parameters(resolution, channels, width, depth,
                                                                       channel_mult, num_classes, attn_resolutions))
        self.config = {"kind": "unet", "resolution": resolution, "channels": channels, "width": width,
                       "depth": depth, "channel_mult": list(channel_mult), "num_classes": num_classes,
                       "dropout": dropout, "attn_resolutions": list(attn_resolutions), "skip_scale": skip_scale}
        emb_dim = 4 * width
        self.embed = _NoiseLabelEmbedding(emb_dim, num_classes)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        down, mid, up, c = _unet_layout(resolution, width, depth, channel_mult, attn_resolutions)
        block = lambda b: _ResBlock(b[0], b[1], emb_dim, dropout, b[2], skip_scale)  # noqa: E731
        self.down = nn.ModuleList(nn.AvgPool2d(2) if b is None else block(b) for b in down)
        self.mid = nn.ModuleList(block(b) for b in mid)
        self.up = nn.ModuleList(nn.Upsample(scale_factor=2, mode="nearest") if b is None else block(b) for b in up)
        self.norm_out = nn.GroupNorm(math.gcd(8, c), c)
        self.conv_out = nn.Conv2d(c, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.resolution, self.resolution)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.embed(c_noise, labels)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _ResBlock) else block(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, _ResBlock):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLP(nn.Module):
    """A residual MLP for low-dimensional data (the 2-D toys)."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, num_classes: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("width", width)
        check_positive("depth", depth)
        _check_size(width, depth, num_classes, lambda: mlp_parameters(dim, width, depth, num_classes))
        self.dim, self.num_classes = dim, num_classes
        self.config = {"kind": "mlp", "dim": dim, "width": width, "depth": depth, "num_classes": num_classes,
                       "dropout": dropout}
        self.embed = _NoiseLabelEmbedding(width, num_classes)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Dropout(dropout),
                          nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        h = self.inp(x) + self.embed(c_noise, labels)
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.silu(h))


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()
_DDP: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


class Denoiser(nn.Module):
    """x0-predicting denoiser D(x; level) = c_skip x + c_out F(c_in x, c_noise) (EDM preconditioning).

    The raw network runs in its own dtype (float32), under autocast when `precision` is "bf16" or "fp16"; the
    preconditioning, the skip connection and the output keep the dtype of x, so the TD maths stays float32 (and
    float64 sampling float64) outside the network. `set_speed` picks the precision, torch.compile of the raw
    network and channels_last; a deep copy keeps the precision, not the compiled graph (compile the copy itself).
    """

    precision: str = "fp32"

    def __init__(self, net: nn.Module, formulation: Formulation) -> None:
        super().__init__()
        self.net = net
        self.formulation = formulation

    def set_speed(self, precision: str = "fp32", compile: bool = False, channels_last: bool = False) -> "Denoiser":
        """Autocast precision of the raw network ("fp32" | "bf16" | "fp16"), torch.compile of it, channels_last
        memory format for image networks. The state dict is unchanged (checkpoints stay portable)."""
        check_choice("precision", precision, tuple(PRECISIONS))
        self.precision = precision
        self.channels_last = bool(channels_last) and len(self.sample_shape) == 3
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            _COMPILED[self] = torch.compile(_DDP.get(self, self.net))  # DDP first, then compile (PyTorch's order)
        else:
            _COMPILED.pop(self, None)
        return self

    def wrap_ddp(self, device_ids: list[int] | None = None) -> "Denoiser":
        """Send this denoiser's raw-network forward through DistributedDataParallel (gradients averaged over ranks;
        parameters broadcast from rank 0 now). Deep copies (target, EMA) stay plain. The state dict is unchanged."""
        from torch.nn.parallel import DistributedDataParallel

        _DDP[self] = DistributedDataParallel(self.net, device_ids=device_ids)
        return self

    def unwrap_ddp(self) -> "Denoiser":
        """Drop the DDP wrapper (and a compiled graph built on it). Call it while the process group still exists:
        a DDP wrapper freed after `destroy_process_group` can hang the process on exit."""
        if _DDP.pop(self, None) is not None:
            _COMPILED.pop(self, None)
        return self

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.net.sample_shape)

    @property
    def conditional(self) -> bool:
        """Whether the raw network takes class labels (it has a class embedding)."""
        return int(getattr(self.net, "num_classes", 0) or 0) > 0

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise ConfigError when samples of `shape` (without batch) do not fit the network."""
        if tuple(shape) != self.sample_shape:
            raise ConfigError(f"data of shape {tuple(shape)} does not fit the network, which takes {self.sample_shape}")

    def forward(self, x: Tensor, level: Tensor | float, labels: Tensor | None = None) -> Tensor:
        level = torch.as_tensor(level, dtype=x.dtype, device=x.device)
        if level.dim() == 0:
            level = level.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.formulation.preconditioning(level)
        net_dtype = next(self.net.parameters()).dtype
        inp = (expand_as_image(c_in, x) * x).to(net_dtype)
        if getattr(self, "channels_last", False):
            inp = inp.contiguous(memory_format=torch.channels_last)
        net = _COMPILED.get(self)
        if net is None:
            net = _DDP.get(self, self.net)
        amp = PRECISIONS[self.precision]
        with torch.autocast(device_type=x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = net(inp, c_noise.to(net_dtype), labels)
        return expand_as_image(c_skip, x) * x + expand_as_image(c_out, x) * out.to(x.dtype)


def check_dropout(dropout: float) -> float:
    """Dropout must lie in [0, 1)."""
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    return dropout


def checked_size(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build `factory()` on the meta device first (no memory) and refuse a network above the parameter limit;
    then build it for real. (UNet and MLP count their parameters by arithmetic before allocating anything; this
    is for other networks.)"""
    with torch.device("meta"):
        n = sum(p.numel() for p in factory().parameters())
    check_limit("network parameters", n, "parameters")
    return factory()


def build_network(sample_shape: Sequence[int], num_classes: int = 0, width: int | None = None,
                  depth: int | None = None, dropout: float = 0.0, channel_mult: Sequence[int] | None = None,
                  attn_resolutions: Sequence[int] = (), skip_scale: float = 1.0) -> nn.Module:
    """A default raw network for samples of `sample_shape`: an MLP for vectors, a UNet for [C, H, W] images.

    width None picks the default (128 for the MLP, 32 for the UNet); depth None likewise (2 MLP blocks, 1 block per
    UNet level). A given width or depth must be a positive integer and is built as given.
    """
    if width is not None:
        check_positive("width", width)
    if depth is not None:
        check_positive("depth", depth)
        check_limit("depth", depth, "depth")
    check_dropout(dropout)
    if num_classes:
        check_limit("num_classes", num_classes, "classes")
    shape = tuple(sample_shape)
    if len(shape) == 1:  # UNet and MLP refuse settings above the limits before allocating anything
        return MLP(dim=shape[0], width=width or 128, depth=depth or 2, num_classes=num_classes, dropout=dropout)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"sample shape {shape} is not supported; expected (D,) vectors or square (C, H, W) images")
    c, res, _ = shape
    if channel_mult is None:
        channel_mult = (1, 2) if res <= 16 else (1, 2, 2)
        while res % 2 ** (len(channel_mult) - 1):
            channel_mult = channel_mult[:-1]
    return UNet(res, channels=c, width=width or 32, depth=depth or 1, channel_mult=channel_mult,
                num_classes=num_classes, dropout=dropout, attn_resolutions=attn_resolutions, skip_scale=skip_scale)


def network_from_config(config: dict) -> nn.Module:
    """Rebuild a raw network from its `config` attribute (as stored in checkpoints)."""
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    kinds = {"unet": UNet, "mlp": MLP}
    if config.get("kind") in kinds:
        try:
            return kinds[config["kind"]](**kwargs)  # each refuses a size above the limits before allocating
        except (TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"network config {config} cannot be built ({e})") from None
    raise ConfigError(f"unknown network kind {config.get('kind')!r}; accepted: unet, mlp")
