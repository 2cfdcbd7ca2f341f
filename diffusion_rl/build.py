"""The composition root: the one place where settings (`config.Args`) become objects.

    plan(args, method)          -> RunPlan: the formulation, the MRP's settings, the TD agent's settings, the
                                   optimisation, the network's settings and the evaluation, each built (and so
                                   checked, by its own constructor) before any data loads;
    build_learner(plan, data)   -> the learner: env, network, and the baseline, TD agent or tdoff control;
    make_learner(args, ...)     -> both at once (the benchmarks' entry);
    check_command(args, given)  -> one plan per method, after the checks that only a command line can fail (an
                                   option the chosen method would ignore).

Library modules never import this one, nor `cli`; the command line and the benchmarks do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import (CT_BASELINE_OPTIONS, CT_OPTIONS, METHODS, TD_OPTIONS, UNET_OPTIONS, Args, auto_float, check_seed,
                     int_list, parse_nfe_grid)
from .errors import ConfigError, check_choice, check_non_negative, check_positive

if TYPE_CHECKING:  # torch and torchrl load when a plan is made, not when the command line starts
    from agents import TDSettings
    from envs import MRPSettings

    from .evaluation import EvalConfig
    from .training import Learner, TrainConfig

__all__ = ["RunPlan", "plan", "formulation", "build_learner", "make_learner", "check_command", "train_config"]


@dataclass(frozen=True)
class RunPlan:
    """What an `Args` describes for one method, built without data.

    Attributes:
        args: the settings it was made from.
        method: "baseline", "td" or "tdoff".
        mrp: `envs.MRPSettings` (formulation, stride, one-step shift, coupling).
        td: `agents.TDSettings` for td and tdoff (and the CT baseline's target settings); None for a plain baseline.
        train: `training.TrainConfig`.
        network: keyword arguments of `networks.build_network` besides the data's shape and classes.
        evaluation: `evaluation.EvalConfig`, or None with args.eval False.
    """

    args: Args
    method: str
    mrp: "MRPSettings"
    td: "TDSettings | None"
    train: "TrainConfig"
    network: dict
    evaluation: "EvalConfig | None"


def train_config(args: Args) -> "TrainConfig":
    """The optimisation settings of `args` (TrainConfig checks them, the batch's limit too)."""
    from .training import TrainConfig

    check_positive("batch_size", args.batch_size)
    return TrainConfig(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       ema_halflife_images=args.ema_halflife_images, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds,
                       tensorboard=args.tensorboard, precision=args.precision, compile=args.compile,
                       channels_last=args.channels_last, optimizer=args.optimizer)


def _network(args: Args) -> dict:
    from .limits import check_limit
    from .networks import check_dropout

    check_positive("width", args.width)
    if args.depth != 0:  # 0: the network's default (1 block per UNet level, 2 MLP blocks)
        check_positive("depth", args.depth)
    check_limit("depth", args.depth, "depth")
    check_dropout(args.dropout)
    return dict(width=args.width, depth=args.depth or None, dropout=args.dropout,
                channel_mult=int_list("channel_mult", args.channel_mult) or None,
                attn_resolutions=int_list("attention", args.attention), skip_scale=args.skip_scale)


def _target(args: Args) -> dict:
    """The target network's rate: tau, a half-life / ramp-up (0 on the command line means off) or a consistency
    grid's adaptive schedule; and, for the consistency formulations, its mode under dropout."""
    ct = dict(ct_target=args.ct_target, tau_schedule=args.target_tau_schedule or None) if _consistency(args) else {}
    return dict(tau=args.target_tau, target_halflife_images=args.target_halflife_images or None,
                target_rampup=args.target_rampup or None, **ct)


def _consistency(args: Args) -> bool:
    return args.formulation in ("ct", "ict")


def formulation(args: Args):
    """The formulation of `args`: its name, and for ct / ict the TD-CT options (method.md §10.1-§10.4)."""
    from .config import LPIPS_RECIPES, preset_names
    from .formulations import make_formulation

    recipes = [p for p in preset_names(args.preset) if p in LPIPS_RECIPES]
    if recipes and args.formulation != "ct":
        raise ConfigError(f"--preset {recipes[0]} is a consistency-training recipe (method.md §10.4); --formulation "
                          f"{args.formulation} would drop its grid and target schedule: use --formulation ct")
    if not _consistency(args):
        return make_formulation(args.formulation)
    ct = dict(kappa=args.ct_kappa, boundary=args.ct_boundary)
    if args.ct_distance:
        ct["distance"] = args.ct_distance
    if args.formulation == "ct":
        ct.update(weight=args.ct_weight, grid=args.ct_grid)
    elif args.ct_grid or args.ct_weight != "uniform":
        raise ConfigError("ict has its own curriculum and weight (method.md §10): --ct-grid and --ct-weight apply to "
                          "--formulation ct")
    form = make_formulation(args.formulation, **ct)
    form.distance.load()  # an LPIPS file is checked (and loaded) before any data loads
    return form


def plan(args: Args, method: str | None = None) -> RunPlan:
    """The `RunPlan` of `args` for `method` (default args.method); every constructor checks its own settings."""
    from agents import TDSettings
    from envs import MRPSettings

    from .evaluation import EvalConfig

    method = check_choice("method", method or args.method, METHODS)
    check_seed(args.seed)
    mrp = MRPSettings.resolve(formulation(args), auto_float("stride", args.stride),
                              auto_float("one_step", args.one_step), args.coupling or None)
    td = None
    if method != "baseline":
        td = TDSettings(estimator=args.estimator, n_steps=1 if args.estimator == "td0" else args.n_steps,
                        lmbda=args.lmbda, reweighting=args.reweighting or None, base_lambda=args.base_lambda,
                        shared_until=args.shared_until or None, full_reach=args.full_reach,
                        td_term=method == "td", **_target(args)).for_mrp(mrp)
    elif mrp.formulation.consistency:  # CT: the same pairs and target as TD-CT, no TD term
        td = TDSettings(**_target(args)).for_mrp(mrp)
    evaluation = None
    if args.eval:
        # sampling runs the network in the training precision (its ODE state stays float64) and compiled when
        # training is (docs/evaluation.md)
        evaluation = EvalConfig(nfe_grid=parse_nfe_grid(args.nfe_grid), n_samples=args.n_samples, seed=args.seed,
                                features=args.features, inception_weights=args.inception_weights or None,
                                device=args.device, precision=args.precision, compile=args.compile)
    return RunPlan(args, method, mrp, td, train_config(args), _network(args), evaluation)


def build_learner(p: RunPlan, dataset) -> "Learner":
    """The learner of a plan on `dataset`: one env seeded with the run's seed (per rank under DDP), the network
    seeded alike, and the baseline, the TD agent or the tdoff control. Its out_dir is `args.out / learner.method`."""
    import torch

    from agents import ConsistencyBaseline, DiffusionBaseline, TDEvaluator
    from envs import DiffusionMRP

    from . import distributed
    from .networks import Denoiser, build_network
    from .training import resolve_device, split_batch

    args = p.args
    device = resolve_device(args.device)
    info = distributed.current()  # under torchrun: this rank's device, data streams and share of the batch
    if info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if args.conditional and dataset.labels is None:
        raise ConfigError(f"--conditional needs a labelled data set; {args.data!r} has no labels")
    torch.manual_seed(args.seed)
    net = build_network(dataset.sample_shape, num_classes=dataset.num_classes if args.conditional else 0,
                        **p.network)
    denoiser = Denoiser(net, p.mrp.formulation)
    # one env per learner, seeded alike: the baseline and the TD agent draw the same x0 and levels at every step;
    # its batch is the learner's (this process's share under DDP)
    env = DiffusionMRP(dataset, p.mrp.formulation, batch_size=[split_batch(p.train.batch_size, info.world_size)],
                       coupling=p.mrp.coupling, stride=p.mrp.stride, one_step=p.mrp.one_step,
                       seed=distributed.rank_seed(args.seed, info.rank), device=device, hflip=args.hflip)
    common = dict(denoiser=denoiser, config=p.train, device=device)
    if p.method == "baseline" and p.td is not None:
        learner = ConsistencyBaseline(env, **_target(args), **common)
    elif p.method == "baseline":
        learner = DiffusionBaseline(env, **common)
    else:
        learner = TDEvaluator(env, **p.td.kwargs(), **common)
    learner.out_dir = Path(args.out) / learner.method  # each method and formulation in its own folder
    return learner


def make_learner(args: Args, method: str | None = None, dataset=None) -> "Learner":
    """`build_learner(plan(args, method), dataset)`, loading the data set when none is given (after the plan)."""
    from .data import load_dataset

    p = plan(args, method)
    return build_learner(p, dataset if dataset is not None else load_dataset(args.data, seed=args.seed))


def check_command(args: Args, given: set[str] = frozenset(), methods: tuple[str, ...] = (),
                  untrained: bool = False) -> list[RunPlan]:
    """The plans of a demo/train command (one per method) before any data loads, after the checks only a command
    line can fail: `given` names the options written on it, and an option the chosen method or estimator would
    ignore is refused with the reason, never dropped silently. `untrained`: the command also evaluates the
    untrained network (its samples count against the per-command limit)."""
    from .evaluation import check_features
    from .limits import check_limit, check_samples

    if not str(args.out).strip():
        raise ConfigError("--out is empty; give a folder")
    if args.target_tau_schedule and "target_tau" in given:
        raise ConfigError(f"--target-tau and the target tau schedule {args.target_tau_schedule!r} exclude each other: "
                          f"the schedule sets the target's rate on each grid")
    stray = [f"--{k.replace('_', '-')}" for k in CT_OPTIONS if k in given and not _consistency(args)]
    if stray:
        raise ConfigError(f"{', '.join(stray)} applies to the consistency formulations (ct, ict); --formulation "
                          f"{args.formulation} would ignore it")
    from .data import TOYS  # the 2-D data sets: an MLP, which has no UNet levels (every path data set is images)

    from .config import PRESETS, preset_names

    from_presets = {k: name for name in preset_names(args.preset) for k in PRESETS[name] if k in UNET_OPTIONS}
    stray = [f"--{k.replace('_', '-')}" + (f" (from --preset {from_presets[k]})" if k not in given else "")
             for k in UNET_OPTIONS if (k in given or k in from_presets) and args.data in TOYS]
    if stray:
        raise ConfigError(f"{', '.join(stray)} applies to the UNet of image data; the MLP of the 2-D data set "
                          f"{args.data!r} would ignore it")
    for name in ("target_halflife_images", "target_rampup"):
        if check_non_negative(name, getattr(args, name), " (0: off)") and "target_tau" in given:
            raise ConfigError(f"--target-tau and --{name.replace('_', '-')} exclude each other: the half-life or "
                              f"ramp-up sets the target's rate")
    if not args.eval:
        stray = [f"--{k.replace('_', '-')}" for k in ("n_samples", "nfe_grid", "features", "inception_weights")
                 if k in given]
        if stray:
            raise ConfigError(f"{', '.join(stray)} set the evaluation, which --no-eval skips")
    check_positive("steps", args.steps)
    check_limit("steps", args.steps, "steps")
    if args.eval:  # every evaluated network draws --n-samples at every budget: the limit counts them all
        check_positive("n_samples", args.n_samples)
        check_samples(args.n_samples, len(parse_nfe_grid(args.nfe_grid)),
                      len(set(methods or (args.method,))) + bool(untrained))
        check_features(args.features, args.inception_weights or None, load=True)
    methods = tuple(check_choice("method", m, METHODS) for m in methods or (args.method,))
    if "baseline" in methods and len(methods) == 1:
        consistency = args.formulation in ("ct", "ict")  # the CT baseline has the TD agent's pairs and target
        stray = [f"--{k.replace('_', '-')}" for k in TD_OPTIONS if k in given
                 and not (consistency and k in CT_BASELINE_OPTIONS)]
        if stray:
            raise ConfigError(f"{', '.join(stray)} applies to --method td only; the baseline would ignore it")
    if set(methods) & {"td", "tdoff"}:
        if args.estimator == "td0" and "n_steps" in given and args.n_steps != 1:
            raise ConfigError(f"--n-steps {args.n_steps} applies to the nstep and td_lambda estimators; td0 trains "
                              f"on single transitions")
        if args.estimator != "td_lambda" and "lmbda" in given:
            raise ConfigError(f"--lmbda applies to --estimator td_lambda only; {args.estimator} would ignore it")
    return [plan(args, m) for m in methods]
