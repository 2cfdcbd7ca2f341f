"""diffusion-rl: train diffusion models with temporal-difference learning.

Core: `formulations` (EDM, VP/DDPM, CT), `networks` (raw nets and the preconditioned `Denoiser`), `samplers`,
`data`, `metrics` (with `feature_net`, the FID classifier and its data split), `training` (the shared `Learner`
loop) and `evaluation` (FID across NFE). The RL layer lives in the sibling packages `envs` (DiffusionMRP) and
`agents` (TDEvaluator, baselines). The method is explained in docs/method.md.

The names below are imported on first use, so `import diffusion_rl` (and the command line's --help) stays fast.
"""
from __future__ import annotations

import importlib

from .errors import ConfigError

__version__ = "0.1.0"

_LAZY = {
    "Formulation": "formulations", "EDMFormulation": "formulations", "VPFormulation": "formulations",
    "CTFormulation": "formulations", "make_formulation": "formulations",
    "UNet": "networks", "MLP": "networks", "Denoiser": "networks", "build_network": "networks",
    "sample": "samplers", "SampleResult": "samplers",
    "Learner": "training", "TrainConfig": "training",
}
__all__ = ["ConfigError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
