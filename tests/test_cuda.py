"""What only a GPU can check (skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU machine)."""
import pytest
import torch

from diffusion_rl.build import make_learner
from diffusion_rl.config import Args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["baseline", "td"])
def test_training_steps_on_cuda(method, precision):
    learner = make_learner(Args(data="digits", method=method, precision=precision, device="cuda", progress=False))
    learner.out_dir = None
    assert learner.device.type == "cuda"
    for _ in range(3):
        out = learner.update(learner.collect())
    assert torch.isfinite(out["loss"]) and learner.step == 3


def test_an_fp16_run_resumes_exactly_with_its_loss_scale(tmp_path):
    def learner(out):
        lr = make_learner(Args(data="digits", method="td", precision="fp16", device="cuda", progress=False))
        lr.out_dir = out  # train() checkpoints at the end of each call
        return lr
    full = learner(tmp_path / "full")
    list(full.train(8, progress=False))
    half = learner(tmp_path / "half")
    list(half.train(4, progress=False))
    resumed = learner(tmp_path / "half").resume()
    list(resumed.train(8, progress=False))
    assert resumed.scaler.get_scale() == full.scaler.get_scale()
    assert all(torch.equal(a, b) for a, b in zip(full.denoiser.parameters(), resumed.denoiser.parameters()))


def test_compiled_td_step_on_cuda_matches_eager():
    eager, compiled = (make_learner(Args(data="digits", method="td", compile=c, device="cuda", progress=False))
                       for c in (False, True))
    batch = eager.collect()
    compiled.collect()
    torch.testing.assert_close(compiled.update(batch)["loss"], eager.update(batch)["loss"], rtol=1e-3, atol=1e-5)


def test_heun_sampling_on_cuda_matches_cpu_from_the_same_start():
    from diffusion_rl.samplers import heun

    learner = make_learner(Args(data="digits", method="baseline", device="cuda", progress=False))
    for _ in range(5):
        learner.update(learner.collect())
    ema = learner.ema
    x = ema.formulation.prior((16, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out_gpu, _ = heun(ema, ema.formulation, x.cuda(), 5)
    out_cpu, _ = heun(ema.cpu(), ema.formulation, x, 5)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-3, atol=1e-3)


def test_cuda_env_gathers_on_the_device_and_draws_what_the_cpu_env_draws():
    from envs import DiffusionMRP

    envs = {d: DiffusionMRP("digits", batch_size=[16], seed=3, device=d, hflip=True) for d in ("cpu", "cuda")}
    assert envs["cuda"]._source.x.device.type == "cuda" and envs["cpu"]._source is envs["cpu"].dataset
    a, b = (envs[d].reset_training(16) for d in ("cpu", "cuda"))
    torch.testing.assert_close(b["x0"].cpu(), a["x0"])  # same indices and flips from the CPU data generator
    torch.testing.assert_close(b["level"].cpu(), a["level"])
