"""`diffusion-rl` command line: demo, train, sample, evaluate.

Every setting is a field of one documented dataclass (`Args`, `SampleArgs`, `EvalArgs`), turned into --flags.
Bad input exits with code 2 and a one-line message, before any training starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, check_choice

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
    formulation: str = opt("edm", "edm | vp (ddpm) | ct")
    method: str = opt("baseline", "baseline (the formulation's own loss) | td (TDEvaluator, the paper's TD objective)")
    steps: int = opt(2000, "optimizer steps")
    batch_size: int = opt(128, "samples per step")
    lr: float = opt(2e-3, "Adam learning rate")
    warmup_steps: int = opt(100, "linear learning-rate warm-up")
    ema_halflife_images: float = opt(20000.0, "evaluation EMA half-life in images")
    width: int = opt(32, "base channels of the UNet / hidden width of the MLP")
    depth: int = opt(1, "residual blocks per UNet level")
    dropout: float = opt(0.0, "dropout inside residual blocks")
    conditional: bool = opt(False, "class-conditional network (needs labels)")
    seed: int = opt(0, "seeds initialisation, the env (data order, levels, noise) and sampling")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")
    out: str = opt("runs/train", "output folder: checkpoint.pt, metrics.jsonl, results.json, plots")
    resume: bool = opt(False, "continue from out/<method>/checkpoint.pt")
    checkpoint_every: int = opt(250, "steps between checkpoints")
    estimator: str = opt("td0", "TD: td0 | nstep | td_lambda")
    n_steps: int = opt(2, "TD: transitions per trajectory for nstep / td_lambda (td0 uses 1)")
    lmbda: float = opt(0.95, "TD: lambda of td_lambda")
    reweighting: str = opt("", "TD: edm | pairwise | linear | none ('': the formulation's default, edm; pairwise "
                               "for CT)")
    base_lambda: float = opt(0.5, "TD: weight of the base loss (the paper's lambda)")
    coupling: str = opt("", "TD: markov | shared ('': the formulation's default, markov; shared for CT)")
    stride: float = opt(-1.0, "TD: MRP stride in index units (-1: the formulation's default, 3 for EDM)")
    one_step: float = opt(-1.0, "TD: one-step stride delta (-1: the formulation's default, 0.2 for EDM)")
    target_tau: float = opt(0.999, "TD: target-network EMA rate")
    nfe_grid: str = opt("1,2,3,5,9,17,35", "evaluation NFE budgets, comma-separated (even budgets use Euler)")
    n_samples: int = opt(1000, "evaluation samples per NFE")
    features: str = opt("classifier", "FID features: classifier (trained on the data here) | inception")
    eval: bool = opt(True, "run the evaluation sweep after training (--no-eval skips it)")
    progress: bool = opt(True, "progress bars")
    tensorboard: bool = opt(False, "also log TensorBoard scalars (pip install 'diffusion-rl[tensorboard]')")


@dataclass
class SampleArgs:
    """`diffusion-rl sample`: draw samples from a checkpoint."""

    checkpoint: str = opt("", "path to checkpoint.pt")
    nfe: int = opt(35, "sampling budget")
    sampler: str = opt("", "heun | euler | ddim | ddpm | onestep | multistep ('': the formulation's default)")
    n: int = opt(64, "number of samples")
    seed: int = opt(0, "sampling seed")
    out: str = opt("samples.png", ".png (grid) or .npz (array in [-1, 1])")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")


@dataclass
class EvalArgs:
    """`diffusion-rl evaluate`: sweep NFE budgets for one or more checkpoints."""

    checkpoint: list = field(default_factory=list, metadata={"help": "one or more checkpoint.pt paths"})
    nfe_grid: str = opt("1,2,3,5,9,17,35", "evaluation NFE budgets, comma-separated")
    sampler: str = opt("", "heun | euler | ddim | ddpm | onestep | multistep ('': the formulation's default)")
    n_samples: int = opt(1000, "evaluation samples per NFE")
    features: str = opt("classifier", "FID features: classifier (trained on the data here) | inception")
    seed: int = opt(0, "sampling seed")
    out: str = opt("runs/eval", "output folder: results.json and plots")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")


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


def _parse_nfe_grid(text: str) -> tuple[int, ...]:
    try:
        grid = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"nfe grid {text!r} must be comma-separated positive integers, e.g. 1,2,3,5,9,17,35")
    if not grid or min(grid) < 1:
        raise ConfigError(f"nfe grid {text!r} must be comma-separated positive integers, e.g. 1,2,3,5,9,17,35")
    return grid


def make_learner(args: Args, method: str | None = None, dataset=None):
    """Build the learner an `Args` describes (data, network, formulation, method); validates everything first."""
    from agents import DiffusionBaseline, TDEvaluator
    from envs import DiffusionMRP

    from .data import load_dataset
    from .formulations import make_formulation
    from .networks import Denoiser, build_network
    from .training import TrainConfig, resolve_device

    method = check_choice("method", method or args.method, METHODS)
    dataset = dataset if dataset is not None else load_dataset(args.data, seed=args.seed)
    if args.conditional and dataset.labels is None:
        raise ConfigError(f"--conditional needs a labelled data set; {args.data!r} has no labels")
    formulation = make_formulation(args.formulation)
    torch.manual_seed(args.seed)
    net = build_network(dataset.sample_shape, num_classes=dataset.num_classes if args.conditional else 0,
                        width=args.width, depth=args.depth, dropout=args.dropout)
    denoiser = Denoiser(net, formulation)
    config = TrainConfig(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         ema_halflife_images=args.ema_halflife_images, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard)
    out_dir = Path(args.out) / method
    # one env per learner, seeded alike: the baseline and the TD agent draw the same x0 and levels at every step
    env_kwargs = {"coupling": args.coupling or None, "seed": args.seed, "device": resolve_device(args.device)}
    if args.stride > 0:
        env_kwargs["stride"] = args.stride
    if args.one_step > 0:
        env_kwargs["one_step"] = args.one_step
    env = DiffusionMRP(dataset, formulation, batch_size=[args.batch_size], **env_kwargs)
    if method == "baseline":
        return DiffusionBaseline(env, denoiser=denoiser, config=config, out_dir=out_dir, device=args.device)
    return TDEvaluator(env, denoiser=denoiser, estimator=args.estimator,
                       n_steps=1 if args.estimator == "td0" else args.n_steps, lmbda=args.lmbda,
                       reweighting=args.reweighting or None, base_weight_lambda=args.base_lambda, tau=args.target_tau,
                       config=config, out_dir=out_dir, device=args.device)


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
    denoiser.load_state_dict(ckpt["ema" if ema else "model"])
    denoiser.step = int(ckpt["step"])
    return denoiser.to(device).eval(), cfg


def _train_and_eval(args: Args, methods: tuple[str, ...], with_untrained: bool) -> int:
    from .data import load_dataset
    from .evaluation import EvalConfig, Evaluator, format_table, plot_metric_vs_nfe, write_results

    nfe_grid = _parse_nfe_grid(args.nfe_grid)
    dataset = load_dataset(args.data, seed=args.seed)
    learners = [make_learner(args, m, dataset) for m in methods]  # validates every setting before any work
    eval_cfg = EvalConfig(nfe_grid=nfe_grid, n_samples=args.n_samples, seed=args.seed, features=args.features)
    out = Path(args.out)
    evaluator = Evaluator(dataset, eval_cfg) if args.eval else None
    records, t_start = [], time.perf_counter()
    if with_untrained and evaluator is not None:
        records += evaluator.sweep(learners[0].ema, "untrained", 0, out, learners[0].device, args.progress)
    for learner in learners:
        if args.resume and (learner.out_dir / "checkpoint.pt").exists():
            learner.resume()
            print(f"resumed {learner.method} at step {learner.step}", file=sys.stderr)
        t0 = time.perf_counter()
        last = {}
        for last in learner.train(args.steps, progress=args.progress):
            pass
        print(f"{learner.method}: {learner.step} steps, loss {last.get('loss', float('nan')):.4f}, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if evaluator is not None:
            records += evaluator.sweep(learner.ema, learner.method, learner.step, out, learner.device, args.progress)
    if evaluator is None:
        return 0
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


def _cmd_sample(a: SampleArgs) -> int:
    from .evaluation import save_sample_grid
    from .samplers import sample
    from .training import resolve_device

    if not a.checkpoint:
        raise ConfigError("--checkpoint is required")
    device = resolve_device(a.device)
    denoiser, _ = load_denoiser(a.checkpoint, device)
    g = torch.Generator(device=device).manual_seed(a.seed)
    res = sample(denoiser, denoiser.formulation, (a.n, *denoiser.sample_shape), sampler=a.sampler or None,
                 nfe=a.nfe, generator=g, device=device)
    out = Path(a.out)
    if out.suffix == ".npz":
        import numpy as np

        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, samples=res.x.float().cpu().numpy())
    else:
        save_sample_grid(res.x.float().cpu(), out, title=f"{res.sampler}, NFE {res.nfe}")
    print(f"wrote {a.n} samples ({res.sampler}, NFE {res.nfe}) to {out}")
    return 0


def _cmd_evaluate(a: EvalArgs) -> int:
    from .data import load_dataset
    from .evaluation import EvalConfig, Evaluator, format_table, plot_metric_vs_nfe, write_results
    from .training import resolve_device

    device = resolve_device(a.device)
    loaded = [load_denoiser(p, device) for p in a.checkpoint]
    datasets = {cfg["dataset"] for _, cfg in loaded}
    if len(datasets) != 1:
        raise ConfigError(f"checkpoints were trained on different data sets {sorted(datasets)}; evaluate them apart")
    dataset = load_dataset(datasets.pop())
    cfg = EvalConfig(nfe_grid=_parse_nfe_grid(a.nfe_grid), n_samples=a.n_samples, seed=a.seed,
                     features=a.features, sampler=a.sampler or None)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-rl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train the EDM baseline and the TD agent on digits, evaluate across NFE")
    add_dataclass_args(d, Args, DEMO_DEFAULTS)
    d.add_argument("--quick", action="store_true", help="a tiny run (smoke test): 60 steps, 200 samples")
    t = sub.add_parser("train", help="train one method, then evaluate it across NFE")
    add_dataclass_args(t, Args)
    s = sub.add_parser("sample", help="draw samples from a checkpoint")
    add_dataclass_args(s, SampleArgs)
    e = sub.add_parser("evaluate", help="sweep NFE budgets for checkpoints")
    add_dataclass_args(e, EvalArgs)
    return p


def main(argv: list[str] | None = None) -> int:
    from .training import NonFiniteLossError

    ns = build_parser().parse_args(argv)
    try:
        if ns.command in ("demo", "train"):
            args = dataclass_from_args(Args, ns)
            if ns.command == "demo":
                if ns.quick:
                    args.steps, args.n_samples, args.nfe_grid = 60, 200, "1,2,3,9,35"
                return _train_and_eval(args, METHODS, with_untrained=True)
            return _train_and_eval(args, (args.method,), with_untrained=False)
        if ns.command == "sample":
            return _cmd_sample(dataclass_from_args(SampleArgs, ns))
        return _cmd_evaluate(dataclass_from_args(EvalArgs, ns))
    except ConfigError as e:
        print(f"diffusion-rl: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"diffusion-rl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

