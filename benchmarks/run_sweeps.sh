#!/usr/bin/env bash
# The research grids of the stride/estimator/solver study (part of run_all.sh). Each is resumable and can be filled
# by several workers at once: start the same command in two shells (or with WORKERS=2) and they share the grid.
#   digits sweep:  ~3.5 h of one core per seed on a 2-core CPU; CT: ~25 min; target lag at 3x: ~1 h;
#   TD-VP under DDIM and DPM-Solver++: ~25 min; the baseline's budget curve: ~1 h;
#   mnist5k: 18 runs of ~1-2.5 h of one core each (train 43-94 min, TD(lambda) ~133; score 12-23) on a 2-core CPU
#   (a GPU is the place for it); run variant by variant, so an unfinished grid has the baseline and TD(0) at all three seeds first;
#   its baseline's budget curve: one 6,000-step run per seed scored on its way (~1.7 h of one core per seed).
#   The mnist5k grid keeps the models of runs started with --keep-models (runs/models/, ~19 MB each, not
#   committed), so new solvers can score them later without retraining.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/workers.sh  # run: the same command in $WORKERS processes sharing the grid file
run -m benchmarks.compare --variants baseline td \
  td:stride=1 td:stride=2 td:stride=4 td:stride=6 td:stride=9 \
  td:estimator=nstep,n_steps=2,stride=2 td:estimator=nstep,n_steps=2 \
  td:estimator=nstep,n_steps=3,stride=2 td:estimator=nstep,n_steps=3 \
  td:estimator=td_lambda,n_steps=3,stride=2,lmbda=0.25 td:estimator=td_lambda,n_steps=3,stride=2,lmbda=0.5 \
  td:estimator=td_lambda,n_steps=3,stride=2,lmbda=0.75 td:one_step=0.1 td:one_step=0.5 \
  td:target_rampup=0.05 td:shared_until=0.5 td:coupling=mixed:6 \
  --seeds 0 1 2 --steps 1500 --nfe-grid 3,5,9,17,35 --samplers default,dpmpp_2m,ipndm \
  --out benchmarks/results/digits_sweep.json
run -m benchmarks.compare --variants baseline:formulation=ct td:formulation=ct \
  baseline:formulation=ict,target_tau=0 td:formulation=ict,target_tau=0 \
  --seeds 0 1 2 --steps 1500 --nfe-grid 1,2 --out benchmarks/results/digits_ct_vs_td_ct.json
run -m benchmarks.compare --variants baseline td td:target_rampup=0.05 --seeds 0 1 2 --steps 4500 \
  --nfe-grid 3,5,9,17,35 --out benchmarks/results/digits_target_lag_4500.json
run -m benchmarks.compare --variants baseline:formulation=vp td:formulation=vp --seeds 0 1 2 --steps 1500 \
  --nfe-grid 3,5,10,20,50 --samplers default,dpmpp_2m --out benchmarks/results/digits_vp_td_vs_ddpm_solvers.json
run -m benchmarks.compare --variants baseline:steps=375 baseline:steps=750 baseline:steps=1500 baseline:steps=3000 \
  baseline:steps=6000 --seeds 0 1 2 --steps 1500 --nfe-grid 9,35 --out benchmarks/results/digits_baseline_plateau.json
if [ "${MNIST5K:-0}" = 1 ]; then
  run -m benchmarks.compare --data mnist5k --variants baseline td td:stride=1 td:stride=6 \
    td:estimator=nstep,n_steps=2 td:estimator=td_lambda,n_steps=3,stride=2,lmbda=0.5 \
    --seeds 0 1 2 --steps 3000 --nfe-grid 3,5,9,17,35 --samplers default,dpmpp_2m,ipndm --order variant \
    --sample-grids benchmarks/results/samples/mnist5k_sweep --keep-models runs/models/mnist5k_sweep \
    --out benchmarks/results/mnist5k_sweep.json
  run -m benchmarks.compare --data mnist5k --variants baseline --seeds 0 1 2 --steps 6000 --score-at 750,1500,3000 \
    --nfe-grid 9,35 --out benchmarks/results/mnist5k_baseline_plateau.json
  # the first-order last step (dpmpp_2m_lof) against DPM-Solver++ at NFE 3-9: kept TD(0) k=6 models rescored
  # (~3 min each), and the seed-1 baseline trained again with its model kept (the grid's own, bit for bit)
  python -m benchmarks.compare --data mnist5k --variants td:stride=6 --seeds 1 2 --steps 3000 --nfe-grid 3,5,9 \
    --samplers dpmpp_2m,dpmpp_2m_lof --from-models runs/models/mnist5k_sweep \
    --sample-grids benchmarks/results/samples/mnist5k_lof --out benchmarks/results/mnist5k_lof_rescore.json
  run -m benchmarks.compare --data mnist5k --variants baseline --seeds 1 --steps 3000 --nfe-grid 3,5,9 \
    --samplers dpmpp_2m,dpmpp_2m_lof --sample-grids benchmarks/results/samples/mnist5k_lof \
    --keep-models runs/models/mnist5k_lof --out benchmarks/results/mnist5k_lof_baseline.json
fi
python -m benchmarks.report
