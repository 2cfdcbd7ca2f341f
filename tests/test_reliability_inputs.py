"""Reliability, round three, group 4: no silent replacement, no raw errors. Options a network would ignore are
refused and a given depth is built as given; the Gymnasium adapter and the TorchRL env refuse bad options, devices,
actions and rollout lengths with a ConfigError; corrupt checkpoints, absurd weights and too-small data sets end in
one line with exit code 2, non-finite samples in one line with exit code 1 and nothing written; diagnose protects
its outputs; a refused command leaves no new folder; data is identified by content (evaluate, diagnose, resume)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import file_times
from diffusion_rl.cli import main
from diffusion_rl.errors import ConfigError

MOONS = ["--data", "moons", "--batch-size", "16", "--no-progress"]


def labelled_npz(path: Path, n: int, seed: int = 0) -> Path:
    """n 8x8 gray images in two classes."""
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), labels=np.arange(n) % 2)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step baseline on moons and a 2-step one on 16 labelled images (shared by the cases that need one)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["train", *MOONS, "--steps", "6", "--no-eval", "--out", str(root / "moons")]) == 0
    data = labelled_npz(root / "lab.npz", 16)
    assert main(["train", "--data", str(data), "--batch-size", "8", "--steps", "2", "--no-eval", "--no-progress",
                 "--out", str(root / "img")]) == 0
    return root


def _edited_checkpoint(trained: Path, tmp: Path, name: str, edit) -> str:
    ck = torch.load(trained / "moons" / "edm-baseline" / "checkpoint.pt", weights_only=True)
    edit(ck)
    torch.save(ck, tmp / name)
    return str(tmp / name)


def _nan_weights(ck: dict) -> None:
    ck["ema"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ck["ema"].items()}


def _case_setup(name: str, tmp: Path, trained: Path) -> list[str]:
    """Build what a case needs on disk; returns its argv. Outputs go to folders that do not exist yet."""
    ckpt = str(trained / "moons" / "edm-baseline" / "checkpoint.pt")
    new = tmp / "new" / "out"
    if name == "one_image":
        np.savez(tmp / "one.npz", images=np.zeros((1, 8, 8), np.uint8))
        return ["train", "--data", str(tmp / "one.npz"), "--batch-size", "4", "--steps", "2", "--no-progress",
                "--n-samples", "10", "--nfe-grid", "1", "--out", str(new)]
    if name == "two_images":  # the feature net's part has one image, which its hold-out takes
        labelled_npz(tmp / "two.npz", 2)
        return ["train", "--data", str(tmp / "two.npz"), "--batch-size", "4", "--steps", "2", "--no-progress",
                "--n-samples", "10", "--nfe-grid", "1", "--out", str(new)]
    if name == "evaluate_two_images":  # refused inside the locked --out: the folder goes again
        labelled_npz(tmp / "two.npz", 2)
        assert main(["train", "--data", str(tmp / "two.npz"), "--batch-size", "4", "--steps", "2", "--no-eval",
                     "--no-progress", "--out", str(tmp / "run")]) == 0
        return ["evaluate", "--checkpoint", str(tmp / "run" / "edm-baseline" / "checkpoint.pt"), "--n-samples", "10",
                "--nfe-grid", "1", "--out", str(new)]
    if name.startswith("step_text_"):
        bad = _edited_checkpoint(trained, tmp, "step.pt", lambda ck: ck.update(step="six"))
        return _reader(name.removeprefix("step_text_"), bad, tmp)
    if name.startswith("network_list_"):
        bad = _edited_checkpoint(trained, tmp, "net.pt", lambda ck: ck["config"].update(network=[32, 2]))
        return _reader(name.removeprefix("network_list_"), bad, tmp)
    if name.startswith("nan_"):
        return _reader(name.removeprefix("nan_"), _edited_checkpoint(trained, tmp, "nan.pt", _nan_weights), tmp)
    if name == "diagnose_existing":
        (tmp / "dg").mkdir()
        (tmp / "dg" / "diagnose.json").write_text('{"earlier": true}')
        return ["diagnose", "--checkpoint", ckpt, "--n", "8", "--out", str(tmp / "dg")]
    if name == "diagnose_swapped":
        return ["diagnose", "--checkpoint", ckpt, "--n", "8", "--data", "8gaussians", "--out", str(new)]
    if name == "evaluate_swapped":
        return ["evaluate", "--checkpoint", ckpt, "--data", "8gaussians", "--nfe-grid", "3", "--out", str(new)]
    if name == "diagnose_other_shape":
        return ["diagnose", "--checkpoint", ckpt, "--data", str(trained / "lab.npz"), "--out", str(new)]
    if name == "evaluate_missing":
        return ["evaluate", "--checkpoint", str(tmp / "none.pt"), "--out", str(new)]
    if name == "evaluate_heun_even":
        return ["evaluate", "--checkpoint", ckpt, "--sampler", "heun", "--nfe-grid", "2", "--out", str(new)]
    if name == "diagnose_missing":
        return ["diagnose", "--checkpoint", str(tmp / "none.pt"), "--out", str(new)]
    raise KeyError(name)


def _reader(command: str, checkpoint: str, tmp: Path) -> list[str]:
    """The argv of `command` (sample, evaluate, diagnose) reading `checkpoint`, writing under a new folder."""
    if command == "sample":
        return ["sample", "--checkpoint", checkpoint, "--n", "8", "--nfe", "3", "--out", str(tmp / "new" / "s.npz")]
    if command == "evaluate":
        return ["evaluate", "--checkpoint", checkpoint, "--nfe-grid", "3", "--out", str(tmp / "new" / "out")]
    return ["diagnose", "--checkpoint", checkpoint, "--n", "8", "--out", str(tmp / "new" / "out")]


BAD = [  # (case, argv or a setup name, exit code, what the message must name)
    # 1. options the MLP of a 2-D data set would ignore
    ("channel-mult on moons", ["train", *MOONS, "--channel-mult", "2,2"], 2,
     "--channel-mult applies to the UNet of image data; the MLP of the 2-D data set 'moons' would ignore it"),
    ("attention on moons", ["train", *MOONS, "--attention", "16"], 2, "--attention applies to the UNet"),
    ("skip-scale on moons", ["train", *MOONS, "--skip-scale", "0.7071"], 2, "--skip-scale applies to the UNet"),
    ("cifar10 preset on moons", ["train", *MOONS, "--preset", "cifar10"], 2,
     "--channel-mult (from --preset cifar10), --attention (from --preset cifar10), --skip-scale (from --preset "
     "cifar10) applies to the UNet"),
    ("depth -1", ["train", *MOONS, "--depth", "-1"], 2, "depth must be a positive integer, got -1"),
    # 3. raw errors of exit 1 that are bad input
    ("one-image data set, eval on", "one_image", 2, "splitting 1 images"),
    ("two-image data set, eval on", "two_images", 2, "too few to train the FID classifier"),
    ("evaluate a two-image data set", "evaluate_two_images", 2, "too few to train the FID classifier"),
    ("sample: step as text", "step_text_sample", 2, "is corrupt: its step 'six' is not an integer >= 0"),
    ("evaluate: step as text", "step_text_evaluate", 2, "its step 'six' is not an integer"),
    ("diagnose: step as text", "step_text_diagnose", 2, "its step 'six' is not an integer"),
    ("sample: network config a list", "network_list_sample", 2,
     "is corrupt: its network config is a list, not a dict"),
    ("evaluate: network config a list", "network_list_evaluate", 2, "its network config is a list"),
    ("diagnose: network config a list", "network_list_diagnose", 2, "its network config is a list"),
    ("base-lambda 1e308", ["train", *MOONS, "--method", "td", "--base-lambda", "1e308"], 2,
     "base_lambda must be in [0.0, 1000000.0], got 1e+308"),
    ("base-lambda inf", ["train", *MOONS, "--method", "td", "--base-lambda", "inf"], 2,
     "base_lambda must be a finite number >= 0"),
    ("base-lambda nan", ["train", *MOONS, "--method", "td", "--base-lambda", "nan"], 2,
     "base_lambda must be a finite number >= 0"),
    ("diagnose NaN weights", "nan_diagnose", 2, "holds non-finite weights"),
    ("evaluate NaN weights", "nan_evaluate", 2, "holds non-finite weights"),
    # 4. non-finite samples: a failure of the run, exit 1, nothing written
    ("sample NaN weights", "nan_sample", 1, "produced non-finite values in 8 of 8 samples (100%)"),
    # 5. diagnose's outputs are protected; refused commands leave no folder (every case checks that)
    ("diagnose over its outputs", "diagnose_existing", 2,
     "holds diagnose.json from an earlier diagnose; pass --overwrite"),
    ("evaluate a missing checkpoint", "evaluate_missing", 2, "does not exist"),
    ("evaluate heun at an even NFE", "evaluate_heun_even", 2, "unreachable by heun"),
    ("diagnose a missing checkpoint", "diagnose_missing", 2, "is not a file"),
    ("diagnose on data of another shape", "diagnose_other_shape", 2, "has samples of shape (1, 8, 8)"),
    # 6. argument errors: one line
    ("steps nan", ["train", *MOONS, "--steps", "nan"], 2, "argument --steps: invalid int value: 'nan'"),
    ("unknown option", ["train", *MOONS, "--stepz", "3"], 2, "unrecognized arguments: --stepz 3"),
    # 7. data identity by content
    ("diagnose on swapped data", "diagnose_swapped", 2, "content hash"),
    ("evaluate on swapped data", "evaluate_swapped", 2, "content hash"),
]
# train builds its evaluator after it has locked --out (so a second run into a folder fits no feature net): these
# refusals leave that new folder, holding the library's manifest but no checkpoint, log, results or samples
KEEP_OUT = ("one-image data set, eval on", "two-image data set, eval on")


def _tree(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case,argv,code,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_leaves_nothing(case, argv, code, needle, tmp_path, trained, refused):
    if isinstance(argv, str):
        argv = _case_setup(argv, tmp_path, trained)
    elif "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "new" / "out")]
    before, runs = _tree(tmp_path), file_times(trained)
    refused(argv, code, needle, argparse_exit=True)
    after = _tree(tmp_path)
    if case in KEEP_OUT:
        assert not [p for p in set(after) - set(before) if p.suffix in (".pt", ".jsonl", ".json", ".png", ".npz")]
    else:
        assert after == before, sorted(map(str, set(after) ^ set(before)))  # no new folder, no file written
    assert runs == file_times(trained)


# ---- 1. a given depth is built and recorded as given -----------------------------------------------------------------
@pytest.mark.parametrize("extra,depth", [([], 2), (["--depth", "1"], 1), (["--depth", "3"], 3)])
def test_the_mlp_is_built_with_the_depth_given(extra, depth, tmp_path):
    from diffusion_rl.checkpoints import load_denoiser

    assert main(["train", *MOONS, "--steps", "2", "--no-eval", "--out", str(tmp_path), *extra]) == 0
    denoiser, cfg = load_denoiser(tmp_path / "edm-baseline" / "checkpoint.pt")
    assert cfg["network"]["depth"] == depth and len(denoiser.net.blocks) == depth


def test_build_network_defaults_and_given_depths():
    from diffusion_rl.networks import build_network

    assert build_network((2,)).config["depth"] == 2  # the MLP's default
    assert build_network((1, 8, 8)).config["depth"] == 1  # one block per UNet level
    assert build_network((2,), depth=1).config["depth"] == 1
    assert build_network((1, 8, 8), depth=2).config["depth"] == 2


# ---- 2. the Gymnasium adapter and the TorchRL env --------------------------------------------------------------------
def _gym(start: str = "max"):
    from envs import DiffusionMRPGym

    return DiffusionMRPGym("moons", start=start, seed=0)


def _env(batch=(), device="cpu"):
    from envs import DiffusionMRP

    return DiffusionMRP("moons", batch_size=batch, seed=0, device=device)


def _step_with_action(batch, action_shape):
    env = _env(batch)
    td = env.reset()
    return env.step(td.set("action", torch.zeros(action_shape, dtype=torch.int64)))


def _step_other_batch():
    from envs import single_action_policy

    env = _env((4,))
    return env.step(single_action_policy(env.reset()[:3]))


ENV_BAD = [  # (case, what raises, what the message must name)
    ("reset start bogus", lambda: _gym().reset(options={"start": "bogus"}),
     "unknown reset option start 'bogus'; accepted: max, random"),
    ("reset unknown option", lambda: _gym().reset(options={"begin": "max"}),
     "unknown reset option 'begin'; accepted: start"),
    ("reset at training levels on a max env", lambda: _gym().reset(options={"start": "train"}),
     "unknown reset option start 'train'; accepted: max, random"),
    ("reset options not a dict", lambda: _gym().reset(options=["start"]), "reset options must be a dict or None"),
    ("device gpu", lambda: _env(device="gpu"), "unknown device 'gpu'; accepted: auto, cpu, cuda"),
    ("action [3] on batch []", lambda: _step_with_action((), (3,)),
     "action of shape [3] does not fit the batch []; accepted shape []"),
    ("action [4, 1] on batch [4]", lambda: _step_with_action((4,), (4, 1)),
     "action of shape [4, 1] does not fit the batch [4]; accepted shape [4]"),
    ("tensordict of batch [3] on an env of batch [4]", _step_other_batch,
     "env.step got a tensordict of batch [3]; this env's batch is [4]: accepted [4]"),
    ("rollout 0", lambda: _env().rollout(0), "max_steps must be a positive integer, got 0"),
    ("rollout -1", lambda: _env().rollout(-1), "max_steps must be a positive integer, got -1"),
]


@pytest.mark.parametrize("case,call,needle", ENV_BAD, ids=[b[0] for b in ENV_BAD])
def test_env_refuses_bad_input_with_a_config_error(case, call, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        call()
    assert len(str(e.value).splitlines()) == 1


def test_gym_reset_options_choose_the_start():
    gym_env = _gym()
    assert gym_env.reset(options={"start": "max"})[0]["index"][0] == 0.0
    assert gym_env.reset(options={"start": "random"})[0]["index"][0] > 0.0
    assert _gym("train").reset(options={"start": "train"})[0]["level"].shape == (1,)


def test_rollouts_and_steps_of_the_right_shapes_still_run():
    from envs import single_action_policy

    assert _env().rollout(1, single_action_policy).batch_size == torch.Size([1])
    assert _env((4,)).rollout(2, single_action_policy).batch_size == torch.Size([4, 2])
    assert _step_with_action((4,), (4,))["next", "x"].shape == (4, 2)


# ---- 5. diagnose replaces its outputs only when told -----------------------------------------------------------------
def test_diagnose_overwrite_replaces_its_outputs(trained, tmp_path):
    ckpt = str(trained / "moons" / "edm-baseline" / "checkpoint.pt")
    argv = ["diagnose", "--checkpoint", ckpt, "--n", "8", "--out", str(tmp_path / "dg")]
    assert main(argv) == 0
    (tmp_path / "dg" / "diagnose.json").write_text("{}")
    assert main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "dg" / "diagnose.json").read_text() != "{}"


# ---- 7. data identity by content -------------------------------------------------------------------------------------
def test_the_same_bytes_at_a_new_path_are_the_same_data(trained, tmp_path, capsys):
    """evaluate and diagnose take --data and check its content; resume continues on the same bytes moved, with a
    note on stderr."""
    moved = shutil.copy(trained / "lab.npz", tmp_path / "moved.npz")
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "img", run_dir)
    ckpt = str(run_dir / "edm-baseline" / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(moved), "--n-samples", "10", "--nfe-grid", "1",
                 "--out", str(tmp_path / "ev")]) == 0
    assert main(["diagnose", "--checkpoint", ckpt, "--data", str(moved), "--n", "8",
                 "--out", str(tmp_path / "dg")]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"is read from .*moved\.npz' now: the same content"):  # stderr under the CLI
        assert main(["train", "--data", str(moved), "--batch-size", "8", "--steps", "3", "--no-eval", "--no-progress",
                     "--resume", "--out", str(run_dir)]) == 0
    assert "resuming edm-baseline at step 2" in capsys.readouterr().err
    assert torch.load(ckpt, weights_only=True)["config"]["dataset"] == str(moved)
