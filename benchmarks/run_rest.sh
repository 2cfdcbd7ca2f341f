#!/usr/bin/env bash
# The TD ablations, TD on DDPM/VP, and the demo's own results (part of run_all.sh).
# Ablations: TD(0) at stride 6 is the control of n-step(2) at stride 3 (equal reach: 2 x 3 index units).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m benchmarks.compare --variants td "td:stride=6" "td:estimator=nstep,n_steps=2" \
    "td:estimator=td_lambda,n_steps=2,lmbda=0.5" "td:coupling=shared" "td:reweighting=none" --seeds 0 1 --steps 1500 \
    --out benchmarks/results/digits_td_ablations.json
# superseded by digits_vp_td_vs_ddpm_solvers.json (run_sweeps.sh); kept to reproduce the file it marks superseded
python -m benchmarks.compare --variants "baseline:formulation=vp" "td:formulation=vp" --seeds 0 1 2 --steps 1500 \
    --nfe-grid 1,2,3,5,10,20,50 --out benchmarks/results/digits_vp_td_vs_ddpm.json
diffusion-rl demo --out benchmarks/results/demo --no-progress --overwrite
