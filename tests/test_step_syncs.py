"""The training step without host syncs (the GPU path): TD-valid rows by masking rather than indexing, finiteness
kept in an on-device flag, the logged sums on the device. On the CPU a dispatch mode records every op that would
make a GPU wait for the host (a scalar read, a data-dependent shape); the TD(0) step path (the paper's) must make
none, and the sync-free loss must equal the indexed one. The optimizers' step counters are CPU tensors on every
device (PyTorch's non-capturable Adam/RAdam), so their reads are not syncs and are left out. The multi-step
estimators (nstep, td_lambda) compute their returns with TorchRL's functionals, which read chain lengths on the
host: that path is not sync-free (docs/scaling.md)."""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from agents import TDEvaluator
from diffusion_rl.data import load_dataset
from diffusion_rl.training import NonFiniteLossError, TrainConfig
from envs import DiffusionMRP

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.is_nonzero.default, aten.equal.default, aten.allclose.default}


class SyncRecorder(TorchDispatchMode):
    """Records the aten ops that need the host to see device data: scalar reads (.item(), bool(), float()),
    nonzero / masked_select, and indexing with boolean masks (a data-dependent shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            if not any("torch/optim/" in f.filename for f in traceback.extract_stack()):  # CPU step counters
                self.seen.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.seen.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def agent(digits, formulation="edm", static=True, **kw):
    env = DiffusionMRP(digits, formulation, seed=0)
    ag = TDEvaluator(env, config=TrainConfig(batch_size=16, warmup_steps=0), device="cpu", **kw)
    ag.loss_module.static_shapes = static
    return ag


@pytest.mark.parametrize("formulation", ["edm", "ct", "vp"])
def test_the_training_step_makes_no_host_sync(digits, formulation):
    ag = agent(digits, formulation)
    batch = ag.collect()
    ag.update(batch, check=False)  # warm: optimizer state, the flag's tensors
    batch = ag.collect()
    with SyncRecorder() as rec:
        out = ag.update(batch, check=False)
    assert rec.seen == [], rec.seen
    assert torch.isfinite(out["loss"])
    ag.check_finite()  # one sync, outside the step: passes


@pytest.mark.parametrize("formulation,kw", [("edm", {}), ("edm", {"estimator": "td_lambda", "n_steps": 3}),
                                            ("edm", {"estimator": "nstep", "n_steps": 2, "full_reach": True}),
                                            ("ct", {}), ("vp", {})])
def test_masked_rows_give_the_indexed_loss(digits, formulation, kw):
    fast, slow = agent(digits, formulation, True, **kw), agent(digits, formulation, False, **kw)
    slow.denoiser.load_state_dict(fast.denoiser.state_dict())
    slow.target.load_state_dict(fast.target.state_dict())
    batch = fast.collect()
    a, b = fast.loss(batch), slow.loss(batch)
    for key in ("loss_td", "loss_base", "sample_loss", "td_error"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_the_indexed_path_is_the_cpu_default(digits):
    ag = TDEvaluator(DiffusionMRP(digits, "edm", seed=0), config=TrainConfig(batch_size=8), device="cpu")
    assert ag.loss_module.static_shapes is False  # on a CPU a host sync is cheap and the masked rows cost work
    compiled = TDEvaluator(DiffusionMRP(digits, "edm", seed=0), config=TrainConfig(batch_size=8, compile=True),
                           device="cpu")
    assert compiled.loss_module.static_shapes is True  # one shape for torch.compile


def test_the_on_device_flag_names_the_first_bad_step(digits, tmp_path):
    ag = agent(digits)
    ag.update(ag.collect(), check=False)
    with torch.no_grad():
        next(ag.denoiser.parameters()).fill_(float("nan"))
    ag.update(ag.collect(), check=False)
    ag.update(ag.collect(), check=False)
    with pytest.raises(NonFiniteLossError, match="at step 1 \\(found at step 3\\)"):
        ag.check_finite()
    with pytest.raises(NonFiniteLossError):
        ag.save(tmp_path / "checkpoint.pt")  # a checkpoint is never written past a non-finite step
    assert not (tmp_path / "checkpoint.pt").exists()


def test_compiled_steps_equal_eager_and_do_not_recompile():
    """torch.compile of the online and target networks (static shapes through the step): three compiled steps give
    the eager losses to 1e-5, and no graph is compiled after the first step."""
    from torch._dynamo.utils import counters

    data = load_dataset("moons")

    def losses(compile: bool) -> tuple[list[float], list[int]]:
        torch.manual_seed(0)
        ag = TDEvaluator(DiffusionMRP(data, "edm", seed=0),
                         config=TrainConfig(batch_size=32, warmup_steps=0, compile=compile), device="cpu")
        out, graphs = [], []
        for _ in range(4):
            out.append(float(ag.update(ag.collect(), check=False)["loss"]))
            graphs.append(counters["stats"]["unique_graphs"])
        return out, graphs

    torch._dynamo.reset()
    counters.clear()
    eager, _ = losses(False)
    compiled, graphs = losses(True)
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 3  # warm-up compiles; later steps reuse the graphs
    assert not counters["recompiles"]
    torch._dynamo.reset()
