"""Speed settings of the training forwards: bf16 autocast (testable on CPU), torch.compile, refused settings."""
import pytest
import torch

from agents import TDEvaluator
from diffusion_rl.data import Dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.networks import MLP, Denoiser
from diffusion_rl.training import TrainConfig
from envs import DiffusionMRP


def agent(seed: int = 0, **cfg) -> TDEvaluator:
    data = Dataset("toy", torch.randn(512, 2, generator=torch.Generator().manual_seed(0)), None, 0, "points")
    env = DiffusionMRP(data, "edm", seed=seed)
    torch.manual_seed(seed)
    net = MLP(dim=2, width=32, depth=2)
    with torch.no_grad():  # a non-zero output layer, so the network's precision shows in the loss
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = TrainConfig(batch_size=64, lr=1e-3, warmup_steps=0, seed=seed, **cfg)
    return TDEvaluator(env, denoiser=Denoiser(net, env.formulation), config=config, device="cpu")


def test_bf16_autocast_changes_the_forward_but_not_the_loss_beyond_its_precision():
    fp32, bf16 = agent(), agent(precision="bf16")
    assert (bf16.denoiser.precision, bf16.target.precision, bf16.ema.precision) == ("bf16", "bf16", "fp32")
    batch = fp32.collect()
    torch.testing.assert_close(bf16.collect()["x"], batch["x"])
    a, b = fp32.loss(batch), bf16.loss(batch)
    assert a["loss_td"] != b["loss_td"]  # autocast is on
    torch.testing.assert_close(b["loss_td"] + b["loss_base"], a["loss_td"] + a["loss_base"], rtol=0.03, atol=1e-3)
    assert b["td_error"].dtype == torch.float32  # the TD maths stays float32 outside the network
    for _ in range(3):
        assert torch.isfinite(bf16.update(bf16.collect())["loss"])


def test_compile_runs_and_keeps_the_state_dict():
    eager, compiled = agent(), agent(compile=True)
    assert list(compiled.denoiser.state_dict()) == list(eager.denoiser.state_dict())
    batch = eager.collect()
    compiled.collect()
    out_e, out_c = eager.update(batch), compiled.update(batch)
    torch.testing.assert_close(out_c["loss"], out_e["loss"], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(compiled.update(compiled.collect())["loss"])


def test_settings_the_device_cannot_run_are_refused_before_work():
    with pytest.raises(ConfigError, match="precision fp16 needs a CUDA device"):
        agent(precision="fp16")
    with pytest.raises(ConfigError, match="unknown precision .fp8.; accepted: fp32, bf16, fp16"):
        TrainConfig(precision="fp8")


def test_a_resume_applies_the_precision_it_ends_up_with(tmp_path):
    first = agent()
    first.update(first.collect())
    path = first.save(tmp_path / "ckpt.pt")
    kept = agent(precision="bf16")
    kept.resume(path, keep=("precision",))  # written on the command line: this run's value
    assert kept.config.precision == kept.denoiser.precision == kept.target.precision == "bf16"
    taken = agent(precision="bf16")
    taken.resume(path, keep=())  # not written: the checkpoint's value
    assert taken.config.precision == taken.denoiser.precision == taken.target.precision == "fp32"
