"""`diffusion-rl` command line: demo, train, sample, evaluate, diagnose.

Every setting is a field of one documented dataclass in `diffusion_rl.config` (`Args`, `SampleArgs`, `EvalArgs`,
`DiagnoseArgs`), turned into --flags; `diffusion_rl.build` turns them into objects. Bad input exits with code 2 and
a one-line message before any work starts (training, feature-net fitting, sampling); an environment failure (disk
full, permission denied, out of memory, a non-finite loss) exits with code 1 and a one-line message. `--debug`
shows the traceback instead. Heavy imports (torch, torchrl) wait until a command runs, so `--help` and argument
errors answer at once.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .config import (Args, DiagnoseArgs, EvalArgs, SampleArgs, add_dataclass_args, apply_preset, check_seed,
                     dataclass_from_args, parse_nfe_grid)
from .errors import ConfigError, check_positive

__all__ = ["main", "build_parser"]

DEMO_METHODS = ("baseline", "td")  # what `demo` trains

def _train_and_eval(args: Args, methods: tuple[str, ...], with_untrained: bool, given: set[str]) -> int:
    from . import distributed
    from .build import check_command
    from .training import split_batch

    plans = check_command(args, given, methods, untrained=with_untrained)  # every setting checked before data loads
    info = distributed.init_from_env(args.device)  # torchrun: join the process group (gloo on CPU, NCCL on CUDA)
    split_batch(args.batch_size, info.world_size)
    try:
        return _train_and_eval_on_rank(plans, with_untrained, given, info)
    finally:
        if info.world_size > 1 and torch_distributed_ready():
            import torch.distributed as dist

            dist.destroy_process_group()


def torch_distributed_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _train_and_eval_on_rank(plans: list, with_untrained: bool, given: set[str], info) -> int:
    import contextlib

    from .build import build_learner
    from .checkpoints import RESUME_MAY_CHANGE
    from .data import load_dataset
    from .evaluation import Evaluator, format_table, plot_metric_vs_nfe, write_results
    from .runs import RunFolder, check_writable_folder, record_written

    args = plans[0].args
    out = Path(args.out)
    existed = out.exists()
    check_writable_folder(out)
    learners = []
    try:
        with _when_out_of_memory(DATA_ADVICE):
            dataset = load_dataset(args.data, seed=args.seed)
        for p in plans:
            learners.append(build_learner(p, dataset))
    except BaseException:
        for learner in learners:  # DDP wrappers go while the process group exists (see Learner.close)
            learner.close()
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused command leaves nothing behind
        raise
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
        evaluator = Evaluator(dataset, plans[0].evaluation) if args.eval and info.is_main else None
        records, t_start = [], time.perf_counter()
        if with_untrained and evaluator is not None:
            with _when_out_of_memory(EVAL_ADVICE):
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
                with _when_out_of_memory(EVAL_ADVICE):
                    records += evaluator.sweep(learner.ema, learner.method, learner.step, out, learner.device,
                                               args.progress)
        if evaluator is None:
            return 0
        if args.resume and (out / "results.json").exists():  # keep the records of methods this command did not run
            mine = {r["method"] for r in records}
            old = _read_records(out / "results.json")
            records = [r for r in old if r.get("method") not in mine] + records
        write_results(records, out)
        metrics = list(dict.fromkeys(r["metric"] for r in records))
        for metric in metrics:
            record_written(out, f"{metric}_vs_nfe.png", "eval")
            plot_metric_vs_nfe(records, out / f"{metric}_vs_nfe.png", metric)
    print(format_table(records, metrics[0]))
    info = evaluator.feature_info
    print(f"\n{metrics[0]} on {dataset.name}, {args.n_samples} samples per NFE, reference: {info.get('reference')}; "
          f"features: {info.get('feature_net')}"
          + (f", held-out accuracy {info['feature_net_accuracy']}" if info.get("feature_net_accuracy") else ""))
    print(f"wrote {out / 'results.json'} and plots/grids in {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


def _read_records(path: Path) -> list[dict]:
    """The records of an earlier results.json; one that cannot be read (torn by a crash, not UTF-8, not a results
    file) is set aside (renamed, with a warning) and counts as none."""
    from .runs import set_aside

    try:
        records = json.loads(path.read_bytes().decode("utf-8")).get("records", [])
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("not a list of records")
        return records
    except (ValueError, AttributeError):
        set_aside(path, "unreadable")
        return []


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
    out = check_writable_folder(a.out or Path(a.checkpoint).parent, create=False)  # created once every check passes
    done = [name for name in ("diagnose.json", "diagnose.png") if (out / name).exists()]
    if done and not a.overwrite:
        raise ConfigError(f"--out {str(out)!r} holds {done[0]} from an earlier diagnose; pass --overwrite to replace "
                          f"it, or choose another --out")
    from .diagnostics import diagnose
    from .runs import no_new_folders_if_failed
    from .training import resolve_device

    with no_new_folders_if_failed(out):
        report = diagnose(a.checkpoint, out, n=a.n, seed=a.seed, device=resolve_device(a.device),
                          data=a.data or None)
    t = report["trajectory"]
    print(f"{report['method']}: error to the trajectory's end at the noisiest / cleanest level "
          f"{t['error_to_end'][0]:.4g} / {t['error_to_end'][-1]:.4g}; self-consistency (stride 1) "
          f"{t['self_consistency']['1'][0]:.4g} / {t['self_consistency']['1'][-1]:.4g}")
    print(f"wrote {out / 'diagnose.png'} and {out / 'diagnose.json'}")
    return 0


SAMPLE_SUFFIXES = (".png", ".npz")
SAMPLE_CHUNK = 1000  # samples drawn at a time: memory does not grow with --n (an .npz is written chunk by chunk,
# a .png shows at most DIFFUSION_RL_MAX_GRID samples)


def _cmd_sample(a: SampleArgs) -> int:
    from .limits import check_limit, limit
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
    check_writable_folder(out.parent if str(out.parent) else ".", "--out folder", create=False)  # made on writing
    picture = out.suffix.lower() == ".png"
    n = min(a.n, limit("grid")) if picture else a.n  # a .png shows at most DIFFUSION_RL_MAX_GRID samples

    import numpy as np
    import torch

    from .checkpoints import load_denoiser
    from .evaluation import save_sample_grid
    from .samplers import check_finite_samples, sample, sampler_for_nfe
    from .training import resolve_device

    device = resolve_device(a.device)
    denoiser, _ = load_denoiser(a.checkpoint, device)
    name = sampler_for_nfe(denoiser.formulation, a.nfe, a.sampler or None)  # an unreachable budget fails here
    g = torch.Generator(device=device).manual_seed(a.seed)
    if n < a.n:
        print(f"diffusion-rl: warning: a .png shows at most {n:,} samples (DIFFUSION_RL_MAX_GRID): drawing the "
              f"first {n:,} of --n {a.n:,}; write .npz for all of them", file=sys.stderr)
    used = {}

    def chunks():  # float32 on the CPU, SAMPLE_CHUNK at a time: memory holds one chunk, whatever --n
        for start in range(0, n, SAMPLE_CHUNK):
            res = sample(denoiser, denoiser.formulation, (min(SAMPLE_CHUNK, n - start), *denoiser.sample_shape),
                         sampler=name, nfe=a.nfe, generator=g, device=device)
            used.update(sampler=res.sampler, nfe=res.nfe)
            yield check_finite_samples(res.x, f"checkpoint {a.checkpoint!r}").float().cpu().numpy()  # else exit 1

    from .runs import atomic_write, no_new_folders_if_failed

    with no_new_folders_if_failed(out.parent):  # non-finite samples (exit 1) leave no file and no new folder
        if not picture:  # written atomically: a crash leaves the old file or the new one
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    _write_npz_chunks(fh, "samples", (n, *denoiser.sample_shape), chunks())

            atomic_write(out, write)
        else:
            x = torch.from_numpy(np.concatenate(list(chunks())))  # at most DIFFUSION_RL_MAX_GRID samples
            atomic_write(out, lambda tmp: save_sample_grid(x, tmp, title=f"{used['sampler']}, NFE {used['nfe']}",
                                                           format="png"))
    print(f"wrote {n} samples ({used['sampler']}, NFE {used['nfe']}) to {out}")
    return 0


def _write_npz_chunks(fh: BinaryIO, name: str, shape: tuple[int, ...], chunks: Iterable) -> None:
    """Write to the open binary file `fh` an .npz holding one float32 array `name` of `shape` (as np.savez would),
    from `chunks`: arrays that fill it along the first axis. Memory holds one chunk at a time, whatever the size."""
    import zipfile

    import numpy as np

    fmt = np.lib.format
    rows = 0
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as z, \
            z.open(f"{name}.npy", "w", force_zip64=True) as member:
        fmt.write_array_header_1_0(member, {"descr": fmt.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                                            "shape": tuple(shape)})
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype="<f4")
            member.write(chunk.tobytes())
            rows += chunk.shape[0]
    if rows != shape[0]:
        raise RuntimeError(f"wrote {rows} rows of an array of shape {tuple(shape)}")


def _cmd_evaluate(a: EvalArgs) -> int:
    from .limits import check_samples
    from .runs import check_writable_folder

    nfe_grid = parse_nfe_grid(a.nfe_grid)
    check_seed(a.seed)
    check_positive("n_samples", a.n_samples)
    check_samples(a.n_samples, len(nfe_grid), len(a.checkpoint))  # the limit counts every checkpoint and budget
    from .evaluation import check_features

    check_features(a.features, a.inception_weights or None, load=True)
    check_writable_folder(a.out, create=False)
    from .runs import RunFolder, no_new_folders_if_failed

    # --overwrite replaces this command's own outputs (results, plots, grids), never the checkpoints it reads; a
    # command refused inside (a checkpoint, the data, a sampler) leaves no new folder behind
    with no_new_folders_if_failed(a.out), RunFolder(a.out, overwrite=a.overwrite, kinds=("eval",),
                                                    keep=tuple(a.checkpoint)):
        return _evaluate(a, nfe_grid)


def _evaluate(a: EvalArgs, nfe_grid: tuple[int, ...]) -> int:

    from .data import load_dataset
    from .checkpoints import check_data_hash, load_denoiser
    from .evaluation import EvalConfig, Evaluator, format_table, plot_metric_vs_nfe, write_results
    from .runs import record_written
    from .samplers import sampler_for_nfe
    from .training import resolve_device

    device = resolve_device(a.device)
    loaded = [load_denoiser(p, device) for p in a.checkpoint]
    datasets = {a.data} if a.data else {cfg["dataset"] for _, cfg in loaded}  # --data: identity by content alone
    if len(datasets) != 1:
        raise ConfigError(f"checkpoints were trained on different data sets {sorted(datasets)}; evaluate them apart")
    seeds = {cfg.get("train", {}).get("seed", 0) for _, cfg in loaded}
    if len(seeds) != 1:  # the 2-D toys are generated from the seed: one data set per evaluation
        raise ConfigError(f"checkpoints were trained with different seeds {sorted(seeds)}; evaluate them apart")
    with _when_out_of_memory(DATA_ADVICE):
        dataset = load_dataset(datasets.pop(), seed=seeds.pop())
    from .diagnostics import check_finite_weights

    for path, (denoiser, cfg) in zip(a.checkpoint, loaded):
        check_finite_weights(denoiser, path)  # a diverged run: refused before any sampling, not scored as NaN
        check_data_hash(dataset, cfg, path)  # FID against other data would score the wrong reference
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
        record_written(a.out, f"{metric}_vs_nfe.png", "eval")
        plot_metric_vs_nfe(records, Path(a.out) / f"{metric}_vs_nfe.png", metric)
    print(format_table(records, metrics[0]))
    return 0


DEMO_DEFAULTS = {"out": "runs/demo", "steps": 1500, "n_samples": 1000}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through add_subparsers, its sub-parsers) whose errors are one line naming the option
    and value and where the usage is, with exit code 2 (argparse's own prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its sub-parsers by command."""
    p = _Parser(prog="diffusion-rl", description=__doc__.splitlines()[0], allow_abbrev=False)
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
    from .preemption import Terminated, handle_sigterm

    try:
        with handle_sigterm():  # SIGTERM: a checkpoint after the current step, the lock released, exit 143
            return _run(ns, given_options(subs[ns.command], argv))
    except Terminated as e:
        if ns.debug:
            raise
        where = (f"checkpoint written at step {e.step}" if e.step is not None else "the last checkpoint is kept")
        print(f"diffusion-rl: {e}; {where} (continue with --resume)", file=sys.stderr)
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        if ns.debug:
            raise
        print("diffusion-rl: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line, unless --debug asks for the traceback
        if ns.debug:
            raise
        code, text = _classify(e, ns.command)
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
            return _train_and_eval(args, DEMO_METHODS, with_untrained=True, given=given)
        return _train_and_eval(args, (args.method,), with_untrained=False, given=given)
    if ns.command == "sample":
        return _cmd_sample(dataclass_from_args(SampleArgs, ns))
    if ns.command == "diagnose":
        return _cmd_diagnose(dataclass_from_args(DiagnoseArgs, ns))
    return _cmd_evaluate(dataclass_from_args(EvalArgs, ns))


OOM_ADVICE = {  # what to lower when a command runs out of memory, unless its failing stage says (_when_out_of_memory)
    "sample": "lower --n (samples are drawn 1,000 at a time)",
    "evaluate": "lower --n-samples or evaluate fewer checkpoints",
    "diagnose": "lower --n",
    "train": "lower --batch-size, --width or --depth",
    "demo": "lower --batch-size, --width or --depth",
}
EVAL_ADVICE = "lower --n-samples (the evaluation's samples per NFE)"
DATA_ADVICE = "the data set does not fit in memory: use fewer or smaller images"


def _out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a failed allocation: MemoryError (numpy's too), torch's OutOfMemoryError (CUDA), or the
    RuntimeError of torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text
                                            or "out of memory" in text.lower())


@contextlib.contextmanager
def _when_out_of_memory(advice: str) -> Iterator[None]:
    """Tag an out-of-memory failure inside the block with the advice that fits this stage (the data load, the
    evaluation), which _classify prints in place of the command's."""
    try:
        yield
    except Exception as e:
        if _out_of_memory(e) and not hasattr(e, "oom_advice"):
            e.oom_advice = advice
        raise


def _classify(e: Exception, command: str = "train") -> tuple[int, str]:
    """(exit code, one-line message): 2 for bad input, 1 for a failure of the environment or the run; running out
    of memory names what to lower, for the stage or the `command` that failed."""
    if isinstance(e, ConfigError):
        return 2, _one_line(e)
    if isinstance(e, OSError):
        what = {errno.ENOSPC: "disk full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
                errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or type(e).__name__)
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        return 1, f"{what}{where}; the last good checkpoint is kept"
    if _out_of_memory(e):
        advice = getattr(e, "oom_advice", None) or OOM_ADVICE.get(command, OOM_ADVICE["train"])
        return 1, f"out of memory ({_one_line(e)}); {advice}"
    from .samplers import NonFiniteSampleError
    from .training import NonFiniteLossError

    if isinstance(e, (NonFiniteLossError, NonFiniteSampleError)):
        return 1, _one_line(e)
    return 1, f"{type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)"

