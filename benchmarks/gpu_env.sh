# Source from the repository root on a GPU machine: `source benchmarks/gpu_env.sh`. Wheels in .whl/ (from
# benchmarks/gpu_wheels.sh, for a machine with no package index) go to /tmp/site, and the repository and they go on
# PYTHONPATH; elsewhere the library is installed with pip. Use the machine's python by its name on PATH, not through
# a symbolic link of your own to a virtual environment's python: Python run through such a link does not see that
# environment's packages.
(return 0 2>/dev/null) || { echo "gpu_env.sh sets up this shell: source it, do not run it" >&2; exit 1; }
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || return 1
    rm -rf /tmp/site/benchmarks  # the torchrl wheel carries a top-level 'benchmarks' package; ours must win
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python -c "import diffusion_rl" 2>/dev/null; then
    python -m pip install -q -e '.[mnist]' || return 1
fi
python -c "import torch, tensordict, torchrl; print('torch', torch.__version__, 'tensordict', tensordict.__version__,
      'torchrl', torchrl.__version__, 'cuda', torch.cuda.is_available())" || return 1
