"""Compare methods over seeds: FID (or SW2) across NFE, mean and spread, written as JSON with its command.

    python benchmarks/compare.py --variants baseline td --seeds 0 1 2 --steps 1500 \
        --out benchmarks/results/digits_td_vs_edm.json

A variant is `baseline`, `td`, or `td:key=value,key=value` with keys of `diffusion_rl.cli.Args`, e.g.
`td:estimator=td_lambda,n_steps=3`, `td:coupling=shared`, `td:reweighting=none`, `td:base_lambda=0`.
Every variant sees the same seeds, budget, data order and evaluation protocol. The table prints mean +- std over
seeds; nothing is hidden when TD loses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_rl.cli import Args, make_learner  # noqa: E402
from diffusion_rl.data import load_dataset  # noqa: E402
from diffusion_rl.errors import ConfigError  # noqa: E402
from diffusion_rl.evaluation import EvalConfig, Evaluator  # noqa: E402


def parse_variant(spec: str, base: Args) -> tuple[str, Args]:
    """'td:estimator=nstep,n_steps=2' -> (label, Args with those overrides)."""
    method, _, opts = spec.partition(":")
    args = dataclasses.replace(base, method=method)
    types = {f.name: f.type for f in dataclasses.fields(Args)}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise ConfigError(f"unknown variant option {key!r} in {spec!r}; accepted: Args fields")
        cast = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}.get(str(types[key]), str)
        setattr(args, key, cast(value))
    return spec, args


def summarise(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["nfe"], r["metric"]), []).append(r["value"])
    return [{"variant": v, "nfe": n, "metric": m, "mean": statistics.fmean(vals),
             "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n_seeds": len(vals), "values": vals}
            for (v, n, m), vals in groups.items()]


def table(summary: list[dict], metric: str) -> str:
    rows = [s for s in summary if s["metric"] == metric]
    nfes = sorted({s["nfe"] for s in rows})
    lines = [f"{'variant':<34}" + "".join(f"{'NFE ' + str(n):>16}" for n in nfes)]
    for v in dict.fromkeys(s["variant"] for s in rows):
        cell = {s["nfe"]: f"{s['mean']:.2f} +- {s['std']:.2f}" for s in rows if s["variant"] == v}
        lines.append(f"{v:<34}" + "".join(f"{cell.get(n, '-'):>16}" for n in nfes))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["baseline", "td"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", default="digits")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--nfe-grid", default="1,2,3,5,9,17,35")
    p.add_argument("--out", default="benchmarks/results/compare.json")
    a = p.parse_args()
    base = Args(data=a.data, steps=a.steps, n_samples=a.n_samples, nfe_grid=a.nfe_grid, progress=False,
                out="/tmp/diffusion_rl_compare")
    variants = [parse_variant(v, base) for v in a.variants]
    nfe_grid = tuple(int(n) for n in a.nfe_grid.split(","))
    dataset = load_dataset(a.data)
    records, t0 = [], time.perf_counter()
    for seed in a.seeds:
        evaluator = Evaluator(dataset, EvalConfig(nfe_grid=nfe_grid, n_samples=a.n_samples, seed=seed))
        for label, args in variants:
            args = dataclasses.replace(args, seed=seed)
            learner = make_learner(args, dataset=dataset)
            learner.out_dir = None
            ts = time.perf_counter()
            for _ in learner.train(args.steps, progress=False):
                pass
            train_s = time.perf_counter() - ts
            recs = evaluator.sweep(learner.ema, learner.method, learner.step, None, learner.device, progress=False)
            for r in recs:
                r.update(variant=label, train_seconds=round(train_s, 1))
            records += recs
            print(f"seed {seed} {label}: trained {train_s:.0f} s; " + ", ".join(
                f"NFE {r['nfe']} {r['metric']} {r['value']:.2f}" for r in recs if r["metric"] in ("fid", "sw2")),
                file=sys.stderr, flush=True)
    summary = summarise(records)
    metric = "fid" if dataset.kind == "image" else "sw2"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(shlex.quote(x) for x in ["python", *sys.argv]),
        "wall_seconds": round(time.perf_counter() - t0, 1), "protocol": {k: v for k, v in records[0].items()
            if k in ("dataset", "n_samples", "reference", "feature_net", "feature_net_accuracy", "float64")},
        "summary": summary, "records": records}, indent=1))
    print(table(summary, metric))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
