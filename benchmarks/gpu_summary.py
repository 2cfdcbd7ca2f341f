"""The GPU check's report: one table of benchmarks/gpu_check.sh's stages, how each ended and its key numbers.

    python -m benchmarks.gpu_summary benchmarks/results/gpu            # the table (and summary.json beside it)
    python -m benchmarks.gpu_summary --environment OUT/environment.json  # stage 1: torch, CUDA and the card

A stage that ran out of its time box is named with how far it got (the rows its JSON holds).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from diffusion_rl.runs import atomic_write_text

__all__ = ["environment", "stage_rows", "main"]


def environment() -> dict:
    """The software and the card the check ran on."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    devices=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
    return info


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _throughput(data: dict | None) -> str:
    if not data or not data.get("results"):
        return "no rows"
    parts = []
    for r in data["results"]:
        text = (f"{r['precision']}{' compiled' if r['compile'] else ''}: baseline {r['baseline_img_s']:.0f} img/s, "
                f"TD {r['td_img_s']:.0f} ({r['td_over_baseline']:.2f}x, floor {r['td_over_baseline_floor']:.2f}x)")
        if r.get("compile_warmup_s") is not None:
            text += f", warm-up {r['compile_warmup_s']:.0f} s"
        parts.append(text)
    return "; ".join(parts)


def _fid(data: dict | None) -> str:
    if not data:
        return "no JSON"
    keys = [k for k in ("metric_share", "fid50k_six_budgets_s") if data.get(k) is not None]
    if not keys:
        keys = [k for k in ("total_s", "fid50k_s") if data.get(k) is not None]
    return ", ".join(f"{k} {data[k]:.3g}" for k in keys) or "no timings"


def _compare(data: dict | None) -> str:
    if not data or not data.get("runs"):
        return "no runs"
    runs = data["runs"]
    recs = [r for v in runs.values() for r in v] if isinstance(runs, dict) else runs
    fid = [f"{r['variant']} NFE {r['nfe']}: {r['value']:.1f}" for r in recs if r.get("metric") == "fid"]
    return f"{len(runs)} runs; " + "; ".join(fid)


def _tests(log: Path) -> str:
    lines = [x for x in (log.read_text(errors="replace").splitlines() if log.is_file() else []) if x.strip()]
    return lines[-1] if lines else "no output"


def stage_rows(folder: Path) -> list[dict]:
    """One row per recorded stage: name, how it ended, seconds, and its key numbers."""
    detail = {
        "environment": lambda: json.dumps(_load(folder / "environment.json")),
        "cuda_tests": lambda: _tests(folder / "cuda_tests.log"),
        "throughput_eager": lambda: _throughput(_load(folder / "throughput_eager.json")),
        "throughput_compiled": lambda: _throughput(_load(folder / "throughput_compiled.json")),
        "fid_pipeline": lambda: _fid(_load(folder / "fid_speed_10k.json")),
        "mnist5k": lambda: _compare(_load(folder / "mnist5k_td_vs_edm_gpu.json")),
    }
    rows = []
    stages = folder / "stages.jsonl"
    for line in stages.read_text().splitlines() if stages.is_file() else []:
        try:
            s = json.loads(line)
        except ValueError:
            continue
        ended = "ran out of time" if s.get("timed_out") else ("ok" if s.get("rc") == 0 else f"rc {s.get('rc')}")
        rows.append({**s, "ended": ended, "detail": detail.get(s["stage"], lambda: "")()})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default="benchmarks/results/gpu")
    p.add_argument("--environment", help="write the environment JSON here and stop")
    a = p.parse_args(argv)
    if a.environment:
        atomic_write_text(Path(a.environment), json.dumps(environment(), indent=1))
        print(json.dumps(environment()))
        return 0
    folder = Path(a.folder)
    rows = stage_rows(folder)
    if not rows:
        print(f"no stages recorded in {folder / 'stages.jsonl'}", file=sys.stderr)
        return 1
    for r in rows:
        print(f"{r['stage']:<20} {r['ended']:<16} {r['seconds']:>4} s of {r['time_box_s']:>3}  {r['detail']}")
    atomic_write_text(folder / "summary.json", json.dumps({"stages": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
