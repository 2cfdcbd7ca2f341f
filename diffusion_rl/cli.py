"""`diffusion-rl` command line: demo, train, sample, evaluate.

Every setting is a field of one documented dataclass (`Args`, `SampleArgs`, `EvalArgs`), turned into --flags.
Bad input exits with code 2 and a one-line message before any work starts (training, feature-net fitting,
sampling); an environment failure (disk full, permission denied, out of memory, a non-finite loss) exits with code
1 and a one-line message. `--debug` shows the traceback instead. Heavy imports (torch, torchrl) wait until a
command runs, so `--help` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, check_choice, check_non_negative, check_positive, check_range

__all__ = ["Args", "SampleArgs", "EvalArgs", "main", "make_learner", "load_denoiser"]

METHODS = ("baseline", "td")


def opt(default, help: str):
    """A dataclass field whose help text reaches --help (and the benchmarks' --help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    """Training settings (`diffusion-rl train`, `diffusion-rl demo`)."""

    data: str = opt("digits", "data set name (digits, mnist5k, checkerboard, 8gaussians, swissroll, moons, mnist, "
                              "cifar10) or a path (.npz / image folder)")
    formulation: str = opt("edm", "edm | vp (ddpm) | ct | ict (improved CT: curriculum, log-normal levels, "
                                  "pseudo-Huber)")
    method: str = opt("baseline", "baseline (the formulation's own loss) | td (TDEvaluator, the paper's TD objective)")
    steps: int = opt(2000, "optimizer steps")
    batch_size: int = opt(128, "samples per step")
    lr: float = opt(2e-3, "Adam learning rate")
    warmup_steps: int = opt(100, "linear learning-rate warm-up")
    ema_halflife_images: float = opt(20000.0, "evaluation EMA half-life in images")
    width: int = opt(32, "base channels of the UNet / hidden width of the MLP")
    depth: int = opt(1, "residual blocks per UNet level")
    dropout: float = opt(0.0, "dropout inside residual blocks")
    channel_mult: str = opt("", "UNet channel multipliers per resolution, e.g. 2,2,2 ('': 1,2 up to 16x16, else "
                                "1,2,2)")
    attention: str = opt("", "UNet feature-map sides with self-attention, e.g. 16 ('': none)")
    skip_scale: float = opt(1.0, "UNet residual outputs times this (DDPM++: 0.7071)")
    hflip: bool = opt(False, "augment training images by random horizontal flips")
    preset: str = opt("", "network and optimisation recipe: cifar10 (EDM's DDPM++ CIFAR-10 recipe: width 128, "
                          "multipliers 2,2,2, 4 blocks, attention at 16, dropout 0.13, batch 512, lr 1e-3, EMA "
                          "half-life 0.5M images); options given explicitly win")
    conditional: bool = opt(False, "class-conditional network (needs labels)")
    seed: int = opt(0, "seeds initialisation, the env (data order, levels, noise) and sampling")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")
    precision: str = opt("fp32", "training forwards of the network: fp32 | bf16 (CPU and recent GPUs) | fp16 (CUDA)")
    compile: bool = opt(False, "torch.compile the network (online and target)")
    channels_last: bool = opt(False, "channels_last memory format for image networks (faster convolutions on GPU)")
    out: str = opt("runs/train", "output folder: results.json and plots; each method's checkpoint.pt and "
                                 "metrics.jsonl in out/<method>-<formulation> (e.g. out/td-edm)")
    resume: bool = opt(False, "continue the run held in --out (it may change lr, checkpoint and logging settings)")
    overwrite: bool = opt(False, "replace the run held in --out (its checkpoints, logs and grids are deleted)")
    checkpoint_every: int = opt(250, "steps between checkpoints (0: only at the end and by --checkpoint-seconds)")
    checkpoint_seconds: float = opt(300.0, "also checkpoint after this many seconds of training (0: off)")
    estimator: str = opt("td0", "TD: td0 | nstep | td_lambda")
    n_steps: int = opt(2, "TD: transitions per trajectory for nstep / td_lambda (td0 uses 1)")
    lmbda: float = opt(0.95, "TD: lambda of td_lambda, in [0, 1]")
    reweighting: str = opt("", "TD: edm | pairwise | linear | none ('': the formulation's default, edm; pairwise "
                               "for CT)")
    base_lambda: float = opt(0.5, "TD: weight of the base loss (the paper's lambda)")
    coupling: str = opt("", "TD: markov | shared | mixed:M (shared below grid index M, Markov from M on) ('': the "
                            "formulation's default, markov; shared for CT)")
    shared_until: float = opt(0.0, "TD: coupling schedule: shared-noise coupling for this fraction of the steps, "
                                   "then --coupling (0: off)")
    stride: str = opt("auto", "TD: MRP stride in index units > 0 (auto: the formulation's default, 3 for EDM)")
    one_step: str = opt("auto", "TD: one-step shift delta in index units > 0 (auto: the formulation's default, "
                                "0.2 for EDM)")
    target_tau: float = opt(0.999, "TD: target-network EMA rate (unless a half-life or ramp-up is given)")
    target_halflife_images: float = opt(0.0, "TD: target-network EMA half-life in training images (0: off)")
    target_rampup: float = opt(0.0, "TD: cap the target's half-life at this fraction of the images seen so far "
                                    "(0: off)")
    nfe_grid: str = opt("1,2,3,5,9,17,35", "evaluation NFE budgets, comma-separated (even budgets use Euler)")
    n_samples: int = opt(1000, "evaluation samples per NFE")
    features: str = opt("classifier", "FID features: classifier (trained on the data here) | inception")
    inception_weights: str = opt("", "the FID Inception-v3 weights file (a state dict: torch-fidelity's or "
                                     "pytorch-fid's) for --features inception ('': $DIFFUSION_RL_INCEPTION_WEIGHTS "
                                     "or torch hub's checkpoints folder)")
    eval: bool = opt(True, "run the evaluation sweep after training (--no-eval skips it)")
    progress: bool = opt(True, "progress bars")
    tensorboard: bool = opt(False, "also log TensorBoard scalars (pip install 'diffusion-rl[tensorboard]')")


@dataclass
class SampleArgs:
    """`diffusion-rl sample`: draw samples from a checkpoint."""

    checkpoint: str = opt("", "path to checkpoint.pt")
    nfe: int = opt(35, "sampling budget")
    sampler: str = opt("", "heun | euler | dpmpp_2m | dpmpp_2m_lof | ipndm | ddim | ddpm | onestep | multistep "
                           "('': the formulation's default)")
    n: int = opt(64, "number of samples")
    seed: int = opt(0, "sampling seed")
    out: str = opt("samples.png", ".png (grid) or .npz (array in [-1, 1])")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")
    overwrite: bool = opt(False, "replace an existing --out file")


@dataclass
class EvalArgs:
    """`diffusion-rl evaluate`: sweep NFE budgets for one or more checkpoints."""

    checkpoint: list = field(default_factory=list, metadata={"help": "one or more checkpoint.pt paths"})
    nfe_grid: str = opt("1,2,3,5,9,17,35", "evaluation NFE budgets, comma-separated")
    sampler: str = opt("", "heun | euler | dpmpp_2m | dpmpp_2m_lof | ipndm | ddim | ddpm | onestep | multistep "
                           "('': the formulation's default)")
    n_samples: int = opt(1000, "evaluation samples per NFE")
    features: str = opt("classifier", "FID features: classifier (trained on the data here) | inception")
    inception_weights: str = opt("", "the FID Inception-v3 weights file (a state dict: torch-fidelity's or "
                                     "pytorch-fid's) for --features inception ('': $DIFFUSION_RL_INCEPTION_WEIGHTS "
                                     "or torch hub's checkpoints folder)")
    seed: int = opt(0, "sampling seed")
    out: str = opt("runs/eval", "output folder: results.json and plots")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")
    overwrite: bool = opt(False, "replace the results, plots and grids in --out")


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_CASTS = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def cast_field(cls, name: str, text: str):
    """A command-line string cast to the type of field `name` of dataclass `cls`: the one caster of the CLI and the
    benchmark scripts. Raises ConfigError naming the field and the accepted fields or type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ConfigError(f"unknown option {name!r}; accepted: {', '.join(fields)}")
    typ = _type_name(fields[name])
    try:
        return _CASTS.get(typ, str)(text)
    except ValueError:
        raise ConfigError(f"option {name}={text!r} must be of type {typ}") from None


def _caster(cls, name: str, typ: str):
    def cast(text: str):
        return cast_field(cls, name, text)

    cast.__name__ = typ  # argparse names it in "invalid int value"
    return cast


def field_help(f: dataclasses.Field) -> str:
    """The help text of a dataclass field: its `metadata["help"]`."""
    return f.metadata.get("help", "")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One --flag per field of dataclass `cls`, with the field's help (and default) in --help."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        flag = "--" + f.name.replace("_", "-")
        typ = _type_name(f)
        text = field_help(f) + " (default: %(default)s)"
        if typ == "bool":
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=field_help(f))
        elif typ == "list":
            parser.add_argument(flag, default=default, nargs="+", required=not default, help=text,
                                type=f.metadata.get("item", str))
        else:
            parser.add_argument(flag, type=_caster(cls, f.name, typ), default=default, help=text,
                                metavar=typ.upper())


def dataclass_from_args(cls, ns: argparse.Namespace):
    """The dataclass `cls` from the parsed flags `add_dataclass_args` made."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def parse_nfe_grid(text: str) -> tuple[int, ...]:
    """'3,5,9' -> (3, 5, 9); ConfigError for anything but comma-separated positive integers within the limits."""
    try:
        grid = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ConfigError(f"nfe grid {text!r} must be comma-separated positive integers, "
                          f"e.g. 1,2,3,5,9,17,35") from None
    if not grid or min(grid) < 1:
        raise ConfigError(f"nfe grid {text!r} must be comma-separated positive integers, e.g. 1,2,3,5,9,17,35")
    from .limits import check_limit

    for nfe in grid:
        check_limit("nfe", nfe, "nfe")
    return grid


def check_seed(seed) -> int:
    """A seed must be an integer in [0, 2^63)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ConfigError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    return seed


PRESETS: dict[str, dict] = {
    # EDM's DDPM++ recipe for CIFAR-10
    "cifar10": {"data": "cifar10", "width": 128, "depth": 4, "channel_mult": "2,2,2", "attention": "16",
                "dropout": 0.13, "skip_scale": 0.7071, "batch_size": 512, "lr": 1e-3,
                "ema_halflife_images": 500_000.0, "hflip": True},
}


def apply_preset(args: Args, given: set[str]) -> Args:
    """The preset's values for every option not written on the command line."""
    if not args.preset:
        return args
    check_choice("preset", args.preset, tuple(PRESETS))
    return dataclasses.replace(args, **{k: v for k, v in PRESETS[args.preset].items() if k not in given})


def _int_list(name: str, text: str) -> tuple[int, ...]:
    """'2,2,2' -> (2, 2, 2); '' -> (); anything else is a ConfigError naming the option."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated positive integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{name} must be comma-separated positive integers, got {text!r}")
    return values


def _auto_float(name: str, text: str) -> float | None:
    """'auto' -> None; otherwise a float (its range is checked where it is used)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be 'auto' or a number, got {text!r}") from None


def make_learner(args: Args, method: str | None = None, dataset=None):
    """Build the learner an `Args` describes (data, network, formulation, method); validates everything first.

    Its out_dir is `args.out / <learner.method>` ("edm-baseline", "td-edm", "vp-baseline", ...)."""
    import torch

    from agents import ConsistencyBaseline, DiffusionBaseline, TDEvaluator
    from envs import DiffusionMRP

    from .data import load_dataset
    from .formulations import make_formulation
    from .networks import Denoiser, build_network
    from .training import TrainConfig, resolve_device

    from . import distributed

    method = check_choice("method", method or args.method, METHODS)
    device = resolve_device(args.device)
    info = distributed.current()  # under torchrun: this rank's device, data streams and share of the batch
    if info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if args.batch_size % info.world_size:
        raise ConfigError(f"batch_size {args.batch_size} does not divide over {info.world_size} processes; give a "
                          f"multiple of {info.world_size}")
    dataset = dataset if dataset is not None else load_dataset(args.data, seed=args.seed)
    if args.conditional and dataset.labels is None:
        raise ConfigError(f"--conditional needs a labelled data set; {args.data!r} has no labels")
    formulation = make_formulation(args.formulation)
    torch.manual_seed(args.seed)
    net = build_network(dataset.sample_shape, num_classes=dataset.num_classes if args.conditional else 0,
                        width=args.width, depth=args.depth, dropout=args.dropout,
                        channel_mult=_int_list("channel_mult", args.channel_mult) or None,
                        attn_resolutions=_int_list("attention", args.attention), skip_scale=args.skip_scale)
    denoiser = Denoiser(net, formulation)
    config = TrainConfig(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         ema_halflife_images=args.ema_halflife_images, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds,
                         tensorboard=args.tensorboard, precision=args.precision, compile=args.compile,
                         channels_last=args.channels_last)
    # one env per learner, seeded alike: the baseline and the TD agent draw the same x0 and levels at every step
    env = DiffusionMRP(dataset, formulation, batch_size=[args.batch_size // info.world_size],
                       coupling=args.coupling or None, stride=_auto_float("stride", args.stride),
                       one_step=_auto_float("one_step", args.one_step),
                       seed=distributed.rank_seed(args.seed, info.rank), device=device, hflip=args.hflip)
    target = dict(tau=args.target_tau, target_halflife_images=args.target_halflife_images or None,
                  target_rampup=args.target_rampup or None)
    if method == "baseline" and formulation.consistency:  # CT: the same pairs and target as TD-CT, no TD term
        learner = ConsistencyBaseline(env, denoiser=denoiser, **target, config=config, device=device)
    elif method == "baseline":
        learner = DiffusionBaseline(env, denoiser=denoiser, config=config, device=device)
    else:
        learner = TDEvaluator(env, denoiser=denoiser, estimator=args.estimator,
                              n_steps=1 if args.estimator == "td0" else args.n_steps, lmbda=args.lmbda,
                              reweighting=args.reweighting or None, base_weight_lambda=args.base_lambda,
                              shared_until=args.shared_until or None, **target, config=config, device=device)
    learner.out_dir = Path(args.out) / learner.method  # each method and formulation in its own folder
    return learner


def load_denoiser(path: str | Path, device: str = "cpu", ema: bool = True):
    """(EMA denoiser, checkpoint config) from a checkpoint file."""
    from .formulations import make_formulation
    from .networks import Denoiser, network_from_config
    from .training import load_checkpoint

    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    fcfg = dict(cfg["formulation"])
    formulation = make_formulation(fcfg.pop("name"), **fcfg)
    denoiser = Denoiser(network_from_config(cfg["network"]), formulation)
    try:
        denoiser.load_state_dict(ckpt["ema" if ema else "model"])
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint {str(path)!r}: its tensors do not fit its network config ({first})") from None
    denoiser.step = int(ckpt["step"])
    return denoiser.to(device).eval(), cfg


# ---- checks of a whole command, before any work -------------------------------------------------------------------
TD_OPTIONS = ("estimator", "n_steps", "lmbda", "reweighting", "base_lambda", "coupling", "stride", "one_step",
              "target_tau", "target_halflife_images", "target_rampup", "shared_until")
CT_BASELINE_OPTIONS = ("coupling", "stride", "one_step", "target_tau", "target_halflife_images", "target_rampup")


def validate_args(args: Args, given: set[str] = frozenset(), methods: tuple[str, ...] = ()) -> tuple[int, ...]:
    """Everything about a demo/train command that can be checked before data loads; returns the NFE grid.

    `given` names the options written on the command line: an option the chosen method or estimator would
    ignore is refused with the reason, never dropped silently.
    """
    from .limits import check_limit
    from .networks import check_dropout
    from .training import TrainConfig

    if not str(args.out).strip():
        raise ConfigError("--out is empty; give a folder")
    check_seed(args.seed)
    TrainConfig(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,  # checks the optimisation
                ema_halflife_images=args.ema_halflife_images, seed=args.seed, checkpoint_every=args.checkpoint_every,
                checkpoint_seconds=args.checkpoint_seconds, precision=args.precision)
    check_dropout(args.dropout)
    _int_list("channel_mult", args.channel_mult)
    _int_list("attention", args.attention)
    check_range("target_tau", args.target_tau, 0.0, 1.0)
    check_range("lmbda", args.lmbda, 0.0, 1.0)
    check_range("shared_until", args.shared_until, 0.0, 1.0)
    for name in ("target_halflife_images", "target_rampup"):
        v = check_non_negative(name, getattr(args, name), " (0: off)")
        if v and "target_tau" in given:
            raise ConfigError(f"--target-tau and --{name.replace('_', '-')} exclude each other: the half-life or "
                              f"ramp-up sets the target's rate")
    check_non_negative("base_lambda", args.base_lambda)
    if not args.eval:
        stray = [f"--{k.replace('_', '-')}" for k in ("n_samples", "nfe_grid", "features", "inception_weights")
                 if k in given]
        if stray:
            raise ConfigError(f"{', '.join(stray)} set the evaluation, which --no-eval skips")
    for name in ("steps", "batch_size", "width", "depth", "n_samples", "log_every"):
        if hasattr(args, name):
            check_positive(name, getattr(args, name))
    check_limit("steps", args.steps, "steps")
    check_limit("n_samples", args.n_samples, "samples")
    from .evaluation import check_features

    check_features(args.features, args.inception_weights or None, load=args.eval)
    if args.n_samples < 2:
        raise ConfigError(f"n_samples must be >= 2 for FID/KID, got {args.n_samples}")
    nfe_grid = parse_nfe_grid(args.nfe_grid)
    for m in methods:
        check_choice("method", m, METHODS)
    if "baseline" in methods and "td" not in methods:
        consistency = args.formulation in ("ct", "ict")  # the CT baseline has the TD agent's pairs and target
        stray = [f"--{k.replace('_', '-')}" for k in TD_OPTIONS if k in given
                 and not (consistency and k in CT_BASELINE_OPTIONS)]
        if stray:
            raise ConfigError(f"{', '.join(stray)} applies to --method td only; the baseline would ignore it")
    if "td" in methods:
        if args.estimator == "td0" and "n_steps" in given and args.n_steps != 1:
            raise ConfigError(f"--n-steps {args.n_steps} applies to the nstep and td_lambda estimators; td0 trains "
                              f"on single transitions")
        if args.estimator != "td_lambda" and "lmbda" in given:
            raise ConfigError(f"--lmbda applies to --estimator td_lambda only; {args.estimator} would ignore it")
    from agents import ESTIMATORS, REWEIGHTINGS
    from envs import check_stride_one_step

    from .formulations import make_formulation

    form = make_formulation(args.formulation)  # the family, estimator, coupling and grid reach fail before data loads
    check_choice("estimator", args.estimator, ESTIMATORS)
    if args.reweighting:
        check_choice("reweighting", args.reweighting, REWEIGHTINGS)
    if args.coupling:
        form.check_coupling(args.coupling)
    stride, one_step = (_auto_float(name, getattr(args, name)) for name in ("stride", "one_step"))
    check_stride_one_step(form.default_stride if stride is None else stride,
                          form.default_one_step if one_step is None else one_step, form.steps)
    return nfe_grid


def _train_and_eval(args: Args, methods: tuple[str, ...], with_untrained: bool, given: set[str]) -> int:
    from . import distributed

    nfe_grid = validate_args(args, given, methods)
    info = distributed.init_from_env(args.device)  # torchrun: join the process group (gloo on CPU, NCCL on CUDA)
    if info.world_size > 1 and args.batch_size % info.world_size:
        raise ConfigError(f"batch_size {args.batch_size} does not divide over {info.world_size} processes; give a "
                          f"multiple of {info.world_size}")
    try:
        return _train_and_eval_on_rank(args, methods, with_untrained, given, nfe_grid, info)
    finally:
        if info.world_size > 1 and torch_distributed_ready():
            import torch.distributed as dist

            dist.destroy_process_group()


def torch_distributed_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _train_and_eval_on_rank(args: Args, methods: tuple[str, ...], with_untrained: bool, given: set[str],
                            nfe_grid: tuple[int, ...], info) -> int:
    import contextlib

    from .data import load_dataset
    from .evaluation import EvalConfig, Evaluator, format_table, plot_metric_vs_nfe, write_results
    from .runs import RunFolder, check_writable_folder
    from .training import RESUME_MAY_CHANGE

    out = Path(args.out)
    existed = out.exists()
    check_writable_folder(out)
    learners = []
    try:
        dataset = load_dataset(args.data, seed=args.seed)
        for m in methods:  # validates every setting before any work
            learners.append(make_learner(args, m, dataset))
    except BaseException:
        for learner in learners:  # DDP wrappers go while the process group exists (see Learner.close)
            learner.close()
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused command leaves nothing behind
        raise
    eval_cfg = EvalConfig(nfe_grid=nfe_grid, n_samples=args.n_samples, seed=args.seed, features=args.features,
                          inception_weights=args.inception_weights or None, device=args.device)
    keep = tuple(k for k in RESUME_MAY_CHANGE if k in given)  # the rest keep the checkpoint's values
    with contextlib.ExitStack() as stack:
        for learner in learners:  # DDP wrappers go while the process group exists (see Learner.close)
            stack.callback(learner.close)
        # under DDP rank 0 guards and writes the folder (an overwrite happens before the barrier); every rank reads
        # a checkpoint it resumes from
        if info.is_main:
            stack.enter_context(RunFolder(out, resume=args.resume, overwrite=args.overwrite,
                                          subfolders=tuple(learner.method for learner in learners)))
        if info.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        for learner in learners:  # every checkpoint is read and checked before any training
            if args.resume and (learner.out_dir / "checkpoint.pt").exists():
                learner.resume(keep=keep)
                if args.steps < learner.step:
                    raise ConfigError(f"--steps {args.steps} is below step {learner.step} of the {learner.method} "
                                      f"checkpoint; --steps is the total, give >= {learner.step}")
                print(f"resuming {learner.method} at step {learner.step}", file=sys.stderr)
            elif args.resume:
                print(f"{learner.method}: no checkpoint in {learner.out_dir}, starting it", file=sys.stderr)
        evaluator = Evaluator(dataset, eval_cfg) if args.eval and info.is_main else None
        records, t_start = [], time.perf_counter()
        if with_untrained and evaluator is not None:
            records += evaluator.sweep(learners[0].ema, "untrained", 0, out, learners[0].device, args.progress)
        for learner in learners:
            t0 = time.perf_counter()
            last = {}
            for last in learner.train(args.steps, progress=args.progress):
                pass
            if not info.is_main:
                pass
            elif last:
                whose = " (rank 0's batch)" if info.world_size > 1 else ""
                print(f"{learner.method}: {learner.step} steps, loss {last['loss']:.4f}{whose}, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
            else:
                print(f"{learner.method}: already at step {learner.step}", file=sys.stderr)
            if evaluator is not None:
                records += evaluator.sweep(learner.ema, learner.method, learner.step, out, learner.device,
                                           args.progress)
        if evaluator is None:
            return 0
        if args.resume and (out / "results.json").exists():  # keep the records of methods this command did not run
            mine = {r["method"] for r in records}
            old = json.loads((out / "results.json").read_text()).get("records", [])
            records = [r for r in old if r.get("method") not in mine] + records
        write_results(records, out)
        metrics = list(dict.fromkeys(r["metric"] for r in records))
        for metric in metrics:
            plot_metric_vs_nfe(records, out / f"{metric}_vs_nfe.png", metric)
    print(format_table(records, metrics[0]))
    info = evaluator.feature_info
    print(f"\n{metrics[0]} on {dataset.name}, {args.n_samples} samples per NFE, reference: {info.get('reference')}; "
          f"features: {info.get('feature_net')}"
          + (f", held-out accuracy {info['feature_net_accuracy']}" if info.get("feature_net_accuracy") else ""))
    print(f"wrote {out / 'results.json'} and plots/grids in {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


@dataclass
class DiagnoseArgs:
    """`diffusion-rl diagnose`: per-noise-level diagnostics of a checkpoint."""

    checkpoint: str = opt("", "path to checkpoint.pt (its folder's metrics.jsonl gives the per-level training curves)")
    n: int = opt(256, "data samples and sampler trajectories")
    seed: int = opt(0, "seed of the noise and of the trajectories")
    data: str = opt("", "data set (default: the one named in the checkpoint)")
    out: str = opt("", "output folder for diagnose.png and diagnose.json (default: the checkpoint's folder)")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")


def _cmd_diagnose(a: DiagnoseArgs) -> int:
    from .limits import check_limit
    from .runs import check_writable_folder

    if not a.checkpoint:
        raise ConfigError("--checkpoint is required")
    if not Path(a.checkpoint).is_file():
        raise ConfigError(f"--checkpoint {a.checkpoint!r} is not a file; give a checkpoint.pt")
    check_seed(a.seed)
    check_positive("n", a.n)
    check_limit("n", a.n, "samples")
    out = check_writable_folder(a.out or Path(a.checkpoint).parent)
    from .diagnostics import diagnose
    from .training import resolve_device

    report = diagnose(a.checkpoint, out, n=a.n, seed=a.seed, device=resolve_device(a.device), data=a.data or None)
    t = report["trajectory"]
    print(f"{report['method']}: error to the trajectory's end at the noisiest / cleanest level "
          f"{t['error_to_end'][0]:.4g} / {t['error_to_end'][-1]:.4g}; self-consistency (stride 1) "
          f"{t['self_consistency']['1'][0]:.4g} / {t['self_consistency']['1'][-1]:.4g}")
    print(f"wrote {out / 'diagnose.png'} and {out / 'diagnose.json'}")
    return 0


SAMPLE_SUFFIXES = (".png", ".npz")
SAMPLE_CHUNK = 1000  # samples drawn at a time: memory does not grow with --n beyond the output itself


def _cmd_sample(a: SampleArgs) -> int:
    from .limits import check_limit
    from .runs import check_writable_folder

    if not a.checkpoint:
        raise ConfigError("--checkpoint is required")
    check_seed(a.seed)
    check_positive("n", a.n)
    check_limit("n", a.n, "samples")
    check_positive("nfe", a.nfe)
    check_limit("nfe", a.nfe, "nfe")
    out = Path(a.out)
    if out.suffix.lower() not in SAMPLE_SUFFIXES:
        raise ConfigError(f"--out {a.out!r} has suffix {out.suffix!r}; accepted: {', '.join(SAMPLE_SUFFIXES)}")
    if out.is_dir():
        raise ConfigError(f"--out {a.out!r} is a folder; give a file name ending in .png or .npz")
    if out.exists() and not a.overwrite:
        raise ConfigError(f"--out {a.out!r} exists; pass --overwrite to replace it")
    check_writable_folder(out.parent if str(out.parent) else ".", "--out folder")

    import torch

    from .evaluation import save_sample_grid
    from .samplers import sample, sampler_for_nfe
    from .training import resolve_device

    device = resolve_device(a.device)
    denoiser, _ = load_denoiser(a.checkpoint, device)
    name = sampler_for_nfe(denoiser.formulation, a.nfe, a.sampler or None)  # an unreachable budget fails here
    g = torch.Generator(device=device).manual_seed(a.seed)
    chunks = []
    for start in range(0, a.n, SAMPLE_CHUNK):
        n = min(SAMPLE_CHUNK, a.n - start)
        res = sample(denoiser, denoiser.formulation, (n, *denoiser.sample_shape), sampler=name, nfe=a.nfe,
                     generator=g, device=device)
        chunks.append(res.x.float().cpu())
    x = torch.cat(chunks)
    if out.suffix.lower() == ".npz":
        import numpy as np

        np.savez(out, samples=x.numpy())
    else:
        save_sample_grid(x, out, title=f"{res.sampler}, NFE {res.nfe}")
    print(f"wrote {a.n} samples ({res.sampler}, NFE {res.nfe}) to {out}")
    return 0


def _cmd_evaluate(a: EvalArgs) -> int:
    from .limits import check_limit
    from .runs import check_writable_folder

    nfe_grid = parse_nfe_grid(a.nfe_grid)
    check_seed(a.seed)
    check_positive("n_samples", a.n_samples)
    check_limit("n_samples", a.n_samples, "samples")
    from .evaluation import check_features

    check_features(a.features, a.inception_weights or None, load=True)
    check_writable_folder(a.out)
    from .runs import RunFolder

    with RunFolder(a.out, overwrite=a.overwrite):
        return _evaluate(a, nfe_grid)


def _evaluate(a: EvalArgs, nfe_grid: tuple[int, ...]) -> int:

    from .data import load_dataset
    from .evaluation import EvalConfig, Evaluator, format_table, plot_metric_vs_nfe, write_results
    from .samplers import sampler_for_nfe
    from .training import resolve_device

    device = resolve_device(a.device)
    loaded = [load_denoiser(p, device) for p in a.checkpoint]
    datasets = {cfg["dataset"] for _, cfg in loaded}
    if len(datasets) != 1:
        raise ConfigError(f"checkpoints were trained on different data sets {sorted(datasets)}; evaluate them apart")
    seeds = {cfg.get("train", {}).get("seed", 0) for _, cfg in loaded}
    if len(seeds) != 1:  # the 2-D toys are generated from the seed: one data set per evaluation
        raise ConfigError(f"checkpoints were trained with different seeds {sorted(seeds)}; evaluate them apart")
    dataset = load_dataset(datasets.pop(), seed=seeds.pop())
    now = dataset.content_hash()
    for path, (denoiser, cfg) in zip(a.checkpoint, loaded):
        saved = cfg.get("data_hash")
        if saved is not None and saved != now:
            raise ConfigError(f"the data {cfg['dataset']!r} differs from the data {path!r} was trained on: content "
                              f"hash {now} now vs {saved} saved; FID against it would score the wrong reference")
        for nfe in nfe_grid:  # a sampler named on the command line is never swapped for another
            sampler_for_nfe(denoiser.formulation, nfe, a.sampler or None)
    cfg = EvalConfig(nfe_grid=nfe_grid, n_samples=a.n_samples, seed=a.seed, features=a.features,
                     inception_weights=a.inception_weights or None, sampler=a.sampler or None, device=a.device)
    evaluator = Evaluator(dataset, cfg)
    records = []
    for denoiser, ccfg in loaded:
        records += evaluator.sweep(denoiser, ccfg["method"], denoiser.step, a.out, device)
    write_results(records, a.out)
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    for metric in metrics:
        plot_metric_vs_nfe(records, Path(a.out) / f"{metric}_vs_nfe.png", metric)
    print(format_table(records, metrics[0]))
    return 0


DEMO_DEFAULTS = {"out": "runs/demo", "steps": 1500, "n_samples": 1000}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its sub-parsers by command."""
    p = argparse.ArgumentParser(prog="diffusion-rl", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    subs = {
        "demo": sub.add_parser("demo", allow_abbrev=False,
                               help="train the EDM baseline and the TD agent on digits, evaluate across NFE"),
        "train": sub.add_parser("train", allow_abbrev=False, help="train one method, then evaluate it across NFE"),
        "sample": sub.add_parser("sample", allow_abbrev=False, help="draw samples from a checkpoint"),
        "evaluate": sub.add_parser("evaluate", allow_abbrev=False, help="sweep NFE budgets for checkpoints"),
        "diagnose": sub.add_parser("diagnose", allow_abbrev=False,
                                   help="per-noise-level errors and self-consistency of a checkpoint, plotted"),
    }
    add_dataclass_args(subs["demo"], Args, DEMO_DEFAULTS)
    subs["demo"].add_argument("--quick", action="store_true",
                              help="a 20-second smoke run: 60 steps, 200 samples, NFE 1,2,3,9,35")
    add_dataclass_args(subs["train"], Args)
    add_dataclass_args(subs["sample"], SampleArgs)
    add_dataclass_args(subs["evaluate"], EvalArgs)
    add_dataclass_args(subs["diagnose"], DiagnoseArgs)
    return p, subs


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options written in `argv` (abbreviations are off, so exact matches suffice)."""
    given = set()
    for action in parser._actions:
        for flag in action.option_strings:
            if any(a == flag or a.startswith(flag + "=") for a in argv):
                given.add(action.dest)
    return given


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    ns = parser.parse_args(argv)
    if not ns.debug:
        warnings.formatwarning = lambda message, *_a, **_k: f"diffusion-rl: warning: {message}\n"
    try:
        return _run(ns, given_options(subs[ns.command], argv))
    except KeyboardInterrupt:
        if ns.debug:
            raise
        print("diffusion-rl: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line, unless --debug asks for the traceback
        if ns.debug:
            raise
        code, text = _classify(e)
        print(f"diffusion-rl: error: {text}", file=sys.stderr)
        return code


def _run(ns: argparse.Namespace, given: set[str]) -> int:
    if ns.command in ("demo", "train"):
        args = apply_preset(dataclass_from_args(Args, ns), given)
        if ns.command == "demo":
            if "method" in given:
                raise ConfigError("demo trains both methods; to train one, use: diffusion-rl train --method ...")
            if ns.quick:  # the smoke-run sizes, where not given explicitly
                quick = {"steps": 60, "n_samples": 200, "nfe_grid": "1,2,3,9,35"}
                for k, v in quick.items():
                    if k not in given:
                        setattr(args, k, v)
            return _train_and_eval(args, METHODS, with_untrained=True, given=given)
        return _train_and_eval(args, (args.method,), with_untrained=False, given=given)
    if ns.command == "sample":
        return _cmd_sample(dataclass_from_args(SampleArgs, ns))
    if ns.command == "diagnose":
        return _cmd_diagnose(dataclass_from_args(DiagnoseArgs, ns))
    return _cmd_evaluate(dataclass_from_args(EvalArgs, ns))


def _classify(e: Exception) -> tuple[int, str]:
    """(exit code, one-line message): 2 for bad input, 1 for a failure of the environment or the run."""
    if isinstance(e, ConfigError):
        return 2, _one_line(e)
    if isinstance(e, OSError):
        what = {errno.ENOSPC: "disk full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
                errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or type(e).__name__)
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        return 1, f"{what}{where}; the last good checkpoint is kept"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return 1, f"out of memory ({_one_line(e)}); lower --batch-size, --width or --n-samples"
    from .training import NonFiniteLossError

    if isinstance(e, NonFiniteLossError):
        return 1, _one_line(e)
    return 1, f"{type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
