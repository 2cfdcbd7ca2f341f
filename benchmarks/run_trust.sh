#!/usr/bin/env bash
# The grids of "Comparisons a researcher can trust": matched controls (tdoff, equal reach), five paired seeds,
# three solvers, independent image metrics, the ground-truth mixture and TD's budget curve; and TD-CT's fair rerun
# under the release's recipes (method.md §10.1-§10.5).
#
#   COMMIT=<rev> WORKERS=2 bash benchmarks/run_trust.sh [digits] [gmm] [budget] [mnist5k] [ct]
#
# Every grid runs from a clean checkout of one commit (a git worktree under ${WORKTREES:-/tmp}), so every record of a
# file carries the same code version; results land in this checkout's benchmarks/results/trust/ as they finish,
# and a restart skips the finished runs (a file is refused by a command of another commit). Times on a 2-core CPU:
#   digits: 6 variants x 5 seeds, ~4 min of one core a run (~2 core-hours);
#   gmm:    gmm:digits, 3 variants x 3 seeds with the ground-truth metrics (~40 core-minutes);
#   budget: baseline, TD and tdoff at 750 / 1,500 / 3,000 / 6,000 steps, 3 seeds (~6.5 core-hours: a 6,000-step
#           run trains ~32 min on one core for the baseline and tdoff, ~44 for TD, beside a second worker,
#           then ~4 min of scoring);
#   mnist5k: baseline, TD and tdoff, 3 seeds at 3,000 steps, seed by seed so that an unfinished grid is paired
#           (~2 to 2.5 hours of one core a run beside a second worker: a GPU is the place for it; on the CPU it
#           spans sessions: its models train in runs/trust/mnist5k_models, checkpointing on their way, so a run
#           stopped midway continues from its last checkpoint);
#   ct:     CT and TD-CT paired under the release's recipes (ct-release, ct-openai) and the library's (with the
#           release's loss, and TD-CT with its earlier loss), then the probes of the push (linear weight, lambda 2
#           and 5, N = 80, tau 0), 3 seeds at 1,500 steps, NFE 1, 2, 4, variant by variant in that order
#           (~1.5 core-hours).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
COMMIT=${COMMIT:-$(git -C "$HERE" rev-parse HEAD)}
TREE="${WORKTREES:-/tmp}/diffusion-rl-$(git -C "$HERE" rev-parse --short=12 "$COMMIT")"
git -C "$HERE" worktree prune  # a worktree folder deleted by hand (or by a reboot of /tmp) is still registered
[ -d "$TREE" ] || git -C "$HERE" worktree add --detach "$TREE" "$COMMIT" >/dev/null
OUT="$HERE/benchmarks/results/trust"
mkdir -p "$OUT"
cd "$TREE"  # the worktree's code, not the editable install's: python -m puts the working folder first
source "$HERE/benchmarks/workers.sh"  # run: the same command in $WORKERS processes sharing the grid file
SOLVERS="--nfe-grid 3,5,9,17,35 --samplers default,dpmpp_2m,ipndm"
GRIDS=("$@")
[ ${#GRIDS[@]} -gt 0 ] || GRIDS=(digits gmm budget)
for grid in "${GRIDS[@]}"; do
  case $grid in
    digits) run -m benchmarks.compare --variants baseline td tdoff td:stride=6 tdoff:stride=6 \
              td:estimator=nstep,n_steps=2,full_reach=true \
              --seeds 0 1 2 3 4 --steps 1500 $SOLVERS --out "$OUT/digits.json" ;;
    gmm) run -m benchmarks.compare --data gmm:digits --variants baseline td tdoff --seeds 0 1 2 --steps 1500 \
           $SOLVERS --ground-truth --out "$OUT/gmm_digits.json" ;;
    budget) run -m benchmarks.compare --variants baseline td tdoff --seeds 0 1 2 --steps 6000 \
              --score-at 750,1500,3000 --nfe-grid 3,5,9,35 --samplers default,dpmpp_2m --out "$OUT/digits_budget.json" ;;
    mnist5k) run -m benchmarks.compare --data mnist5k --variants baseline td tdoff --seeds 0 1 2 --steps 3000 \
               $SOLVERS --keep-models "$HERE/runs/trust/mnist5k_models" --out "$OUT/mnist5k.json" ;;
    ct) run -m benchmarks.compare --variants baseline:preset=ct-release td:preset=ct-release \
          baseline:formulation=ct td:formulation=ct td:formulation=ct,ct_kappa=shared-path,ct_boundary=mask,ct_target=eval \
          baseline:preset=ct-openai td:preset=ct-openai \
          td:formulation=ct,reweighting=linear td:formulation=ct,base_lambda=2 td:formulation=ct,base_lambda=5 \
          baseline:formulation=ct,ct_grid=80 td:formulation=ct,ct_grid=80 \
          baseline:formulation=ct,target_tau=0 td:formulation=ct,target_tau=0 \
          --seeds 0 1 2 --steps 1500 --nfe-grid 1,2,4 --order variant --out "$OUT/td_ct.json" ;;
    *) echo "unknown grid $grid; accepted: digits gmm budget mnist5k ct" >&2; exit 2 ;;
  esac
done
