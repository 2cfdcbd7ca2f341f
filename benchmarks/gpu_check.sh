#!/usr/bin/env bash
# The GPU check, in stages that always report (at most 8 minutes on one H100 or H200, compile included). Each stage
# runs in its own time box and writes its JSON as it finishes; a stage that runs out of time is recorded as such in
# stages.jsonl (its JSON keeps the rows it finished: throughput rewrites its file after each configuration, compare
# after each run), and `benchmarks.gpu_summary` prints one table of every stage at the end.
#   1. environment (torch, CUDA, the card)                       20 s
#   2. the CUDA tests                                             60 s
#   3. throughput, eager fp32 and bf16, the cifar10 preset       80 s
#   4. throughput, compiled bf16 (warm-up reported apart)       150 s
#   5. the FID pipeline at 10,000 samples, scaled to FID-50k     90 s
#   6. a short mnist5k TD vs baseline run                        80 s
# Writes under benchmarks/results/gpu/. Needs no network: data come from installed packages, the throughput images are
# random. Run from the repository root: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
STAGES="$OUT/stages.jsonl"
: > "$STAGES"
source benchmarks/gpu_env.sh || exit 1  # wheels from benchmarks/gpu_wheels.sh where there is no package index
start=$(date +%s)
stage() {  # stage NAME SECONDS COMMAND...: the command in its time box; how it ended goes to stages.jsonl
    local name=$1 box=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout "$box" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '{"stage": "%s", "rc": %d, "seconds": %d, "time_box_s": %d, "timed_out": %s}\n' "$name" "$rc" \
        "$(( $(date +%s) - t0 ))" "$box" "$([ "$rc" -eq 124 ] && echo true || echo false)" >> "$STAGES"
    echo "stage $name: rc $rc after $(( $(date +%s) - t0 )) s (box $box s)"
}
stage environment 20 python -m benchmarks.gpu_summary --environment "$OUT/environment.json"
stage cuda_tests 60 python -m pytest -q tests/test_cuda.py tests/test_fid_device.py
stage throughput_eager 80 python -m benchmarks.throughput --shape 3,32,32 --preset cifar10 --batch-size 256 \
    --device cuda --precisions fp32,bf16 --compile off --repeats 10 --warmup 3 --sample-batch 512 --nfe 35 \
    --out "$OUT/throughput_eager.json"
stage throughput_compiled 150 python -m benchmarks.throughput --shape 3,32,32 --preset cifar10 --batch-size 256 \
    --device cuda --precisions bf16 --compile on --repeats 10 --warmup 3 --sample-batch 512 --nfe 35 \
    --out "$OUT/throughput_compiled.json"
stage fid_pipeline 90 python -m benchmarks.fid_speed --preset cifar10 --n-samples 10000 --nfe-grid 3,9 \
    --precision bf16 --device cuda --out "$OUT/fid_speed_10k.json"
stage mnist5k 80 python -m benchmarks.compare --data mnist5k --variants baseline td --seeds 0 --steps 1500 \
    --nfe-grid 3,9,35 --n-samples 2000 --out "$OUT/mnist5k_td_vs_edm_gpu.json"
echo "gpu_check finished in $(( $(date +%s) - start )) s" | tee "$OUT/elapsed.txt"
python -m benchmarks.gpu_summary "$OUT" | tee "$OUT/summary.txt"
