"""The shared training loop: exact resume, atomic checkpoints, non-finite losses, config checks."""
import json
import math

import pytest
import torch

from agents import DiffusionBaseline
from diffusion_rl.checkpoints import load_checkpoint
from diffusion_rl.data import load_dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import make_formulation
from diffusion_rl.networks import Denoiser, build_network
from diffusion_rl.training import NonFiniteLossError, TrainConfig, objective
from envs import DiffusionMRP


def make(out_dir, formulation="edm", seed=0, lr=1e-3, data="8gaussians", **kw):
    ds = load_dataset(data, n_points=2000)
    torch.manual_seed(seed)
    d = Denoiser(build_network(ds.sample_shape, width=32, dropout=0.1), make_formulation(formulation))
    cfg = TrainConfig(batch_size=32, lr=lr, warmup_steps=5, seed=seed, log_every=5, **kw)
    env = DiffusionMRP(ds, d.formulation, seed=seed)
    return DiffusionBaseline(env, denoiser=d, config=cfg, out_dir=out_dir, device="cpu")


@pytest.mark.parametrize("formulation", ["edm", "vp"])
def test_resume_matches_uninterrupted_run_exactly(tmp_path, formulation):
    full = make(tmp_path / "full", formulation)
    list(full.train(20, progress=False))
    half = make(tmp_path / "half", formulation)
    list(half.train(10, progress=False))
    resumed = make(tmp_path / "half", formulation).resume()
    assert resumed.step == 10
    list(resumed.train(20, progress=False))
    for a, b in zip(full.denoiser.state_dict().values(), resumed.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_contents_and_metrics(tmp_path):
    L = make(tmp_path)
    recs = list(L.train(10, progress=False))
    assert [r["step"] for r in recs] == [5, 10]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert {"model", "ema", "optimizer", "rng", "step", "config"} <= set(ckpt) and ckpt["step"] == 10
    # one pair of generators, the env's, checkpointed once
    assert set(ckpt["rng"]) == {"torch", "env"} and set(ckpt["rng"]["env"]) == {"generator", "data_generator"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["step"] == 10
    # the run's training time is kept, and a resume goes on counting from it (compare's train_seconds)
    assert 0 < ckpt["train_seconds"] <= L.train_seconds  # up to the final save; the learner's goes on to its end
    resumed = make(tmp_path).resume()
    assert resumed.train_seconds == ckpt["train_seconds"]
    list(resumed.train(12, progress=False))
    assert resumed.train_seconds > ckpt["train_seconds"]
    del ckpt["train_seconds"]  # a checkpoint from before the count: its time is unknown, not 0
    torch.save(ckpt, tmp_path / "old.pt")
    assert math.isnan(make(tmp_path / "other").resume(tmp_path / "old.pt").train_seconds)
    ckpt["rng"]["env"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    torch.save(ckpt, tmp_path / "cuda.pt")
    with pytest.raises(ConfigError, match="state does not fit this run's cpu generator: it was trained on another"):
        make(tmp_path / "other2").resume(tmp_path / "cuda.pt")


def test_ema_moves_toward_online_weights(tmp_path):
    L = make(None)
    before = [p.clone() for p in L.ema.parameters()]
    list(L.train(3, progress=False))
    moved = any(not torch.equal(a, b) for a, b in zip(before, L.ema.parameters()))
    differs = any(not torch.equal(a, b) for a, b in zip(L.denoiser.parameters(), L.ema.parameters()))
    assert moved and differs


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    L = make(tmp_path, checkpoint_every=5)
    list(L.train(5, progress=False))
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        next(L.denoiser.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        list(L.train(10, progress=False))
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_non_finite_gradients_stop_before_the_step_with_a_finite_loss(tmp_path):
    L = make(tmp_path, checkpoint_every=5)
    list(L.train(5, progress=False))
    good = (tmp_path / "checkpoint.pt").read_bytes()
    first = next(L.denoiser.parameters())
    first.register_hook(lambda g: torch.full_like(g, float("inf")))  # the loss stays finite, one gradient does not
    # the training loop makes no host sync per step: an on-device flag names the first bad step at the next log
    # line or checkpoint, and the run stops with its last good checkpoint (issue 24, method.md §12)
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient norm at step 5"):
        list(L.train(10, progress=False))
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    # update() called directly checks at once, before the step
    L = make(None)
    first = next(L.denoiser.parameters())
    first.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm inf at step 0"):
        L.update(L.collect())
    assert all(torch.isfinite(p).all() for p in L.denoiser.parameters())  # no step was taken


def test_training_without_clipping_is_unchanged_by_the_gradient_check(tmp_path):
    """With grad_clip 0 the finiteness check only measures the norm: update() equals a bare step (loss, backward,
    optimizer step at the same learning rate) on the same batch, weight for weight."""
    a, b = make(None), make(None)
    batch = a.collect()
    torch.manual_seed(1)  # dropout draws from the global generator: the same masks for both
    a.update(batch)
    torch.manual_seed(1)
    for group in b.optimizer.param_groups:
        group["lr"] = b._lr()
    b.optimizer.zero_grad(set_to_none=True)
    objective(b.loss(batch)).backward()
    b.optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(a.denoiser.parameters(), b.denoiser.parameters()))


def test_corrupt_and_mismatched_checkpoints_are_named(tmp_path):
    L = make(tmp_path)
    list(L.train(5, progress=False))
    with pytest.raises(ConfigError, match="train.seed: saved 0 vs now 1"):
        make(tmp_path, seed=1).resume()
    with pytest.warns(UserWarning, match="resuming with lr 0.005"):  # the learning rate may change on resume
        resumed = make(tmp_path, lr=5e-3).resume()
    assert resumed.optimizer.param_groups[0]["lr"] == 5e-3
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        L.resume(tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        L.resume(tmp_path / "missing.pt")


def test_shape_mismatch_and_bad_config_fail_before_training():
    ds = load_dataset("digits")
    d = Denoiser(build_network((1, 16, 16)), make_formulation("edm"))
    with pytest.raises(ConfigError, match=r"\(1, 8, 8\)"):
        DiffusionBaseline(DiffusionMRP(ds, seed=0), denoiser=d, device="cpu")
    with pytest.raises(ConfigError, match=r"batch_size 128 differs from the env's batch 4.*give 4"):
        DiffusionBaseline(DiffusionMRP(ds, batch_size=4, seed=0), config=TrainConfig(batch_size=128), device="cpu")
    with pytest.raises(ConfigError, match=r"\(2, 3\) has 2 dims"):
        DiffusionBaseline(DiffusionMRP(ds, batch_size=(2, 3), seed=0), device="cpu")
    with pytest.raises(ConfigError, match="formulation"):
        DiffusionBaseline(DiffusionMRP(ds, "vp", seed=0), denoiser=Denoiser(build_network((1, 8, 8)),
                                                                              make_formulation("edm")))
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="steps"):
        list(make(None).train(0))


def test_baseline_loss_decreases_on_toy_data():
    L = make(None, lr=3e-3)
    recs = list(L.train(150, progress=False))
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_resume_drops_metric_records_after_the_checkpoint(tmp_path):
    L = make(tmp_path)
    list(L.train(5, progress=False))
    at_five = (tmp_path / "checkpoint.pt").read_bytes()
    list(L.train(10, progress=False))
    (tmp_path / "checkpoint.pt").write_bytes(at_five)  # as if the run died after logging step 10
    resumed = make(tmp_path).resume()
    assert [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5]
    list(resumed.train(10, progress=False))
    assert [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]


def test_unet_widths_that_are_not_multiples_of_8():
    from diffusion_rl.networks import UNet

    net = UNet(8, width=12, channel_mult=(1, 2))
    assert net(torch.randn(2, 1, 8, 8), torch.zeros(2)).shape == (2, 1, 8, 8)


def test_stopping_early_still_writes_the_final_checkpoint(tmp_path):
    L = make(tmp_path)
    for rec in L.train(20, progress=False):
        if rec["step"] == 5:
            break  # the caller stops iterating: what was trained is kept
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5


def test_default_network_is_seeded_by_the_config():
    ds = load_dataset("8gaussians", n_points=500)

    def first_losses(seed):
        L = DiffusionBaseline(DiffusionMRP(ds, seed=0), config=TrainConfig(batch_size=16, seed=seed, log_every=1),
                              device="cpu")
        torch.manual_seed(123)  # whatever the global RNG holds, the initialisation follows the config's seed
        return [r["loss"] for r in L.train(3, progress=False)]

    assert first_losses(0) == first_losses(0) and first_losses(0) != first_losses(1)


def test_baseline_and_td_agent_draw_the_same_data():
    """The baseline's batches are the env's training resets, the start states of the TD agent's batches."""
    from agents import TDEvaluator

    ds = load_dataset("8gaussians", n_points=500)
    base = DiffusionBaseline(DiffusionMRP(ds, seed=3), config=TrainConfig(batch_size=16), device="cpu")
    td = TDEvaluator(DiffusionMRP(ds, seed=3), config=TrainConfig(batch_size=16), device="cpu")
    for _ in range(3):
        b, t = base.collect(), td.collect()
        assert torch.equal(b["x0"], t["x0"]) and torch.equal(b["level"], t["level"])


def test_resume_tolerates_a_torn_metrics_line_and_removes_stale_temporaries(tmp_path):
    L = make(tmp_path)
    list(L.train(10, progress=False))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 15, "loss": 0.')  # a writer killed mid-line
    (tmp_path / "checkpoint.pt12345.tmp").write_bytes(b"half a checkpoint")
    with pytest.warns(UserWarning, match="dropped 1 unreadable line"):
        resumed = make(tmp_path).resume()
    assert not list(tmp_path.glob("*.tmp"))
    list(resumed.train(15, progress=False))
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10, 15]
    assert len({r["run_id"] for r in recs}) == 1 and all(r["seed"] == 0 for r in recs)  # one run, named


def test_steps_below_the_checkpoint_are_refused(tmp_path):
    L = make(tmp_path)
    list(L.train(10, progress=False))
    with pytest.raises(ConfigError, match="steps=5 is below the step 10"):
        list(make(tmp_path).resume().train(5, progress=False))


def test_other_data_with_the_same_name_is_refused_on_resume(tmp_path):
    import numpy as np

    from diffusion_rl.data import load_dataset as load

    npz = tmp_path / "lab.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8))

    def learner(out):
        ds = load(str(npz))
        return DiffusionBaseline(DiffusionMRP(ds, seed=0), config=TrainConfig(batch_size=8), out_dir=out,
                                 device="cpu")

    list(learner(tmp_path / "run").train(2, progress=False))
    np.savez(npz, images=np.random.default_rng(1).integers(0, 256, (64, 8, 8), dtype=np.uint8))  # swapped file
    with pytest.raises(ConfigError, match=r"content hash [0-9a-f]{16} now vs [0-9a-f]{16} saved"):
        learner(tmp_path / "run").resume()


def test_wall_clock_checkpoints(tmp_path):
    L = make(tmp_path, checkpoint_seconds=1e-9)  # every step is "due"
    for rec in L.train(10, progress=False):
        assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == rec["step"]


@pytest.mark.parametrize("env_batch, config, batch", [((), None, 128), ((), TrainConfig(batch_size=8), 8),
                                                      ((16,), None, 16), ((16,), TrainConfig(batch_size=16), 16),
                                                      ((16,), TrainConfig(lr=1e-3), 16)])
def test_the_env_batch_is_the_learner_batch(env_batch, config, batch):
    """An env with a batch size sets the learner's batch (a config may repeat it, never contradict it); an unbatched
    env takes the config's, 128 by default. The TD agent's batches then have that size."""
    from agents import TDEvaluator

    agent = TDEvaluator(DiffusionMRP("digits", batch_size=env_batch, seed=0), config=config, device="cpu")
    assert agent.config.batch_size == agent.local_batch == batch
    assert agent.collect().batch_size == (batch,)
    out = agent.update(agent.collect())
    assert torch.isfinite(out["loss"]) if "loss" in out.keys() else True


def test_checkpoints_from_before_the_new_settings_resume_under_their_own_maths(tmp_path):
    """A checkpoint written before RAdam was offered resumes (it trained with Adam); a TD-CT checkpoint from before the
    release's loss is named, not resumed under the new maths (method.md §10.1-§10.3)."""
    from agents import TDEvaluator
    from diffusion_rl.checkpoints import run_identity

    L = make(tmp_path)
    list(L.train(2, progress=False))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["config"]["train"]["optimizer"]
    make(None).load_state_dict(ckpt)  # no complaint: the old run's optimizer was Adam
    ds = load_dataset("8gaussians", n_points=2000)
    ct = TDEvaluator(DiffusionMRP(ds, "ct", seed=0), config=TrainConfig(batch_size=8), device="cpu")
    old = json.loads(json.dumps(ct.full_config()))
    for k in ("kappa", "boundary", "weight", "distance"):
        del old["formulation"][k]
    del old["method_config"]["ct_target"]
    assert run_identity(old)["formulation"]["kappa"] == "shared-path"
    assert run_identity(old)["method_config"]["ct_target"] == "eval"
    with pytest.raises(ConfigError, match="formulation.boundary: saved 'mask' vs now 'clamp'"):
        ct.load_state_dict({**ct.state_dict(), "config": old})
