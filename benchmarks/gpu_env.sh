# Source from the repository root on a GPU machine: `source benchmarks/gpu_env.sh`. Wheels in .whl/ (from
# benchmarks/gpu_wheels.sh, for a machine with no package index) go to /tmp/site, and the repository and they go on
# PYTHONPATH; elsewhere the library is installed with pip. Call python through PATH: a virtual environment's python
# reached through a symbolic link outside it loses that environment's packages.
if [ -d .whl ]; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || return 1
    rm -rf /tmp/site/benchmarks  # the torchrl wheel carries a top-level 'benchmarks' package; ours must win
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python -c "import diffusion_rl" 2>/dev/null; then
    pip install -q -e '.[mnist]' || return 1
fi
python -c "import torch, tensordict, torchrl; print('torch', torch.__version__, 'tensordict', tensordict.__version__,
      'torchrl', torchrl.__version__, 'cuda', torch.cuda.is_available())" || return 1
