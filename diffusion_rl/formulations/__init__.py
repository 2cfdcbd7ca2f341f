"""Diffusion formulations behind one interface.

A formulation owns the noise process: its index grid (index grows toward the data), noising, coupled pairs of
states, posterior coefficients, the preconditioning that turns a raw network into an x0-predicting denoiser, and
the base loss weight. The TD layer (envs/, agents/) asks nothing else of it. The interface and the helpers the
formulations share are in base.py, each family in its own module:

- `EDMFormulation` ("edm", edm.py): VE, continuous time, the rho grid (method.md §1, §3).
- `VPFormulation`  ("vp", alias "ddpm", vp.py): DDPM discrete time; the network predicts eps (method.md §9).
- `CTFormulation`  ("ct", consistency.py): the EDM grid with the consistency boundary parametrisation (method.md §10).
- `ICTFormulation` ("ict", consistency.py): CT as improved consistency training has it: a curriculum of grid
  sizes, log-normal levels, the pseudo-Huber loss with 1 / (sigma_n - sigma_n+1) weights (method.md §10).

Levels are noise levels: sigma for EDM/CT, the (possibly fractional) timestep t for VP. Per-sample levels are
1-D tensors of shape [B]; `expand_as_image` broadcasts them over image dimensions.
"""
from __future__ import annotations

from ..errors import check_choice
from .base import COUPLINGS, Coupling, Formulation, expand_as_image, mean_pixels, parse_coupling, ve_coupling
from .consistency import (CT_BOUNDARIES, CT_KAPPAS, CT_WEIGHTS, CTFormulation, ICTFormulation, make_distance,
                          parse_ct_grid, pseudo_huber)
from .edm import EDMFormulation
from .vp import VPFormulation

__all__ = [
    "COUPLINGS",
    "Coupling",
    "parse_coupling",
    "ve_coupling",
    "mean_pixels",
    "Formulation",
    "EDMFormulation",
    "VPFormulation",
    "CTFormulation",
    "ICTFormulation",
    "CT_KAPPAS",
    "CT_BOUNDARIES",
    "CT_WEIGHTS",
    "parse_ct_grid",
    "make_distance",
    "FORMULATIONS",
    "pseudo_huber",
    "make_formulation",
    "expand_as_image",
]

FORMULATIONS: dict[str, type[Formulation]] = {
    "edm": EDMFormulation, "ve": EDMFormulation, "vp": VPFormulation, "ddpm": VPFormulation, "ct": CTFormulation,
    "ict": ICTFormulation,
}


def make_formulation(spec: str | Formulation, **kwargs) -> Formulation:
    """A formulation from its name ("edm", "vp"/"ddpm", "ct", "ict") or an instance (returned as is)."""
    if isinstance(spec, Formulation):
        return spec
    check_choice("formulation", spec, FORMULATIONS)
    return FORMULATIONS[spec](**kwargs)
