"""Agents: the TD policy-evaluation agent and the plain diffusion baselines."""
from .baselines import DiffusionBaseline

__all__ = ["DiffusionBaseline"]
