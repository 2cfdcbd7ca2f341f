#!/usr/bin/env bash
# Wheels for a GPU machine with no package index. Its image has torch, numpy, scipy, scikit-learn, pandas, joblib,
# matplotlib, torchmetrics, einops, tqdm, cloudpickle and packaging, but not this library's RL and data packages.
# Run here (where pip reaches a registry) from the repository root: it downloads, into a fresh .whl/, the versions
# installed here, built for the GPU machine's Python (PYVER, default 3.12). There, `source benchmarks/gpu_env.sh`
# installs them (gpu_check.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
rm -rf .whl  # one version of each package: two would stop the install there
for name in tensordict torchrl hoptorch pyvers orjson importlib_metadata gymnasium farama-notifications mlxtend; do
    version=$(python -c "import importlib.metadata as m; print(m.version('$name'))")
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
ls .whl
