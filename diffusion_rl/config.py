"""Settings: the documented dataclasses every command and benchmark reads (`Args`, `SampleArgs`, `EvalArgs`,
`DiagnoseArgs`), their --flags, presets, and the parsers of their string-valued fields.

Each field's help text is its `metadata["help"]`, so `--help` and the benchmarks' --help show the same words.
Nothing here builds an object from a string beyond plain values: `diffusion_rl.build` turns settings into objects.
This module imports no torch, so `--help` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError, check_choice, check_distinct

__all__ = ["Args", "SampleArgs", "EvalArgs", "DiagnoseArgs", "METHODS", "PRESETS", "opt", "apply_preset",
           "cast_field", "field_help", "add_dataclass_args", "dataclass_from_args", "parse_nfe_grid", "check_seed",
           "int_list", "auto_float", "TD_OPTIONS", "CT_BASELINE_OPTIONS", "CT_OPTIONS", "UNET_OPTIONS", "LPIPS_RECIPES",
           "preset_names"]

METHODS = ("baseline", "td", "tdoff")
SAMPLER_HELP = ("heun | euler | dpmpp_2m | dpmpp_2m_lof | ipndm | ddim | ddpm | onestep | multistep "
                "('': the formulation's default)")  # samplers.SAMPLERS' names; this module imports no torch


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
    method: str = opt("baseline", "baseline (the formulation's own loss) | td (TDEvaluator, the paper's TD objective) "
                                  "| tdoff (td's batches, TD-valid mask and base-loss weights without the TD term: "
                                  "td's matched control)")
    steps: int = opt(2000, "optimizer steps")
    batch_size: int = opt(128, "samples per step")
    lr: float = opt(2e-3, "learning rate")
    optimizer: str = opt("adam", "adam | radam (the consistency-model release's)")
    warmup_steps: int = opt(100, "linear learning-rate warm-up")
    ema_halflife_images: float = opt(20000.0, "evaluation EMA half-life in images")
    width: int = opt(32, "base channels of the UNet / hidden width of the MLP")
    depth: int = opt(0, "residual blocks per UNet level, or of the MLP of the 2-D data sets (0: the network's "
                        "default: 1 per UNet level, 2 for the MLP)")
    dropout: float = opt(0.0, "dropout inside residual blocks")
    channel_mult: str = opt("", "UNet channel multipliers per resolution, e.g. 2,2,2 ('': 1,2 up to 16x16, else "
                                "1,2,2)")
    attention: str = opt("", "UNet feature-map sides with self-attention, e.g. 16 ('': none)")
    skip_scale: float = opt(1.0, "UNet residual outputs times this (DDPM++: 0.7071)")
    hflip: bool = opt(False, "augment training images by random horizontal flips")
    preset: str = opt("", "recipes, comma-separated, applied in order: cifar10 (EDM's DDPM++ CIFAR-10 recipe: "
                          "width 128, multipliers 2,2,2, 4 blocks, attention at 16, dropout 0.13, batch 512, lr 1e-3, "
                          "EMA half-life 0.5M images); ct-release (the TD-CT release's CIFAR-10 recipe: progressive "
                          "grid 2 -> 151, adaptive target EMA, linear TD weight, uniform CT weight, RAdam 2e-4, l2 in "
                          "place of LPIPS); ct-openai (its PyTorch defaults: N = 40, CT weight 1/sigma^2 + 4, target "
                          "EMA 0, pairwise TD weight, RAdam 1e-4, l2 in place of LPIPS); options given explicitly win")
    conditional: bool = opt(False, "class-conditional network (needs labels)")
    seed: int = opt(0, "seeds initialisation, the env (data order, levels, noise) and sampling")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")
    precision: str = opt("fp32", "training forwards of the network: fp32 | bf16 (CPU and recent GPUs) | fp16 (CUDA)")
    compile: bool = opt(False, "torch.compile the network (online and target)")
    channels_last: bool = opt(False, "channels_last memory format for image networks (faster convolutions on GPU)")
    out: str = opt("runs/train", "output folder: results.json and plots; each method's checkpoint.pt and "
                                 "metrics.jsonl in out/<method>-<formulation> (e.g. out/td-edm)")
    resume: bool = opt(False, "continue the run held in --out (it may change lr, checkpoint and logging settings)")
    overwrite: bool = opt(False, "replace the run held in --out (the checkpoints, logs, results and grids the "
                                 "library wrote there are deleted; other files and sibling runs are kept)")
    checkpoint_every: int = opt(250, "steps between checkpoints (0: only at the end and by --checkpoint-seconds)")
    checkpoint_seconds: float = opt(300.0, "also checkpoint after this many seconds of training (0: off)")
    estimator: str = opt("td0", "TD: td0 | nstep | td_lambda")
    n_steps: int = opt(2, "TD: transitions per trajectory for nstep / td_lambda (td0 uses 1)")
    lmbda: float = opt(0.95, "TD: lambda of td_lambda, in [0, 1]")
    full_reach: bool = opt(False, "TD: nstep / td_lambda: the TD term only on samples whose whole n-step chain is "
                                  "TD-valid (the others train on the base loss), so each return reaches n strides: "
                                  "the equal-reach pair of td0 at stride n k")
    reweighting: str = opt("", "TD: edm | pairwise | linear | none ('': the formulation's default, edm; pairwise "
                               "for CT)")
    base_lambda: float = opt(0.5, "TD: weight of the base loss (the paper's lambda), in [0, 1e6]")
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
    target_tau_schedule: str = opt("", "CT: adaptive:MU0:S0, the target EMA MU0^(S0 / (N - 1)) on the grid's current "
                                       "N points (the release's: adaptive:0.9:2) ('': --target-tau)")
    ct_grid: str = opt("", "CT: N (a fixed N-point grid) | progressive:S0:S1 (the release's schedule, S0 -> S1 + 1 "
                           "points over the run) ('': 18 points; ict has its own curriculum)")
    ct_kappa: str = opt("posterior", "TD-CT: the value's kappa: posterior ((sigma(n+delta)/sigma(n))^2, the "
                                     "release's) | shared-path (sigma(n+delta)/sigma(n))")
    ct_boundary: str = opt("clamp", "TD-CT: clamp (TD off only where the partner is the grid's last point, one-step "
                                    "levels clamped: the release's) | mask (TD off where the partner's one-step level "
                                    "passes the grid end)")
    ct_target: str = opt("train", "CT: the target under dropout: train (replays the online call's masks, the TD "
                                  "partner draws fresh ones: the release's) | eval (one eval-mode forward)")
    ct_weight: str = opt("uniform", "CT: consistency-loss weight: uniform | karras (1/sigma^2 + 1/sigma_data^2)")
    ct_distance: str = opt("", "CT: consistency distance: l2 | pseudo_huber | lpips:<file> (a TorchScript LPIPS "
                               "module) ('': l2 for ct, pseudo_huber for ict)")
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
    sampler: str = opt("", SAMPLER_HELP)
    n: int = opt(64, "number of samples")
    seed: int = opt(0, "sampling seed")
    out: str = opt("samples.png", ".png (grid) or .npz (array in [-1, 1])")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")
    overwrite: bool = opt(False, "replace an existing --out file")


@dataclass
class EvalArgs:
    """`diffusion-rl evaluate`: sweep NFE budgets for one or more checkpoints."""

    checkpoint: list = field(default_factory=list, metadata={"help": "one or more checkpoint.pt paths"})
    data: str = opt("", "data set (default: the one named in the checkpoints); its content must be the data they were "
                        "trained on (the content hash they record)")
    nfe_grid: str = opt("1,2,3,5,9,17,35", "evaluation NFE budgets, comma-separated")
    sampler: str = opt("", SAMPLER_HELP)
    n_samples: int = opt(1000, "evaluation samples per NFE")
    features: str = opt("classifier", "FID features: classifier (trained on the data here) | inception")
    inception_weights: str = opt("", "the FID Inception-v3 weights file (a state dict: torch-fidelity's or "
                                     "pytorch-fid's) for --features inception ('': $DIFFUSION_RL_INCEPTION_WEIGHTS "
                                     "or torch hub's checkpoints folder)")
    seed: int = opt(0, "sampling seed")
    out: str = opt("runs/eval", "output folder: results.json and plots")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")
    overwrite: bool = opt(False, "replace the results, plots and grids in --out (never the checkpoints read)")


@dataclass
class DiagnoseArgs:
    """`diffusion-rl diagnose`: per-noise-level diagnostics of a checkpoint."""

    checkpoint: str = opt("", "path to checkpoint.pt (its folder's metrics.jsonl gives the per-level training curves)")
    n: int = opt(256, "data samples and sampler trajectories")
    seed: int = opt(0, "seed of the noise and of the trajectories")
    data: str = opt("", "data set (default: the one named in the checkpoint); its content must be the data it was "
                        "trained on (the content hash it records)")
    out: str = opt("", "output folder for diagnose.png and diagnose.json (default: the checkpoint's folder)")
    device: str = opt("auto", "auto (GPU when there is one) | cpu | cuda")
    overwrite: bool = opt(False, "replace diagnose.png and diagnose.json in --out")



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
    return check_distinct("nfe grid", grid)  # a repeated budget would count as another seed


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
    # method.md §10.4: the TD-CT release's CIFAR-10 recipe (its JAX configs); LPIPS -> l2 (no weights here)
    "ct-release": {"formulation": "ct", "ct_grid": "progressive:2:150", "target_tau_schedule": "adaptive:0.9:2",
                   "reweighting": "linear", "ct_weight": "uniform", "ct_distance": "l2", "optimizer": "radam",
                   "lr": 2e-4, "warmup_steps": 0, "dropout": 0.0},
    # method.md §10.4: the release's PyTorch defaults (its script defaults); LPIPS -> l2
    "ct-openai": {"formulation": "ct", "ct_grid": "40", "target_tau": 0.0, "reweighting": "pairwise",
                  "ct_weight": "karras", "ct_distance": "l2", "optimizer": "radam", "lr": 1e-4, "warmup_steps": 0,
                  "dropout": 0.0},
}
# the recipes that stand in l2 for the release's LPIPS: records name the substitute
LPIPS_RECIPES = ("ct-release", "ct-openai")


def preset_names(text: str) -> tuple[str, ...]:
    """'cifar10,ct-release' -> ('cifar10', 'ct-release'); ConfigError names an unknown preset."""
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    for name in names:
        check_choice("preset", name, tuple(PRESETS))
    return names


def apply_preset(args: Args, given: set[str]) -> Args:
    """The presets' values, in order, for every option not written on the command line."""
    values: dict = {}
    for name in preset_names(args.preset):
        values.update(PRESETS[name])
    return dataclasses.replace(args, **{k: v for k, v in values.items() if k not in given})


def int_list(name: str, text: str) -> tuple[int, ...]:
    """'2,2,2' -> (2, 2, 2); '' -> (); anything else is a ConfigError naming the option."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated positive integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{name} must be comma-separated positive integers, got {text!r}")
    return values


def auto_float(name: str, text: str) -> float | None:
    """'auto' -> None; otherwise a float (its range is checked where it is used)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be 'auto' or a number, got {text!r}") from None


TD_OPTIONS = ("estimator", "n_steps", "lmbda", "full_reach", "reweighting", "base_lambda", "coupling", "stride",
              "one_step", "target_tau", "target_halflife_images", "target_rampup", "shared_until", "ct_kappa",
              "ct_boundary", "ct_target", "target_tau_schedule")
CT_BASELINE_OPTIONS = ("coupling", "stride", "one_step", "target_tau", "target_halflife_images", "target_rampup",
                       "ct_target", "target_tau_schedule")
# options of the UNet only (image data): the MLP of the 2-D data sets would ignore them
UNET_OPTIONS = ("channel_mult", "attention", "skip_scale")
# options of the consistency formulations only (ct, ict): another formulation would ignore them
CT_OPTIONS = ("ct_grid", "ct_kappa", "ct_boundary", "ct_target", "ct_weight", "ct_distance", "target_tau_schedule")

