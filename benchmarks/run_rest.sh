#!/usr/bin/env bash
# The TD ablations, TD on DDPM/VP, and the demo's own results (part of run_all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/compare.py --variants td "td:estimator=nstep,n_steps=2" "td:estimator=td_lambda,n_steps=2,lmbda=0.5" \
    "td:coupling=shared" "td:reweighting=none" --seeds 0 1 --steps 1500 \
    --out benchmarks/results/digits_td_ablations.json
python benchmarks/compare.py --variants "baseline:formulation=vp" "td:formulation=vp" --seeds 0 1 --steps 1500 \
    --nfe-grid 1,2,3,5,10,20,50 --out benchmarks/results/digits_vp_td_vs_ddpm.json
diffusion-rl demo --out benchmarks/results/demo --no-progress
