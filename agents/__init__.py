"""Agents: the TD policy-evaluation agent (method.md §2-§10), its TorchRL loss, estimators, pure maths, baselines."""
from .baselines import ConsistencyBaseline, DiffusionBaseline
from .estimators import ESTIMATORS, make_estimator, returns, td_errors
from .functional import REWEIGHTINGS, combine_losses, split_objective, td_weight
from .td_evaluator import TARGET_UPDATES, TDEvaluator, TDSettings
from .td_loss import TDLoss

__all__ = ["DiffusionBaseline", "ConsistencyBaseline", "TDEvaluator", "TDLoss", "TDSettings", "ESTIMATORS",
           "REWEIGHTINGS", "TARGET_UPDATES", "make_estimator", "returns", "td_errors", "td_weight", "combine_losses", "split_objective"]
