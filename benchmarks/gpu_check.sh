#!/usr/bin/env bash
# The GPU check (at most ~8 minutes on one H100 or H200): CUDA tests, throughput of the cifar10 preset's UNet (fp32
# vs bf16, baseline vs TD, uncompiled), a short TD-vs-baseline training run on mnist5k (28x28) with FID at a few NFE
# budgets, the Inception FID pipeline's time at six NFE budgets (scaled to FID-50k), and 1 GPU vs DDP where there
# are two or more.
# Writes JSON under benchmarks/results/gpu/. Needs no network: data comes from installed packages, images for the
# throughput run are random. Run from the repository root: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1  # wheels from benchmarks/gpu_wheels.sh where there is no package index
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
start=$(date +%s)
# 1. the tests that need CUDA (skipped elsewhere)
timeout 60 python -m pytest -q tests/test_cuda.py 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
# 2. throughput: the cifar10 preset's UNet (51.5M parameters) on 3x32x32 images at batch 256, uncompiled (about 70 s
#    on an H200). Compiled runs are left out: compiling the preset's bf16 steps took over 120 s on an H200, so they
#    need a slot of their own (the same command with --compile on)
timeout 120 python -m benchmarks.throughput --shape 3,32,32 --preset cifar10 --batch-size 256 --device cuda \
    --precisions fp32,bf16 --compile off --repeats 10 --warmup 3 --sample-batch 512 --nfe 35 \
    --out "$OUT/throughput_cifar10_preset.json"
# 3. a short training run on 28x28 digits (mnist5k), TD vs the baseline, FID at a few NFE budgets
timeout 140 python -m benchmarks.compare --data mnist5k --variants baseline td --seeds 0 --steps 1500 \
    --nfe-grid 3,9,35 --n-samples 2000 --out "$OUT/mnist5k_td_vs_edm_gpu.json"
# 4. the Inception FID pipeline (random weights, untrained cifar10-preset network): 1,000 samples at six budgets,
#    scaled to FID-50k (issue 8's target: 20 minutes); on an H200, 2,000 samples did not finish in 90 s nor 1,000
#    in 100 s, when KID still computed its 100 (identical) subsets of the 1,000 x 2048 features on the CPU
timeout 150 python -m benchmarks.fid_speed --preset cifar10 --n-samples 1000 --nfe-grid 3,5,9,17,35,79 \
    --precision bf16 --device cuda --out "$OUT/fid_speed_cifar10_preset.json"
# 5. 1 GPU vs DDP on every GPU: the same 200 TD steps on mnist5k at batch 512 (runs written outside the repository)
n_gpu=$(nvidia-smi --list-gpus | wc -l)
if [ "$n_gpu" -ge 2 ]; then
    for n in 1 "$n_gpu"; do
        t0=$(date +%s)
        timeout 120 torchrun --nproc_per_node="$n" -m diffusion_rl train --data mnist5k --width 64 \
            --method td --steps 200 --batch-size 512 --precision bf16 --no-eval --no-progress \
            --out "/tmp/gpu_check_ddp_$n" --overwrite > "$OUT/ddp_$n.log" 2>&1
        echo "{\"gpus\": $n, \"rc\": $?, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$OUT/ddp_vs_1gpu.jsonl"
    done
else
    echo "one GPU: no DDP comparison" | tee "$OUT/ddp_vs_1gpu.txt"
fi
echo "gpu_check finished in $(( $(date +%s) - start )) s" | tee "$OUT/elapsed.txt"
