"""The CIFAR-scale UNet: self-attention, skip scaling, the cifar10 preset, checkpoint round trips."""
import pytest
import torch

from diffusion_rl.config import PRESETS, Args, apply_preset
from diffusion_rl.errors import ConfigError
from diffusion_rl.networks import UNet, _SelfAttention, build_network, network_from_config


def test_cifar10_preset_builds_a_ddpmpp_class_unet():
    args = apply_preset(Args(preset="cifar10", steps=10), given={"steps"})
    assert (args.data, args.width, args.depth, args.batch_size, args.steps) == ("cifar10", 128, 4, 512, 10)
    given = apply_preset(Args(preset="cifar10", width=64), given={"width"})
    assert given.width == 64  # an option written on the command line wins over the preset
    with torch.device("meta"):  # no memory: count only
        net = build_network((3, 32, 32), width=args.width, depth=args.depth, dropout=args.dropout,
                            channel_mult=(2, 2, 2), attn_resolutions=(16,), skip_scale=args.skip_scale)
    n = sum(p.numel() for p in net.parameters())
    assert 50e6 < n < 56e6  # 51.5M; EDM's DDPM++ has 56M
    assert sum(isinstance(m, _SelfAttention) for m in net.modules()) == 4 + 5 + 1  # down, up at 16x16, middle
    assert PRESETS["cifar10"]["ema_halflife_images"] == 500_000.0


def test_attention_unet_runs_and_round_trips_through_its_config():
    torch.manual_seed(0)
    net = UNet(16, channels=3, width=16, depth=1, channel_mult=(1, 2), attn_resolutions=(8,), skip_scale=0.7071)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, c = torch.randn(2, 3, 16, 16), torch.zeros(2)
    twin = network_from_config(net.config)
    twin.load_state_dict(net.state_dict())
    torch.testing.assert_close(twin(x, c), net(x, c))
    out = net(x, c)
    out.sum().backward()
    assert out.shape == x.shape and all(p.grad is not None for p in net.parameters())


def test_bad_attention_resolutions_are_named():
    with pytest.raises(ConfigError, match=r"attention resolutions \[5\] are not feature-map sides"):
        UNet(16, channel_mult=(1, 2), attn_resolutions=(5,))


def test_a_denoiser_is_conditional_only_when_its_network_has_a_class_embedding():
    from diffusion_rl.formulations import make_formulation
    from diffusion_rl.networks import Denoiser

    form = make_formulation("edm")
    assert Denoiser(build_network((1, 8, 8), num_classes=10, width=8), form).conditional
    assert not Denoiser(build_network((1, 8, 8), width=8), form).conditional
    assert not Denoiser(build_network((2,)), form).conditional
