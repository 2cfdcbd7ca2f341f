#!/usr/bin/env bash
# Re-run every benchmark whose JSON is committed under benchmarks/results/ (about 1.5 hours on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/speed.py --out benchmarks/results/speed.json
python benchmarks/compare.py --variants baseline td --seeds 0 1 2 --steps 1500 \
    --out benchmarks/results/digits_td_vs_edm.json
bash benchmarks/run_rest.sh
