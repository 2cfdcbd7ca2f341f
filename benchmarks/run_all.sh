#!/usr/bin/env bash
# Re-run every benchmark whose JSON is committed under benchmarks/results/ (about a day on an idle 2-core machine,
# most of it the digits sweep of run_sweeps.sh; the GPU check is benchmarks/gpu_check.sh).
# Each grid is resumable: an interrupted command picks up where it stopped; delete a JSON to run its grid afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m benchmarks.compare --variants baseline td --seeds 0 1 2 --steps 1500 \
    --out benchmarks/results/digits_td_vs_edm.json
python -m benchmarks.compare --variants baseline td --seeds 0 1 2 --steps 1500 --nfe-grid 3,5,9,17,35 \
    --samplers default,dpmpp_2m,ipndm --out benchmarks/results/digits_td_vs_edm_solvers.json
python -m benchmarks.report benchmarks/results/digits_td_vs_edm_solvers.json \
    --plot benchmarks/results/digits_td_vs_edm_solvers_fid.png
bash benchmarks/run_rest.sh
bash benchmarks/run_sweeps.sh
python -m benchmarks.metric_check  # the FID scale (metric_calibration.json): ~2 min
python -m benchmarks.solver_check  # the solvers with an exact denoiser (solver_check.json): ~30 s
python -m benchmarks.speed --out benchmarks/results/speed.json
python -m benchmarks.throughput --data digits --batch-size 128 --precisions fp32,bf16 --compile off --repeats 20 \
    --warmup 3 --sample-batch 500 --nfe 35 --out benchmarks/results/throughput_cpu_digits.json
