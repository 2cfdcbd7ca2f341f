"""TDEvaluator training: target-network updates, bad input, short runs, checkpoint + resume (agents/td_evaluator.py)."""
from __future__ import annotations

import math

import pytest
import torch
from tensordict.nn import TensorDictModule
from torchrl.objectives import HardUpdate, SoftUpdate

from agents import ConsistencyBaseline, TDEvaluator, TDLoss
from diffusion_rl.data import Dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.formulations import EDMFormulation
from diffusion_rl.networks import MLP, Denoiser
from diffusion_rl.training import TrainConfig, objective
from envs import DiffusionMRP
from envs.critic import make_critic


def toy_data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset("toy", torch.randn(512, 2, generator=g), None, 0, "points")


def small_denoiser(formulation, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(MLP(dim=2, width=16, depth=1), formulation)


def make(formulation="edm", coupling="markov", seed=0, batch_size=16, out_dir=None, **kw) -> TDEvaluator:
    env = DiffusionMRP(toy_data(), formulation, coupling=coupling, seed=seed)
    cfg = TrainConfig(batch_size=batch_size, lr=1e-3, warmup_steps=0, log_every=5, seed=seed)
    return TDEvaluator(env, denoiser=small_denoiser(env.formulation), config=cfg, out_dir=out_dir, device="cpu", **kw)


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ---- the target network --------------------------------------------------------------------------------------------
def test_defaults_are_the_paper_recipe():
    ag = make()
    assert ag.method == "td-edm"
    assert (ag.env.formulation.steps, ag.env.stride, ag.env.one_step, ag.env.coupling) == (18, 3.0, 0.2, "markov")
    assert (ag.estimator_name, ag.reweighting, ag.base_lambda, ag.target_update, ag.tau) == (
        "td0", "edm", 0.5, "soft", 0.999)
    assert isinstance(ag.loss_module, TDLoss) and isinstance(ag.target_updater, SoftUpdate)
    mc = ag.method_config()
    for key in ("estimator", "reweighting", "base_lambda", "tau", "stride", "one_step", "coupling"):
        assert key in mc
    # the target is a frozen deep copy, in eval mode, distinct from the evaluation EMA
    assert ag.target is not ag.denoiser and ag.target is not ag.ema
    assert not ag.target.training and all(not p.requires_grad for p in ag.target.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params(ag.target), params(ag.denoiser)))
    assert "target" in ag.extra_modules() and "target" in ag.state_dict()["extra"]


def test_soft_update_after_each_step():
    ag = make(tau=0.9)
    before = params(ag.target)
    ema_before = params(ag.ema)
    ag.update(ag.collect())
    online = params(ag.denoiser)
    for t0, t1, p in zip(before, params(ag.target), online):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * p, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(params(ag.target), online))
    # the evaluation EMA follows its own (much slower) rate: it is not the target
    beta = 0.5 ** (16 / ag.config.ema_halflife_images)
    for e0, e1, p in zip(ema_before, params(ag.ema), online):
        torch.testing.assert_close(e1, beta * e0 + (1 - beta) * p, rtol=1e-6, atol=1e-7)
    assert not ag.target.training


def test_target_rate_from_a_halflife_and_a_rampup():
    """tau = 0.5 ** (batch / h) with h = min(half-life, ramp-up * images seen), applied by the soft update."""
    ag = make(target_halflife_images=64.0, target_rampup=0.5)
    B = ag.config.batch_size
    before = params(ag.target)
    ag.update(ag.collect())  # images seen = B: the ramp-up's h = B / 2 is below 64
    tau = 0.5 ** (B / (0.5 * B))
    assert ag.current_tau() == tau == 0.25
    for t0, t1, p in zip(before, params(ag.target), params(ag.denoiser)):
        torch.testing.assert_close(t1, tau * t0 + (1 - tau) * p, rtol=1e-6, atol=1e-7)
    for _ in range(20):
        ag.update(ag.collect())  # h now capped by the half-life
    assert ag.current_tau() == 0.5 ** (B / 64.0)
    assert make(target_rampup=0.05).method_config()["tau"] is None
    assert make().current_tau() == 0.999
    with pytest.raises(ConfigError, match="target_rampup must be a positive finite number, got 0.0"):
        make(target_rampup=0.0)
    with pytest.raises(ConfigError, match="target_update='hard'"):
        make(target_update="hard", target_halflife_images=100.0)


def test_hard_update_every_period():
    ag = make(target_update="hard", hard_period=3)
    assert isinstance(ag.target_updater, HardUpdate)
    start = params(ag.target)
    for step in range(1, 7):
        ag.update(ag.collect())
        tgt, online = params(ag.target), params(ag.denoiser)
        if step % 3 == 0:
            assert all(torch.equal(a, b) for a, b in zip(tgt, online)), step
            start = tgt
        else:
            assert all(torch.equal(a, b) for a, b in zip(tgt, start)), step
            assert not all(torch.equal(a, b) for a, b in zip(tgt, online)), step


def test_no_gradient_reaches_the_target():
    ag = make()
    out = ag.loss(ag.collect())
    objective(out).backward()
    assert all(p.grad is None for p in ag.target.parameters())
    assert any(p.grad is not None for p in ag.denoiser.parameters())


# ---- bad input -----------------------------------------------------------------------------------------------------
def _leaky_critic(denoiser, formulation, one_step, coupling):
    crit = make_critic(denoiser, formulation, one_step, coupling)
    return TensorDictModule(lambda x, level, label, x0: crit.module(x, level, label),
                            in_keys=["x", "level", "label", "x0"], out_keys=["denoised", "state_value"])


@pytest.mark.parametrize("kwargs, match", [
    ({"estimator": "td2"}, "'td2'"),
    ({"estimator": 3}, "3"),
    ({"estimator": "td_lambda", "lmbda": 1.5}, "1.5"),
    ({"estimator": "td_lambda", "lmbda": -0.2}, "-0.2"),
    ({"base_lambda": -0.1}, "-0.1"),
    ({"base_lambda": float("nan")}, "nan"),
    ({"reweighting": "sqrt"}, "'sqrt'"),
    ({"target_update": "polyak"}, "'polyak'"),
    ({"tau": 1.5}, "1.5"),
    ({"hard_period": 0}, "hard_period"),
    ({"n_steps": 0}, "n_steps"),
    ({"estimator": "td0", "n_steps": 3}, "n_steps=3"),
    ({"critic_factory": _leaky_critic}, "x0"),
])
def test_bad_input_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        make(**kwargs)
    assert "\n" not in str(err.value)


def test_formulation_mismatch():
    env = DiffusionMRP(toy_data(), "edm", seed=0)
    other = Denoiser(MLP(dim=2, width=8, depth=1), EDMFormulation(steps=10))
    with pytest.raises(ConfigError, match="'steps': 10"):
        TDEvaluator(env, denoiser=other, device="cpu")
    with pytest.raises(ConfigError, match="DiffusionMRP"):
        TDEvaluator(object(), device="cpu")


# ---- training ------------------------------------------------------------------------------------------------------
def test_short_run_stays_finite():
    ag = make()
    recs = list(ag.train(30, progress=False))
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]
    for r in recs:
        for k in ("loss", "loss_td", "loss_base", "base_mean", "valid_fraction"):
            assert math.isfinite(r[k]), (k, r)
    assert all(torch.isfinite(p).all() for p in ag.denoiser.parameters())


@pytest.mark.parametrize("kw", [
    {"estimator": "nstep", "n_steps": 3},
    {"estimator": "td_lambda", "n_steps": 3, "lmbda": 0.5, "target_update": "hard", "hard_period": 2},
    {"formulation": "vp"},
    {"formulation": "ct", "coupling": "shared"},
    {"coupling": "shared", "reweighting": "pairwise"},
])
def test_variants_train(kw):
    ag = make(**kw)
    batch = ag.collect()
    assert batch.batch_size == ((16, 3) if "n_steps" in kw else (16,))
    recs = list(ag.train(4, progress=False))
    assert math.isfinite(recs[-1]["loss"])
    out = ag.loss(ag.collect())
    B = batch.batch_size[0]  # the loss is taken at the chains' start states (method.md §7)
    assert out["valid"].shape == (B,)
    assert out["td_error"].shape == batch["x"].shape[:1] + batch["x"].shape[len(batch.batch_size):]


@pytest.mark.parametrize("kw", [{}, {"estimator": "td_lambda", "n_steps": 2, "target_update": "hard",
                                     "hard_period": 3}])
def test_resume_matches_uninterrupted_run(tmp_path, kw):
    full = make(out_dir=tmp_path / "full", **kw)
    list(full.train(8, progress=False))

    half = make(out_dir=tmp_path / "half", **kw)
    list(half.train(4, progress=False))  # writes half/checkpoint.pt at step 4
    resumed = make(out_dir=tmp_path / "half", seed=0, **kw).resume()
    assert resumed.step == 4
    list(resumed.train(8, progress=False))

    for name in ("denoiser", "ema", "target"):
        a, b = params(getattr(full, name)), params(getattr(resumed, name))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name
    assert full.env.generator.get_state().equal(resumed.env.generator.get_state())


def test_a_checkpoint_carries_the_fp16_loss_scale(monkeypatch):
    # fp16 needs CUDA (tests/test_cuda.py resumes a real fp16 run); here a CPU scaler stands in for its state
    src = make()
    src.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    src.scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    state = src.state_dict()
    assert state["scaler"]["scale"] == 8.0 and "scaler" not in make().state_dict()
    dst = make()
    monkeypatch.setattr(type(dst), "apply_speed", lambda self: setattr(self, "scaler", torch.amp.GradScaler("cpu")))
    dst.load_state_dict(state)
    assert dst.scaler.get_scale() == 8.0 and dst.scaler.get_growth_interval() == 3


def test_resume_refuses_other_method_settings(tmp_path):
    ag = make(out_dir=tmp_path)
    list(ag.train(2, progress=False))
    other = make(out_dir=tmp_path, reweighting="pairwise")
    with pytest.raises(ConfigError, match="reweighting"):
        other.resume()


def test_evaluate_calls_the_evaluation_module():
    from diffusion_rl.evaluation import EvalConfig

    ag = make()
    list(ag.train(2, progress=False))
    records = ag.evaluate(nfe=[1, 3], config=EvalConfig(n_samples=64, batch_size=64, float64=False))
    assert records and {r["nfe"] for r in records} == {1, 3}
    assert all(r["method"] == "td-edm" for r in records)


# ---- the environment's own trajectories feed the loss ----------------------------------------------------------------
def _until_first_done(batch):
    """The rows [B, :T] before any chain of the batch ends (T >= 1): where every producer has drawn the same."""
    done = batch["next", "done"].reshape(batch.batch_size).any(0)
    T = int(done.int().argmax()) + 1 if done.any() else batch.batch_size[1]
    return batch[:, :T]


@pytest.mark.parametrize("kw", [{}, {"estimator": "nstep", "n_steps": 2}, {"estimator": "td_lambda", "n_steps": 3}])
def test_rollout_and_collector_batches_feed_the_loss(kw):
    """agent.loss(env.rollout(...)) and a TorchRL collector's batch equal the loss on the same states drawn by the
    agent's own collect (up to the first end of an episode, after which rollouts and collectors start new ones)."""
    from torchrl.collectors import Collector

    from envs import single_action_policy

    n = kw.get("n_steps", 1)

    def agent(start="max", **extra):
        env = DiffusionMRP(toy_data(), "edm", batch_size=(16,), seed=7, start=start)
        torch.manual_seed(0)
        return TDEvaluator(env, denoiser=small_denoiser(env.formulation), config=TrainConfig(batch_size=16),
                           device="cpu", **{**kw, **extra})

    ref = agent().collect()
    assert ref.batch_size == ((16, n) if n > 1 else (16,))
    # the env's own rollout from a training reset (TorchRL's default: it stops at the first done)
    ag = agent()
    ro = ag.env.rollout(n, policy=single_action_policy, tensordict=ag.env.reset(start="train"), auto_reset=False)
    # a collector over an env whose resets start at the training levels
    ag_c = agent(start="train")
    collector = Collector(ag_c.env, single_action_policy, frames_per_batch=16 * n, total_frames=16 * n)
    batch = next(iter(collector))
    collector.shutdown()
    chains = ref if n > 1 else ref.unsqueeze(1)
    for other in (ro, batch):
        T = _until_first_done(other).batch_size[1]
        horizon = agent(**({"n_steps": T} if n > 1 else {}))  # the same estimator over the common rows
        expect = horizon.loss(chains[:, :T])
        got = horizon.loss(other[:, :T])
        for key in ("loss_td", "loss_base", "td_error", "valid"):
            torch.testing.assert_close(got[key], expect[key])
        assert torch.isfinite(objective(ag.loss(other)))  # and the whole batch trains
    # the plain env.rollout(n) from the env's own start trains too
    assert torch.isfinite(objective(agent().loss(agent().env.rollout(max(n, 2), policy=single_action_policy))))


def test_multistep_agents_draw_the_same_data_as_td0():
    """Training chains never start a new episode mid-chain: nstep, td_lambda and td0 agents with one env seed
    draw the same x0 and levels at every step (the baseline too, test_training.py)."""
    agents = []
    for kw in ({}, {"estimator": "nstep", "n_steps": 3}, {"estimator": "td_lambda", "n_steps": 2}):
        env = DiffusionMRP(toy_data(), "edm", batch_size=(64,), seed=11)
        agents.append(TDEvaluator(env, config=TrainConfig(batch_size=64), device="cpu", **kw))
    for _ in range(4):
        batches = [a.collect() for a in agents]
        starts = [b if b.batch_dims == 1 else b[:, 0] for b in batches]
        assert all(b["next", "done"].any() for b in batches[1:])  # chains do end mid-batch
        for s in starts[1:]:
            assert torch.equal(s["x0"], starts[0]["x0"]) and torch.equal(s["level"], starts[0]["level"])


def test_unbatched_rollouts_and_long_rollouts_keep_the_estimator():
    """A [T] rollout of an unbatched env is one chain (not T transitions), and a rollout longer than the
    estimator's horizon is cut at n_steps."""
    from envs import single_action_policy

    env = DiffusionMRP(toy_data(), "edm", seed=3)
    torch.manual_seed(0)
    ag = TDEvaluator(env, denoiser=small_denoiser(env.formulation), estimator="nstep", n_steps=2,
                     config=TrainConfig(batch_size=4), device="cpu")
    chains = env.sample_trajectories(6, 4)
    torch.testing.assert_close(ag.loss(chains)["td_error"], ag.loss(chains[:, :2])["td_error"])
    one = env.rollout(6, policy=single_action_policy, tensordict=env.reset(start="train"), auto_reset=False)
    assert one.batch_size[0] >= 1 and one.names[-1] == "time"
    out = ag.loss(one)
    assert out["valid"].shape == (1,) and out["td_error"].shape == (1, 2)
    torch.testing.assert_close(out["td_error"], ag.loss(one.unsqueeze(0))["td_error"])


def test_batches_missing_keys_are_named():
    ag = make()
    batch = ag.collect()
    with pytest.raises(ConfigError, match=r"\['x0'\]"):
        ag.loss(batch.exclude("x0"))
    with pytest.raises(ConfigError, match=r"\('next', 'reward'\)"):
        ag.loss(batch.exclude(("next", "reward")))


def test_set_keys_renames_what_the_loss_reads():
    ag = make()
    batch = ag.collect()
    ref = ag.loss(batch)
    ag.loss_module.set_keys(x0="clean", valid="td_valid")
    renamed = batch.rename_key_("x0", "clean").rename_key_("valid", "td_valid")
    torch.testing.assert_close(ag.loss(renamed)["loss_td"], ref["loss_td"])
    with pytest.raises(ValueError, match="not an accepted"):
        ag.loss_module.set_keys(obs="x")


# ---- consistency training: the CT control and the curriculum ------------------------------------------------------
def _ct(cls, formulation="ct", seed=0, **kw):
    env = DiffusionMRP(toy_data(), formulation, seed=seed)
    cfg = TrainConfig(batch_size=16, lr=1e-3, warmup_steps=0, log_every=5, seed=seed)
    return cls(env, denoiser=small_denoiser(env.formulation, seed), config=cfg, device="cpu", **kw)


@pytest.mark.parametrize("formulation", ["ct", "ict"])
def test_consistency_baseline_is_td_ct_without_the_td_term(formulation):
    """On the same pairs and target, the CT control's loss is the per-sample consistency loss TD-CT computes."""
    ct, td = _ct(ConsistencyBaseline, formulation, tau=0.0), _ct(TDEvaluator, formulation, tau=0.0)
    assert (ct.method, td.method) == (f"{formulation}-baseline", f"td-{formulation}")
    batch = ct.collect()
    torch.testing.assert_close(td.collect()["x"], batch["x"])  # one seed: the same draws
    out_ct, out_td = ct.loss(batch), td.loss(batch)
    torch.testing.assert_close(out_ct["sample_base"], out_td["sample_base"])
    torch.testing.assert_close(out_ct["loss_base"], out_td["sample_base"].mean())
    with pytest.raises(ConfigError, match="needs a consistency formulation"):
        _ct(ConsistencyBaseline, "edm")


def test_curriculum_grows_the_grid_and_a_resumed_run_matches(tmp_path):
    """The grid follows ict_grid_size(step, total) before each step, handed to the env, both critics and the loss
    alike (the denoiser's formulation is never edited); a run stopped at step 5 and resumed ends with the same
    weights as the uninterrupted one (the curriculum is recomputed from the step)."""
    full = _ct(TDEvaluator, "ict", tau=0.0)
    seen = []
    hook = full.use_grid
    users = lambda: (full.env.formulation, full.loss_module.formulation, full.critic.module.formulation,  # noqa: E731
                     full.target_critic.module.formulation)
    full.use_grid = lambda f: (hook(f), seen.append((f.steps, all(u is f for u in users()))))
    for _ in full.train(16, progress=False):
        pass
    assert seen == [(min(10 * 2 ** (k // 2), 1280) + 1, True) for k in range(16)]
    assert full.env.last_index == 1280.0 and full.formulation.steps == 11 and "steps" not in full.formulation.config()

    cut = _ct(TDEvaluator, "ict", tau=0.0)
    cut.out_dir = tmp_path
    for _ in cut.train(16, progress=False):
        break  # stopped after the first log line (step 5): the checkpoint is written
    resumed = _ct(TDEvaluator, "ict", tau=0.0)
    resumed.out_dir = tmp_path
    resumed.resume()
    assert resumed.step == 5
    for _ in resumed.train(16, progress=False):
        pass
    for a, b in zip(params(full.denoiser), params(resumed.denoiser)):
        torch.testing.assert_close(a, b)


def test_coupling_schedule_switches_env_critics_and_loss_together():
    """shared_until=0.5 of 8 steps: shared coupling for steps 0-3, the env's Markov coupling from step 4 on."""
    ag = make(shared_until=0.5)
    seen = []
    step = ag.update
    ag.update = lambda batch, **kw: (seen.append((ag.env.coupling, ag.loss_module.coupling, ag.critic.module.coupling,
                                                  ag.target_critic.module.coupling)), step(batch, **kw))[1]
    for _ in ag.train(8, progress=False):
        pass
    assert [c[0] for c in seen] == ["shared"] * 4 + ["markov"] * 4 and all(len(set(c)) == 1 for c in seen)
    assert ag.method_config()["coupling"] == "markov" and ag.method_config()["shared_until"] == 0.5
    with pytest.raises(ConfigError, match="already 'shared'"):
        make(coupling="shared", shared_until=0.5)
