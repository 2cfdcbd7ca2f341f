"""Agents: the TD policy-evaluation agent (spec 3-5), its TorchRL loss and estimators, and plain diffusion baselines."""
from .baselines import DiffusionBaseline
from .estimators import ESTIMATORS, make_estimator, returns, td_errors
from .td_evaluator import REWEIGHTINGS, TARGET_UPDATES, TDEvaluator, TDLoss, combine_losses, td_weight

__all__ = ["DiffusionBaseline", "TDEvaluator", "TDLoss", "ESTIMATORS", "REWEIGHTINGS", "TARGET_UPDATES",
           "make_estimator", "returns", "td_errors", "td_weight", "combine_losses"]
