#!/usr/bin/env bash
# Re-run every benchmark whose JSON is committed under benchmarks/results/ (about an hour on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/speed.py --out benchmarks/results/speed.json
python benchmarks/compare.py --variants baseline td --seeds 0 1 2 --steps 1500 \
    --out benchmarks/results/digits_td_vs_edm.json
python benchmarks/compare.py --variants td "td:estimator=nstep,n_steps=2" "td:estimator=td_lambda,n_steps=3,lmbda=0.5" \
    "td:coupling=shared" "td:reweighting=none" "td:reweighting=pairwise" --seeds 0 1 --steps 1500 \
    --out benchmarks/results/digits_td_ablations.json
python benchmarks/compare.py --variants "baseline:formulation=vp" "td:formulation=vp" --seeds 0 1 --steps 1500 \
    --nfe-grid 1,2,3,5,10,20,50 --out benchmarks/results/digits_vp_td_vs_ddpm.json
