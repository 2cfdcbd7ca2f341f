"""Compare methods over seeds: FID (or SW2) across NFE, mean and spread, written as JSON with its command.

    python -m benchmarks.compare --variants baseline td --seeds 0 1 2 --steps 1500 \
        --out benchmarks/results/digits_td_vs_edm.json

A variant is `baseline`, `td`, `tdoff`, or `method:key=value,key=value` with keys of `diffusion_rl.config.Args`,
e.g. `td:estimator=td_lambda,n_steps=3`, `td:coupling=shared`, `td:reweighting=none`, `td:stride=6`
(`benchmarks.variant.Variant` parses it). `tdoff:stride=6` is `td:stride=6`'s matched control: the same batches,
TD-valid mask and base-loss weights without the TD term (method.md §5.5); `td:estimator=nstep,n_steps=2,
full_reach=true` and `td:stride=6` (at stride 3) are an equal-reach pair (method.md §7).
Every variant sees the same seeds, budget, data order (each run's env is seeded with its seed) and evaluation
protocol. The table prints mean +- std over seeds; nothing is hidden when TD loses.

Resumable: each (variant, seed) result is written to --out as soon as it finishes, and a restarted command skips
the pairs already there (it refuses a file made with other settings or by another code version: one file, one
commit). Every record carries its run's settings and the commit. A run whose training diverges (a non-finite loss)
is recorded as such, its main metric nan at every solver and NFE with `diverged_at_step` and the error, and the
grid goes on: restarting it would diverge again from the same checkpoint.

`--samplers default,dpmpp_2m,ipndm` scores every trained model under each solver (same samples' seed, same
budgets): rows are labelled `variant @solver` ("default" is the family's Heun, Euler at even NFE), so a table shows
whether TD's few-step gain survives a stronger solver.

`--order seed` (default) runs every variant at one seed before the next seed, so an unfinished grid compares all
variants on the same seeds; `--order variant` runs every seed of a variant before the next variant, so an unfinished
grid has its first variants (the baseline and TD(0) first) at all seeds. Both fill the same file.

`--score-at 750,1500,3000` also scores every run on its way to --steps, at those step counts: one training per
seed gives a budget curve. Every result, the one at --steps included, is labelled as the separate run it equals
('baseline:steps=750', ..., 'baseline:steps=6000'; the global random state is restored after each scoring, so the
rest of training is unchanged) and written as it finishes; a restarted run skips the scoring of the budgets it has
scored (and, with --keep-models below, their training too: it resumes from its last checkpoint).

`--sample-grids DIR` also saves, for every run, a PNG of the first 64 evaluation samples per solver and NFE, as
DIR/<variant>/seed<S>/<solver>/samples/<method>_nfe<NFE>.png (the same samples that were scored).

`--keep-models DIR` also saves every run's final checkpoint as DIR/<variant>/seed<S>/checkpoint.pt (the variant as
its sample-grid folder name, e.g. td@stride=6), so a new solver or budget can be scored later without retraining,
by `--from-models` below or by `diffusion-rl evaluate --checkpoint CHECKPOINT --seed S --n-samples N --nfe-grid G
--device D [--sampler X]`. The latter gives the grid's records for a solver the grid used (tested; --sampler left
out for 'default'; D the grid's device, since the samples' noise is drawn there; image data, or seed 0 for the 2-D
toys, whose data follows the seed). With --score-at only the final budget's model is kept.
Each run also trains in that folder with the Learner's checkpoints on its way (by default every 250 steps and every
5 minutes), so a run killed midway resumes from its last checkpoint, exactly (tested, with and without --score-at:
the budgets scored before the kill are skipped, not retrained; its records then carry resumed_at_step, and
train_seconds the whole run's training time, before and after the resume; null for a checkpoint made before
checkpoints kept it). A run whose checkpoint is past a --score-at budget that --out has no result for (a new --out
on a kept folder) is retrained from step 0. Without --keep-models a killed run starts again from step 0.
Each kept folder holds a run.json naming the code version and steps that train it; a command of other code or
another --steps refuses, before any training, a folder that holds a checkpoint of other code or budget (or one with
no run.json): it would continue it into a run of neither version.

`--from-models DIR` scores the models a `--keep-models DIR` grid kept instead of training: the same command with
other `--samplers` (or budgets) and another `--out` gives the same records for the solvers the grid used and new
ones for the rest. Each checkpoint must be the run its folder names (the learner's config check refuses another
variant or seed) and trained for --steps; runs with no kept model, or one still short of --steps (a killed or
running run), are named and skipped. Their records carry trained_code, the code that trained the model (from its
run.json; null where it has none), beside code, the scoring code.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import TypeVar

from diffusion_rl.build import check_command, make_learner, plan
from diffusion_rl.config import LPIPS_RECIPES, Args, check_seed, parse_nfe_grid, preset_names
from diffusion_rl.data import load_dataset
from diffusion_rl.errors import ConfigError
from diffusion_rl.evaluation import EvalConfig, Evaluator
from diffusion_rl.training import NonFiniteLossError

from .grid import ResultGrid, run_key, summarise
from .variant import Variant

T = TypeVar("T")

# the settings every record carries as fields (issue: records must not rest on a variant label alone)
SETTING_FIELDS = ("data", "formulation", "method", "estimator", "stride", "one_step", "n_steps", "lmbda", "full_reach",
                  "coupling", "reweighting", "base_lambda", "target_tau", "target_halflife_images", "target_rampup",
                  "shared_until", "steps", "batch_size", "lr", "optimizer", "warmup_steps", "ema_halflife_images",
                  "width", "depth", "dropout", "channel_mult", "attention", "skip_scale", "hflip", "conditional",
                  "seed", "device")
RUN_FILE = "run.json"  # beside a kept checkpoint: the code, budget, variant and seed that trained it


# Args fields the grid sets for every run (or that a grid run never reads): a variant may not set them
GRID_KEYS = ("method", "data", "seed", "n_samples", "nfe_grid", "features", "inception_weights", "eval", "out",
             "resume", "overwrite", "progress", "tensorboard")


def parse_variant(label: str, base: Args) -> tuple[Variant, Args]:
    """'td:estimator=nstep,n_steps=2' -> (its Variant, Args with those overrides); bad keys or values, and keys the
    grid itself sets (GRID_KEYS: the data, seeds, evaluation), raise ConfigError."""
    variant = Variant.parse(label)
    grid_set = [k for k in variant.given if k in GRID_KEYS]
    if grid_set:
        raise ConfigError(f"variant {label!r} sets {', '.join(grid_set)}, which the grid sets for every run (give "
                          f"--data, --seeds, --n-samples, --nfe-grid instead); a variant may set any other Args field")
    args = variant.args(base)
    moved = [k for k in GRID_KEYS if k != "method" and getattr(args, k) != getattr(base, k)]
    if moved:  # a preset may carry grid settings (cifar10 names its data): the grid's own win, or it says so
        raise ConfigError(f"variant {label!r} changes {', '.join(moved)} through its preset, which the grid sets for "
                          f"every run; give them to the grid instead")
    return variant, args


def run_order(seeds: list[int], variants: list[T], order: str) -> list[tuple[int, T]]:
    """The (seed, variant) runs of a grid: seed by seed ('seed') or every seed of a variant first ('variant')."""
    if order == "variant":
        return [(seed, v) for v in variants for seed in seeds]
    return [(seed, v) for seed in seeds for v in variants]


def code_version(root: Path | None = None) -> str:
    """The git commit of the checkout at `root` (this one by default), with '+dirty-<hash>' when tracked files other
    than benchmarks/results/ differ from it, the hash that of the changed files' names and contents (so two different
    uncommitted trees on one commit read apart, whatever anyone's git diff settings); 'unknown (no git checkout)'
    outside git. Each record names the code that made it, and a grid file holds one version."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1] if root is None else root
    try:
        git = lambda *cmd: subprocess.run(["git", *cmd], cwd=root, capture_output=True, timeout=10,  # noqa: E731
                                          check=True).stdout.decode()
        head = git("rev-parse", "--short=12", "HEAD").strip()
        top = Path(git("rev-parse", "--show-toplevel").strip())
        changed = git("diff", "HEAD", "--name-only", "-z", "--no-renames", "--", ".", ":!benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout)"
    if not changed:
        return head
    h = hashlib.sha256()
    for name in sorted(n for n in changed.split("\0") if n):
        path = top / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"(deleted)") + b"\0")
    return f"{head}+dirty-{h.hexdigest()[:8]}"


def run_settings(learner, args: Args) -> dict:
    """The run's full settings as record fields (the learner's resolved values where it has them)."""
    s = {k: getattr(args, k) for k in SETTING_FIELDS}
    s["train_precision"] = args.precision  # a record's own "precision" is the sampler's autocast (EvalConfig)
    device = str(learner.device)
    if learner.device.type == "cuda":  # name the card: timings and numerics depend on it
        import torch

        device += f" ({torch.cuda.get_device_name(learner.device)})"
    s.update(method=learner.method, device=device, stride=None, one_step=None, coupling=None)
    mc = learner.method_config()
    for k in ("estimator", "stride", "one_step", "n_steps", "lmbda", "coupling", "reweighting"):
        s[k] = mc.get(k)
    s["full_reach"] = mc.get("full_reach", False) if mc.get("estimator") else None
    for k in ("base_lambda", "shared_until"):  # TD's own settings: no baseline has them (CT's has a target)
        if k not in mc:
            s[k] = None
    if not mc:  # the baseline has no TD settings
        s.update(target_tau=None, target_halflife_images=None, target_rampup=None)
    elif args.target_halflife_images or args.target_rampup:
        s.update(target_tau=None)
    form = learner.formulation
    if form.consistency:  # method.md §10.1-§10.4: the TD-CT choices, and the optimiser of the release's recipes
        s.update(preset=args.preset or None, ct_loss={
            k: v for k, v in form.config().items() if k in ("kappa", "boundary", "weight", "distance", "grid")},
            ct_steps=getattr(form, "max_steps", form.steps), ct_target=mc.get("ct_target"),
            target_tau_schedule=mc.get("tau_schedule"))
        if mc.get("tau_schedule"):
            s.update(target_tau=None)
        if set(preset_names(args.preset)) & set(LPIPS_RECIPES) and not form.distance.name.startswith("lpips"):
            s["lpips_substitute"] = f"{form.distance.name} in place of the release's LPIPS (no LPIPS weights here)"
    return s


def table(summary: list[dict], metric: str) -> str:
    rows = [s for s in summary if s["metric"] == metric]
    nfes = sorted({s["nfe"] for s in rows})
    lines = [f"{'variant':<42}" + "".join(f"{'NFE ' + str(n):>16}" for n in nfes)]
    for v in dict.fromkeys(s["variant"] for s in rows):
        cell = {s["nfe"]: f"{s['mean']:.2f} +- {s['std']:.2f}" for s in rows if s["variant"] == v}
        lines.append(f"{v:<42}" + "".join(f"{cell.get(n, '-'):>16}" for n in nfes))
    return "\n".join(lines)


def score_run(learner, args: Args, evaluators: dict, variant: Variant, sample_dir: Path | None) -> list[dict]:
    """The records of `learner`'s EMA network at its current step under each solver's Evaluator, labelled with
    `variant` on that solver and carrying the run's settings.

    The global random state is restored afterwards, so scoring mid-run leaves the rest of training (dropout draws)
    as it would have been without it."""
    import torch

    fields = dict(run_settings(learner, args), steps=learner.step)
    recs = []
    on_cpu = learner.device.type == "cpu"  # the CPU state is always restored; an accelerator's when it trains there
    with torch.random.fork_rng(devices=[] if on_cpu else [learner.device],
                               device_type=None if on_cpu else learner.device.type):
        for name, evaluator in evaluators.items():
            sweep = evaluator.sweep(learner.ema, learner.method, learner.step,
                                    None if sample_dir is None else sample_dir / name, learner.device, progress=False)
            for r in sweep:
                r.update(fields, variant=variant.on_solver(name).label)
            recs += sweep
    return recs


def kept_model(folder: str | Path, variant: Variant, seed: int) -> Path:
    """Where `--keep-models folder` keeps the final checkpoint of the run (variant, seed)."""
    return Path(folder) / variant.folder() / f"seed{seed}" / "checkpoint.pt"


def write_run_file(folder: Path, version: str, steps: int, variant: Variant, seed: int) -> None:
    """Record beside a kept checkpoint what trains it (the code version and total steps), so that no later command
    continues it with other code or another budget (`check_kept_folders`) and a rescoring names the code that trained
    it."""
    import json

    from diffusion_rl.runs import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / RUN_FILE, json.dumps({"code": version, "steps": steps, "variant": variant.label,
                                                     "seed": seed}, indent=1))


def read_run_file(folder: Path) -> dict | None:
    """The RUN_FILE of a kept folder; None where there is none (kept by an older version of this script)."""
    import json

    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        made = json.loads(path.read_text())
    except ValueError:
        made = None
    if not isinstance(made, dict):
        raise ConfigError(f"{path} is not a run record (a JSON object naming code and steps); delete that folder "
                          "or restore the file")
    return made


def check_kept_folders(folder: str, planned: list[tuple[int, tuple[Variant, Args]]], version: str) -> None:
    """ConfigError naming every run of `planned` whose --keep-models folder holds a checkpoint that this command
    would continue although another code version or budget trained it, or that does not say which (a run that
    neither version would give)."""
    bad = []
    for seed, (variant, args) in planned:
        run_dir = kept_model(folder, variant, seed).parent
        if not (run_dir / "checkpoint.pt").is_file():
            continue
        made = read_run_file(run_dir)
        if made is None:
            bad.append(f"{run_dir} (no {RUN_FILE}: which code trained it is unknown)")
        elif (made.get("code"), made.get("steps")) != (version, args.steps):
            bad.append(f"{run_dir} (trained by code {made.get('code')} for {made.get('steps')} steps)")
    if bad:
        raise ConfigError(f"--keep-models {folder!r} holds checkpoints that this command (code {version}) would "
                          f"continue or keep: {'; '.join(bad)}; a resumed run must be one code version and one "
                          "budget: use another --keep-models folder, or run the code that made them")


def load_kept(folder: str | Path, variant: Variant, args: Args, dataset):
    """A learner holding the kept model of the run `args` describes (seed set); ConfigError when the checkpoint is
    another run's (the learner's config check) or was trained for another number of steps."""
    learner = make_learner(args, dataset=dataset)
    learner.out_dir = None
    path = kept_model(folder, variant, args.seed)
    learner.resume(path)
    if learner.step != args.steps:
        if learner.step < args.steps and (read_run_file(path.parent) or {}).get("steps") == args.steps:
            raise UnfinishedModel(f"{path} is at step {learner.step} of {args.steps}: its run has not finished")
        raise ConfigError(f"{path} was trained for {learner.step} steps, the grid's runs for {args.steps}")
    return learner


class UnfinishedModel(ConfigError):
    """A kept folder's checkpoint is a run still training toward --steps (killed, or running in another worker)."""


def check_score_at(text: str, steps: int, variants: list[tuple[Variant, Args]]) -> list[int]:
    """The step counts of `--score-at` (increasing, each below --steps); ConfigError for bad values, and for
    variants that set their own steps or whose training follows the run's total (a curriculum, a coupling
    schedule), which a run scored on its way would not equal."""
    try:
        budgets = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--score-at {text!r} must be comma-separated step counts, e.g. 750,1500") from None
    bad = [b for b in budgets if not 0 < b < steps]
    if bad:
        raise ConfigError(f"--score-at {bad} must lie in [1, {steps - 1}] (below --steps {steps})")
    for variant, args in variants if budgets else ():
        if "steps" in variant.given:
            raise ConfigError(f"variant {variant.label!r} sets its own steps; with --score-at every variant trains "
                              "for --steps and is scored on its way")
        if plan(args).mrp.formulation.scheduled:
            raise ConfigError(f"variant {variant.label!r} follows a curriculum over the run's total steps, so a run "
                              "scored on its way does not equal a shorter run; --score-at cannot score it")
        if args.method != "baseline" and args.shared_until:
            raise ConfigError(f"variant {variant.label!r} switches coupling at a fraction of the run's total steps, "
                              "so a run scored on its way does not equal a shorter run; --score-at cannot score it")
    return budgets


def parse_command(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["baseline", "td"], help="variants (see the module docstring)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds, shared by every variant")
    p.add_argument("--data", default="digits", help="data set")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every run")
    p.add_argument("--n-samples", type=int, default=1000, help="evaluation samples per NFE")
    p.add_argument("--nfe-grid", default="1,2,3,5,9,17,35", help="evaluation NFE budgets")
    p.add_argument("--samplers", default="default",
                   help="comma-separated solvers to score every model with (default: the family's own)")
    p.add_argument("--out", default="benchmarks/results/compare.json", help="the JSON written after every run")
    p.add_argument("--sample-grids", default=None, metavar="DIR",
                   help="also save each run's evaluation samples as PNG grids under DIR (per variant, seed, solver)")
    p.add_argument("--keep-models", default=None, metavar="DIR",
                   help="also save each run's final checkpoint as DIR/<variant>/seed<S>/checkpoint.pt (to score it "
                        "later under other solvers with `diffusion-rl evaluate`, without retraining)")
    p.add_argument("--from-models", default=None, metavar="DIR",
                   help="score the checkpoints a --keep-models DIR grid kept instead of training (no --score-at)")
    p.add_argument("--score-at", default="", metavar="STEPS",
                   help="also score every run at these step counts on its way to --steps (comma-separated): one "
                        "training per seed gives a budget curve, labelled like separate runs ('baseline:steps=750')")
    p.add_argument("--order", choices=("seed", "variant"), default="seed",
                   help="run the grid seed by seed (default) or variant by variant (all seeds of one first)")
    p.add_argument("--ground-truth", action="store_true",
                   help="also score every run against the exact mixture of a gmm: data set (docs/groundtruth.md): "
                        "per-level denoiser and consistency errors, and per solver and NFE the solver's and the "
                        "network's part of the error to the exact ODE solution and distribution metrics")
    return p.parse_args(argv)


GT_SAMPLES = 500  # samples of each ground-truth measurement (groundtruth.md §6)


def ground_truth_records(learner, dataset, variant: Variant, samplers: list[str], nfe_grid: tuple[int, ...],
                         seed: int) -> list[dict]:
    """Records of `learner`'s EMA network against the data set's exact mixture (groundtruth.md §5): per solver and
    NFE the distance of its samples to the exact ODE solution from the same start noise ("gt_error"), split into the
    solver's part (the exact denoiser under the same solver) and the network's, and the samples' distribution metrics;
    per level (as curves, with their means as values) the error against the exact posterior mean and the error of the
    network's multi-step progress along exact trajectories (the quantity TD is meant to shrink)."""
    from diffusion_rl.groundtruth import ground_truth_report
    from diffusion_rl.samplers import sampler_for_nfe

    # one report per run: the level curves and the exact ODE solve once, every (grid solver, NFE) cell beside them
    names = [(name, sampler_for_nfe(learner.formulation, nfe, None if name == "default" else name), nfe)
             for name in samplers for nfe in nfe_grid]
    levels = ground_truth_report(learner.ema, dataset, cells=[(real, nfe) for _, real, nfe in names], n=GT_SAMPLES,
                                 seed=seed)
    recs = []
    for (name, real, nfe), cell in zip(names, levels["solvers"]):
        dist = cell["distribution"]
        values = {"gt_error": cell["total"], "gt_solver_error": cell["solver"], "gt_network_error": cell["network"],
                  "gt_loglik_gap": dist["loglik_gap"], "gt_mode_tv": dist["mode_tv"], "gt_frechet": dist["frechet"]}
        recs += [{"variant": variant.on_solver(name).label, "sampler": real, "nfe": nfe, "metric": m,
                  "value": float(v)} for m, v in values.items()]
    for metric, curve in (("gt_denoiser_error", levels["denoiser_error"]),
                          ("gt_consistency_error", levels["consistency_error"])):
        recs.append({"variant": variant.label, "sampler": None, "nfe": None, "metric": metric,
                     "value": float(sum(curve["error"]) / len(curve["error"])), "by_level": curve})
    return [dict(r, dataset=dataset.name, n_samples=GT_SAMPLES, seed=seed, truth=levels["truth"]) for r in recs]


@dataclass
class Grid:
    """A checked grid command: its variants, budgets, solvers, data and results file."""

    a: argparse.Namespace
    variants: list[tuple[Variant, Args]]
    score_at: list[int]
    nfe_grid: tuple[int, ...]
    samplers: list[str]
    dataset: object
    kept: set[tuple[int, Variant]]
    results: ResultGrid
    _evaluators: dict = dataclasses.field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The grid's main metric: FID on images, SW2 on 2-D points."""
        return "fid" if self.dataset.kind == "image" else "sw2"

    def evaluators(self, seed: int) -> dict[str, Evaluator]:
        """Solver -> its Evaluator for one seed (the samples' noise follows the seed), made once per seed."""
        if seed not in self._evaluators:
            self._evaluators[seed] = self._make_evaluators(seed)
        return self._evaluators[seed]

    def _make_evaluators(self, seed: int) -> dict[str, Evaluator]:
        return {name: Evaluator(self.dataset, EvalConfig(nfe_grid=self.nfe_grid, n_samples=self.a.n_samples, seed=seed,
                                                         sampler=None if name == "default" else name))
                for name in self.samplers}


def check_grid(a: argparse.Namespace, version: str) -> Grid:
    """Every setting of the command checked, and the kept models too, before any training; the results file opened
    (a file made with other settings or code is refused)."""
    from diffusion_rl.samplers import sampler_for_nfe

    base = Args(data=a.data, steps=a.steps, n_samples=a.n_samples, nfe_grid=a.nfe_grid, progress=False)
    variants = [parse_variant(v, base) for v in a.variants]
    score_at = check_score_at(a.score_at, a.steps, variants)
    if a.from_models is not None and (score_at or a.keep_models is not None):
        raise ConfigError("--from-models scores kept models without training: it takes neither --score-at nor "
                          "--keep-models")
    nfe_grid = parse_nfe_grid(a.nfe_grid)
    for seed in a.seeds:
        check_seed(seed)
    samplers = [x.strip() for x in a.samplers.split(",") if x.strip()]
    for variant, args in variants:  # every setting that needs no data, every solver at every budget
        check_command(args, given=set(variant.given), methods=(args.method,))
        for name in samplers:
            for nfe in nfe_grid:
                sampler_for_nfe(plan(args).mrp.formulation, nfe, None if name == "default" else name)
    dataset = load_dataset(a.data)  # one data set for every seed (a 2-D toy set is drawn with seed 0)
    if a.ground_truth and getattr(dataset, "truth", None) is None:
        raise ConfigError(f"--ground-truth needs a data set with a known distribution, got {a.data!r}; accepted: "
                          "gmm:digits, gmm:mnist5k")
    if a.ground_truth and any(args.formulation != "edm" for _, args in variants):
        raise ConfigError("--ground-truth measures EDM-formulation networks (sigma levels); every variant must keep "
                          "formulation=edm")
    for variant, args in variants:  # the learners check the rest (the env's TD-valid rule too)
        make_learner(args, dataset=dataset)
    for option, folder in (("--sample-grids", a.sample_grids), ("--keep-models", a.keep_models)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{option} {folder!r} is a file, not a folder")
    if a.keep_models is not None:
        check_kept_folders(a.keep_models, run_order(a.seeds, variants, a.order), version)
    kept = set() if a.from_models is None else check_kept(a, variants, dataset)
    settings = {"data": a.data, "steps": a.steps, "n_samples": a.n_samples, "nfe_grid": list(nfe_grid),
                "code": version, **({"samplers": samplers} if samplers != ["default"] else {}),
                **({"score_at": score_at} if score_at else {}),
                **({"from_models": True} if a.from_models is not None else {}),
                **({"ground_truth": True} if a.ground_truth else {})}
    command = " ".join(shlex.quote(x) for x in ["python", "-m", "benchmarks.compare", *sys.argv[1:]])
    results = ResultGrid(a.out, settings, command)  # refuses a file made with other settings, before any training
    return Grid(a, variants, score_at, nfe_grid, samplers, dataset, kept, results)


def check_kept(a: argparse.Namespace, variants: list[tuple[Variant, Args]], dataset) -> set[tuple[int, Variant]]:
    """The (seed, variant) runs --from-models scores, each checked; the missing ones named."""
    planned = run_order(a.seeds, variants, a.order)
    kept, unfinished, missing = set(), [], []
    for seed, (variant, args) in planned:
        if not kept_model(a.from_models, variant, seed).is_file():
            missing.append(f"{variant.label} seed {seed}")
            continue
        try:
            load_kept(a.from_models, variant, dataclasses.replace(args, seed=seed), dataset)
        except UnfinishedModel as e:
            unfinished.append(str(e))
            continue
        kept.add((seed, variant))
    if unfinished:
        print(f"unfinished, skipped: {'; '.join(unfinished)}", file=sys.stderr)
    if not kept:
        raise ConfigError(f"--from-models {a.from_models!r} holds none of this grid's finished models")
    if missing:
        print(f"no kept model, skipped: {', '.join(missing)}", file=sys.stderr)
    return kept


def run_one(g: Grid, seed: int, variant: Variant, args: Args, version: str) -> None:
    """Claim one run and, unless it is finished or another live worker runs it, train (or load) and score it."""
    # each result this run gives: the budgets of --score-at, then --steps
    stops = [(b, variant.at_steps(b)) for b in g.score_at] + [
        (args.steps, variant.at_steps(args.steps) if g.score_at else variant)]
    key = run_key(stops[-1][1].label, seed)  # the run's last result: claimed for the whole run
    if not g.results.claim(key):  # finished, or another worker runs it
        if key not in g.results.runs():
            print(f"seed {seed} {stops[-1][1].label}: skipped, another live worker runs it", file=sys.stderr,
                  flush=True)
        return
    try:
        train_and_score(g, seed, variant, args, version, stops, key)
    finally:  # a run that fails midway frees its claim at once (a finished one has already)
        g.results.release(key)


def train_and_score(g: Grid, seed: int, variant: Variant, args: Args, version: str,
                    stops: list[tuple[int, Variant]], key: str) -> None:
    """The body of the claimed run `key`: train (or load) it and score it at each of its `stops` (budget, its
    label; the last is `key`'s), writing each result as it finishes."""
    a = g.a
    evaluators = g.evaluators(seed)
    args = dataclasses.replace(args, seed=seed)
    resumed_at = None  # the step a killed run continued from
    done = set(g.results.runs())  # read once: while this worker holds the claim, only it writes this run's results
    if a.from_models is not None:
        learner = load_kept(a.from_models, variant, args, g.dataset)  # trained already: only scored below
    else:
        learner = make_learner(args, dataset=g.dataset)
        learner.out_dir = None
        if a.keep_models is not None:  # trains in its kept folder, checkpointing on its way
            learner.out_dir = kept_model(a.keep_models, variant, seed).parent
            if (learner.out_dir / "checkpoint.pt").exists():  # a killed run: continue it if this code made it
                check_kept_folders(a.keep_models, [(seed, (variant, args))], version)  # as at the start: hours ago
                resumed_at = learner.resume().step
                lost = [b for b, v in stops if b < resumed_at and run_key(v.label, seed) not in done]
                if lost:  # passed budgets this --out has no result for: only training from step 0 gives them
                    print(f"seed {seed} {variant.label}: {learner.out_dir} is at step {resumed_at}, past the "
                          f"budgets {lost} that {a.out} has no result for: retrained from step 0 (its kept model "
                          "is replaced at the end)", file=sys.stderr, flush=True)
                    learner, resumed_at = make_learner(args, dataset=g.dataset), None
                    learner.out_dir = None
            else:
                write_run_file(learner.out_dir, version, args.steps, variant, seed)
    for budget, shown in stops:
        scored_key = run_key(shown.label, seed)
        if a.from_models is None:
            if learner.step > budget:  # resumed past this budget, whose result is in
                continue
            try:
                for _ in learner.train(budget, progress=False):
                    pass
            except NonFiniteLossError as e:  # a restart would diverge again from the same checkpoint: record it
                for _, rest in stops[stops.index((budget, shown)):]:
                    if run_key(rest.label, seed) not in done:
                        g.results.finish(run_key(rest.label, seed), diverged_records(g, learner, args, rest, e,
                                                                                     version))
                print(f"seed {seed} {variant.label}: diverged at step {learner.step} ({e}); recorded as nan",
                      file=sys.stderr, flush=True)
                return
        if scored_key != key and scored_key in done:  # scored before a restart: only retrained
            continue
        sample_dir = None if a.sample_grids is None else Path(a.sample_grids) / shown.folder() / f"seed{seed}"
        recs = score_run(learner, args, evaluators, shown, sample_dir)
        if a.ground_truth:
            fields = dict(run_settings(learner, args), steps=learner.step)
            recs += [dict(fields, **r) for r in ground_truth_records(learner, g.dataset, shown, g.samplers,
                                                                     g.nfe_grid, seed)]
        # a kept model was trained by the grid that kept it: no training time here
        seconds = learner.train_seconds  # over every resume; nan when its checkpoint predates the count
        provenance = ({"train_seconds": round(seconds, 1) if math.isfinite(seconds) else None}
                      if a.from_models is None else
                      {"train_seconds": None, "scored_from": str(kept_model(a.from_models, variant, seed)),
                       "trained_code": (read_run_file(kept_model(a.from_models, variant, seed).parent)
                                        or {}).get("code")})
        if resumed_at is not None:
            provenance["resumed_at_step"] = resumed_at
        for r in recs:
            r.update(code=version, **provenance)
        if a.keep_models is not None and scored_key == key:  # saved before its result: a result has its model
            learner.save(kept_model(a.keep_models, variant, seed))
        g.results.finish(scored_key, recs)
        how = "kept model" if a.from_models is not None else f"trained {seconds:.0f} s"
        print(f"seed {seed} {shown.label}: {how}; " + ", ".join(
            f"NFE {r['nfe']} {r['metric']} {r['value']:.2f}" for r in recs if r["metric"] in ("fid", "sw2")),
            file=sys.stderr, flush=True)


def diverged_records(g: Grid, learner, args: Args, shown: Variant, error: Exception, version: str) -> list[dict]:
    """The records of a run whose training diverged: its main metric as nan at every solver and NFE (the report
    shows "not finite" and gives no interval), with the step and the error, so that the grid moves on."""
    from diffusion_rl.samplers import sampler_for_nfe

    fields = dict(run_settings(learner, args), steps=learner.step, code=version, diverged_at_step=learner.step,
                  error=str(error))
    return [dict(fields, variant=shown.on_solver(name).label, nfe=nfe, metric=g.metric, value=math.nan,
                 sampler=sampler_for_nfe(learner.formulation, nfe, None if name == "default" else name))
            for name in g.samplers for nfe in g.nfe_grid]


def main(argv: list[str] | None = None) -> None:
    a = parse_command(argv)
    version = code_version()  # once, before any work: the code this command runs
    g = check_grid(a, version)
    done = g.results.runs()
    if done:
        print(f"resuming {a.out}: {len(done)} finished runs kept", file=sys.stderr)
    for seed, (variant, args) in run_order(a.seeds, g.variants, a.order):
        if a.from_models is None or (seed, variant) in g.kept:  # the missing kept models were named
            run_one(g, seed, variant, args, version)
    records = [r for rs in g.results.runs().values() for r in rs]
    print(table(summarise(records), g.metric))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # bad grids, options or budgets: one line, before any training
        sys.exit(f"compare: error: {e}")
