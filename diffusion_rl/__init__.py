"""diffusion-rl: train diffusion models with temporal-difference learning.

Core: `formulations` (EDM, VP/DDPM, CT), `networks` (raw nets and the preconditioned `Denoiser`), `samplers`,
`data`, `metrics`, `training` (the shared `Learner` loop) and `evaluation` (FID across NFE). The RL layer lives in
the sibling packages `envs` (DiffusionMRP) and `agents` (TDEvaluator, baselines).
"""
from .errors import ConfigError
from .formulations import CTFormulation, EDMFormulation, Formulation, VPFormulation, make_formulation
from .networks import MLP, Denoiser, UNet, build_network
from .samplers import SampleResult, sample
from .training import Learner, TrainConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "Formulation", "EDMFormulation", "VPFormulation", "CTFormulation", "make_formulation",
           "UNet", "MLP", "Denoiser", "build_network", "sample", "SampleResult", "Learner", "TrainConfig"]
