"""Evaluation across sampling budgets: samples at each NFE, metrics against the data, results.json, plots, grids.

Images: FID and KID (torchmetrics) on the features of a classifier the library trains on the data set's labels
(or Inception-v3 when its weights are installed and asked for), plus improved k-NN precision and recall, class
coverage and a pixel-space memorisation check. The data set is split once (seeded, stratified): the classifier trains
only on its feature-net part, and the reference statistics come only from the disjoint reference part. 2-D data:
sliced Wasserstein-2 and energy distance against fresh true samples. Every record carries its protocol (method.md
§11): FIDs compare only under equal protocol.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shlex
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from .errors import ConfigError, check_choice, check_distinct, check_positive
from .networks import Denoiser
from .samplers import sample, sampler_for_nfe

__all__ = ["EvalConfig", "Evaluator", "evaluate_learner", "write_results", "plot_metric_vs_nfe", "save_sample_grid",
           "DEFAULT_NFE_GRID", "format_table"]

DEFAULT_NFE_GRID: tuple[int, ...] = (1, 2, 3, 5, 9, 17, 35)
FEATURES = ("classifier", "inception")
PRECISIONS = ("fp32", "bf16", "fp16")  # Denoiser.set_speed's


@dataclass
class EvalConfig:
    """How samples are drawn and scored."""

    nfe_grid: Sequence[int] = DEFAULT_NFE_GRID  # sampling budgets to sweep
    n_samples: int = 1000                       # generated samples per NFE
    sampler: str | None = None                  # None: the family's main sampler, Euler where Heun can't reach
    seed: int = 0                               # seeds sampling noise and labels
    features: str = "classifier"                # FID features: "classifier" (trained here) or "inception"
    inception_weights: str | None = None        # the FID Inception-v3 state dict (None: look in the usual places)
    device: str = "auto"                        # where the image metrics run (auto: CUDA if any)
    batch_size: int = 500                       # samples per sampling batch
    float64: bool = True                        # sample in float64 (the release's protocol)
    precision: str = "fp32"                     # the network's autocast while sampling: fp32 | bf16 | fp16 (CUDA)
    compile: bool = False                       # torch.compile the network for sampling
    grid_size: int = 64                         # images in each sample grid PNG
    cache_dir: str | None = None                # feature-network cache (default ~/.cache/diffusion_rl)
    reference_fraction: float = 0.5             # images: the data set's share in the reference part of the split
    split_seed: int = 0                         # images: seeds the feature-net / reference split
    pr_k: int = 3                               # images: the k-th neighbour setting precision/recall radii

    def __post_init__(self) -> None:
        self.nfe_grid = check_distinct("nfe_grid", (int(check_positive("nfe", n)) for n in self.nfe_grid))
        check_positive("n_samples", self.n_samples)
        check_positive("batch_size", self.batch_size)
        check_positive("pr_k", self.pr_k)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}")
        if not 0.0 < float(self.reference_fraction) < 1.0:
            raise ConfigError(f"reference_fraction must be in (0, 1), got {self.reference_fraction!r}")
        check_features(self.features, self.inception_weights)
        if self.n_samples < 2:
            raise ConfigError(f"n_samples must be >= 2 for FID/KID, got {self.n_samples}")


NO_INCEPTION = ("features 'inception' need the FID Inception-v3 weights on disk (nothing is downloaded): give "
                "--inception-weights FILE or $DIFFUSION_RL_INCEPTION_WEIGHTS, or put torch-fidelity's or pytorch-fid's "
                "file in torch hub's checkpoints folder; accepted without them: features classifier")


def check_features(features: str, inception_weights: str | None = None, load: bool = False) -> None:
    """The FID feature settings: a known feature net, and a weights file only with (and existing for) inception.
    With `load`, the Inception weights are found and read in full (a command checks them before it touches its
    output folder or trains: a mismatched file must not cost a run)."""
    check_choice("features", features, FEATURES)
    if inception_weights and features != "inception":
        raise ConfigError(f"inception_weights {inception_weights!r} is only used with features 'inception', got "
                          f"features {features!r}")
    if inception_weights and not Path(inception_weights).is_file():
        raise ConfigError(f"Inception weights file {inception_weights!r} does not exist; accepted: a state dict of "
                          f"the FID Inception-v3 on disk")
    if load and features == "inception":
        require_inception(inception_weights)


def require_inception(weights: str | None = None):
    """The FID Inception-v3 with its weights (`weights`, else found on disk); ConfigError when there are none, or
    the file is unreadable or does not match."""
    from .feature_net import inception_feature_net

    net = inception_feature_net(weights)
    if net is None:
        raise ConfigError(NO_INCEPTION)
    return net


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


@dataclass
class Evaluator:
    """Scores samples of one data set; builds the reference statistics once and reuses them across NFEs.

    Images: the data set is split once by `feature_net.split_dataset` (`config.reference_fraction`, `config.split_seed`;
    stratified by label) into a feature-net part and a reference part (`split`). With classifier features the
    classifier is trained (and validated) on the feature-net part only, and FID/KID/precision/recall/class coverage
    are measured against the reference part only. Inception-v3 was not trained on the data, so with it the reference
    is the whole data set (the usual FID protocol). Either way the memorisation check measures samples against the
    feature-net part's images, on the scale of the reference part's images (`metrics.memorisation_ratio`).

    The image metrics (feature net, FID/KID statistics, precision/recall, memorisation) run on `config.device`
    (`metrics.ImageFID`); samples are drawn on the device `generate` is given, in `config.precision`.

    `feature_info` goes into every record: the feature net, its held-out accuracy and the images it was trained on,
    the reference, the split (seed, fraction, sizes), the precision/recall k, the memorisation gallery and its
    held-out scale ("heldout_nn_distance"), the reference's class histogram, and the data hash.
    """

    dataset: object
    config: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self._fid = None
        self.split = None
        self._fast: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> its sampling view
        self.feature_info: dict = {}
        if self.dataset.kind == "image":
            self._setup_image_metrics()
        else:
            self.feature_info = {"feature_net": "none (2-D metrics)", "reference": "fresh true samples"}
        hasher = getattr(self.dataset, "content_hash", None)
        self.feature_info["data_hash"] = hasher() if callable(hasher) else None  # every record names its data

    def _setup_image_metrics(self) -> None:
        from .feature_net import get_feature_net, split_dataset
        from .metrics import ImageFID

        cfg, data = self.config, self.dataset
        split = self.split = split_dataset(data, cfg.reference_fraction, cfg.split_seed)
        from .training import resolve_device

        device = resolve_device(cfg.device)  # the feature net, the statistics and the k-NN work run there
        x = data.x.detach().cpu()
        n, n_feat, n_ref = len(x), split.feature_idx.numel(), split.reference_idx.numel()
        part = f"split seed {split.seed}, {'stratified' if split.stratified else 'unstratified'}"
        feature_part = x[split.feature_idx]
        reference_part = x[split.reference_idx]
        if cfg.features == "inception":
            net = require_inception(cfg.inception_weights)  # 299 x 299 features for FID-50k belong on the GPU
            self.feature_info = {"feature_net": "inception-v3 (FID, 2015-12-05) pool3 (2048-d)",
                                 "feature_net_accuracy": None,
                                 "feature_net_trained_on": "ImageNet (not this data set: no split needed)",
                                 "reference": f"{data.name} whole data set ({n} images; Inception-v3 was not trained "
                                              "on it)"}
            reference, labels = x, None
        else:
            net = get_feature_net(data, cache_dir=cfg.cache_dir, split=split)
            self.feature_info = {
                "feature_net": f"classifier trained on {data.name} ({net.num_features}-d, "
                               f"data hash {data.content_hash()})",
                "feature_net_accuracy": round(float(net.accuracy), 4),
                "feature_net_trained_on": f"{data.name} feature-net part ({n_feat} of {n} images, {part}; "
                                          "accuracy on its own 15% hold-out)",
                "reference": f"{data.name} reference part ({n_ref} of {n} images, {part}; disjoint from the "
                             "feature net's images)"}
            reference, labels = reference_part, data.labels.detach().cpu()[split.reference_idx]
        self._fid = ImageFID(reference, net, labels=labels, num_classes=data.num_classes or None,
                             nn_gallery=feature_part, nn_heldout=reference_part, k=cfg.pr_k, device=device)
        hist = self._fid.reference_class_histogram
        self.feature_info.update({
            **split.describe(),
            "precision_recall_k": int(cfg.pr_k),
            "memorisation_gallery": f"{data.name} feature-net part ({n_feat} images; per-pixel L2 to the nearest); "
                                    f"held-out scale: the reference part's {n_ref} images against it",
            "heldout_nn_distance": round(float(self._fid.heldout_nn_distance), 6),
            "reference_class_histogram": None if hist is None else [round(float(v), 6) for v in hist]})

    def score(self, samples: Tensor) -> dict[str, float]:
        """Metric name -> value for a batch of generated samples (images: "fid", "kid", "kid_std", "precision",
        "recall", "class_tv" (classifier features), "nn_distance", "memorisation_ratio", "rms_from_mean" (its record
        carries the reference images' own, "data_rms_from_mean"); points: "sw2", "energy")."""
        return self.score_details(samples)[0]

    def score_details(self, samples: Tensor) -> tuple[dict[str, float], dict[str, dict]]:
        """`score`, and per metric the extra record fields that are not one number (images with classifier
        features: {"class_tv": {"class_histogram": [predicted-class counts over the samples]}})."""
        from .metrics import evaluate_samples

        if self._fid is not None:
            return self._fid.compute_details(samples.float())  # moved to the metric's device batch by batch
        g = torch.Generator().manual_seed(self.config.seed + 12345)
        return evaluate_samples(self.dataset, samples.float().cpu(), fid=self._fid, generator=g), {}

    def sampling_net(self, denoiser: Denoiser) -> Denoiser:
        """The denoiser `generate` samples with: `denoiser` itself under the defaults (fp32, no compile); else a view
        of it with `config.precision` and `config.compile` applied (`Denoiser.set_speed`), made once per denoiser.

        The view is a shallow copy: it shares the network and its weights (later weight updates, e.g. of an EMA, are
        seen), while the precision and the compiled graph are its own, so the caller's denoiser (a learner's EMA)
        keeps its settings. The ODE state stays in `float64` / float32 as configured; only the raw network runs under
        autocast (networks.py, `Denoiser.forward`)."""
        cfg = self.config
        if cfg.precision == "fp32" and not cfg.compile:
            return denoiser
        view = self._fast.get(denoiser)
        if view is None:
            channels_last = bool(getattr(denoiser, "channels_last", False))  # the network's memory format, kept
            view = self._fast[denoiser] = copy.copy(denoiser).set_speed(cfg.precision, cfg.compile, channels_last)
        return view

    def generate(self, denoiser: Denoiser, nfe: int, device: torch.device | str = "cpu") -> tuple[Tensor, str]:
        """`n_samples` samples at budget `nfe` (seeded), and the sampler used; the network runs as `sampling_net`
        says (the config's precision and compile)."""
        cfg = self.config
        name = sampler_for_nfe(denoiser.formulation, nfe, cfg.sampler)  # a clear error when it cannot reach nfe
        if cfg.precision == "fp16" and torch.device(device).type != "cuda":
            raise ConfigError(f"precision fp16 needs a CUDA device (sampling on {device}); on CPU use bf16 or fp32")
        denoiser = self.sampling_net(denoiser)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        labels_all = None
        if denoiser.conditional and self.dataset.labels is not None:
            idx = torch.randint(0, len(self.dataset.labels), (cfg.n_samples,), generator=torch.Generator().manual_seed(cfg.seed))
            labels_all = self.dataset.labels[idx].to(device)
        outs = []
        denoiser.eval()
        for start in range(0, cfg.n_samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.n_samples - start)
            labels = None if labels_all is None else labels_all[start:start + n]
            res = sample(denoiser, denoiser.formulation, (n, *self.dataset.sample_shape), sampler=name, nfe=nfe,
                         labels=labels, generator=g, dtype=torch.float64 if cfg.float64 else torch.float32,
                         device=device)
            outs.append(res.x.float().cpu())
        return torch.cat(outs), name

    def sweep(self, denoiser: Denoiser, method: str, training_steps: int, out_dir: str | Path | None = None,
              device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
        """One record per (NFE, metric) for `denoiser`; sample grids go to out_dir/samples/."""
        from tqdm.auto import tqdm

        for nfe in self.config.nfe_grid:  # every budget is checked before the first is sampled
            sampler_for_nfe(denoiser.formulation, nfe, self.config.sampler)
        records = []
        precision = getattr(self.sampling_net(denoiser), "precision", "fp32")  # the network's autocast, recorded
        for nfe in tqdm(self.config.nfe_grid, desc=f"eval {method}", disable=not progress, file=sys.stderr,
                        leave=False):
            t0 = time.perf_counter()
            x, name = self.generate(denoiser, nfe, device)
            scores, details = self.score_details(x)
            wall = time.perf_counter() - t0
            if out_dir is not None:
                from .runs import record_written

                shown = x[: self.config.grid_size] if x.dim() == 4 else x[:2000]
                record_written(out_dir, f"samples/{method}_nfe{nfe:03d}.png", "eval")
                save_sample_grid(shown, Path(out_dir) / "samples" / f"{method}_nfe{nfe:03d}.png",
                                 title=f"{method}, {name}, NFE {nfe}")
            for metric, value in scores.items():
                records.append({
                    "method": method, "sampler": name, "nfe": nfe, "metric": metric, "value": float(value),
                    "dataset": self.dataset.name, "n_samples": self.config.n_samples, **self.feature_info,
                    "seed": self.config.seed, "training_steps": int(training_steps), "wall_time_s": round(wall, 3),
                    "float64": self.config.float64, "precision": precision,
                    "command": _command_line(), **details.get(metric, {})})
        return records


def evaluate_learner(learner, nfe: int | Sequence[int] | None = None, config: EvalConfig | None = None,
                     out_dir: str | Path | None = None, use_ema: bool = True) -> list[dict]:
    """Evaluate a learner's EMA (or online) network across NFE budgets; returns result records."""
    config = config or EvalConfig()
    if nfe is not None:
        config = dataclasses.replace(config, nfe_grid=(nfe,) if isinstance(nfe, int) else tuple(nfe))
    net = learner.ema if use_ema else learner.denoiser
    return Evaluator(learner.dataset, config).sweep(net, learner.method, learner.step, out_dir, learner.device)


def write_results(records: list[dict], out_dir: str | Path, name: str = "results.json") -> Path:
    """results.json: {"records": [...]} with one record per (method, sampler, NFE, metric). Written atomically (a
    crash leaves the old file or the new one) and named in out_dir's manifest (`diffusion_rl.runs`)."""
    from .runs import atomic_write_text, record_written

    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    record_written(out_dir, name, "eval")
    atomic_write_text(path, json.dumps({"records": records}, indent=1))
    return path


def format_table(records: list[dict], metric: str) -> str:
    """A metric-vs-NFE table, one row per method."""
    recs = [r for r in records if r["metric"] == metric]
    methods = list(dict.fromkeys(r["method"] for r in recs))
    nfes = sorted({r["nfe"] for r in recs})
    head = f"{metric:>6} | " + " ".join(f"{'NFE ' + str(n):>9}" for n in nfes)
    lines = [f"{'method':<22}{head}", "-" * (22 + len(head))]
    for m in methods:
        vals = {r["nfe"]: r["value"] for r in recs if r["method"] == m}
        cells = " ".join(f"{vals[n]:>9.3f}" if n in vals else f"{'-':>9}" for n in nfes)
        lines.append(f"{m:<22}{'':>6} | {cells}")
    return "\n".join(lines)


def plot_metric_vs_nfe(records: list[dict], path: str | Path, metric: str) -> Path:
    """One curve per method: metric against NFE, both axes log (the metric's when all its values are positive).

    Points sampled by another sampler than the method's odd-NFE one (Euler at even NFE, where Heun cannot land) are
    drawn hollow and named in the legend, so a reader does not mistake a sampler change for a model change.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r["metric"] == metric]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    marked = set()
    for m in dict.fromkeys(r["method"] for r in recs):
        pts = sorted((r["nfe"], r["value"], r.get("sampler", "")) for r in recs if r["method"] == m)
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        main = max((p[2] for p in pts), key=[p[2] for p in pts].count) if pts else ""
        for nfe, value, sampler in pts:
            if sampler != main:
                label = f"{sampler} (hollow)" if sampler not in marked else None
                ax.plot([nfe], [value], marker="o", markersize=9, markerfacecolor="white",
                        markeredgecolor=line.get_color(), linestyle="none", label=label)
                marked.add(sampler)
    ax.set_xscale("log")
    if recs and all(r["value"] > 0 for r in recs):
        ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    if recs:
        r = recs[0]
        ax.set_title(f"{metric} vs NFE on {r['dataset']} ({r['n_samples']} samples; hollow: other sampler)",
                     fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_sample_grid(x: Tensor, path: str | Path, title: str | None = None, format: str | None = None) -> Path:
    """A PNG of images [B, C, H, W] in [-1, 1] tiled in a square grid, or a scatter of 2-D points [B, 2]. `format`
    is matplotlib's (default: from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    if x.dim() == 4:
        n = x.shape[0]
        rows = int(math.ceil(math.sqrt(n)))
        pad = rows * rows - n
        x = torch.cat([x, -torch.ones(pad, *x.shape[1:])]) if pad else x
        x = torch.nn.functional.pad((x.clamp(-1, 1) + 1) / 2, (0, 1, 0, 1), value=0.5)  # gray 1-px separators
        grid = rearrange(x, "(r c) ch h w -> (r h) (c w) ch", r=rows)
        ax.imshow(grid.squeeze(-1).numpy() if grid.shape[-1] == 1 else grid.numpy(), cmap="gray",
                  vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    else:
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=format)
    plt.close(fig)
    return path
