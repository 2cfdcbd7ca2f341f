"""Readable names for the rows and panels of the benchmark report: a variant's label from its record's settings
(`describe`), a solver's table name (`SOLVERS`, `solver_name`, `solver_names`), the split of a row label
'variant @solver' (`split_label`, `is_baseline`) and the solvers a summary holds (`solvers_of`)."""
from __future__ import annotations

import math

from benchmarks.variant import Variant
from diffusion_rl.config import Args
from diffusion_rl.formulations import make_formulation

SOLVERS = {"default": "Heun (Euler at even NFE)", "dpmpp_2m": "DPM-Solver++(2M)",
           "dpmpp_2m_lof": "DPM-Solver++(2M) lower-order final", "ipndm": "iPNDM",
           "ddim": "DDIM", "heun": "Heun", "euler": "Euler"}
DEFAULT_TARGET_TAU = Args().target_tau  # a label names the target rate only where a run set another


def split_label(variant: str) -> tuple[str, str]:
    """'td:stride=2 @dpmpp_2m' -> ('td:stride=2', 'dpmpp_2m'); no '@' means the family's default solver."""
    v = Variant.parse(variant)
    return v.base, v.solver


def is_baseline(variant: str) -> bool:
    return Variant.parse(variant).is_baseline


def describe(fields: dict) -> str:
    """A readable label from a record's settings: 'EDM baseline', 'TD(0) k=3', 'n-step(2) k=2, δ 0.1', ...; options
    are named where they differ from the formulation's own defaults (and the target rate from the CLI's 0.999)."""
    name = fields.get("formulation") or "edm"
    form = make_formulation(name)
    tau = fields.get("target_tau")
    tau_text = f"target τ {tau:g}" if tau is not None and not math.isclose(tau, DEFAULT_TARGET_TAU) else ""
    recipe = _consistency_recipe(fields, form)
    if fields.get("method") in (None, "baseline") or str(fields.get("method", "")).endswith("baseline"):
        label = {"EDM": "EDM baseline", "VP": "DDPM eps baseline"}.get(name.upper(), f"{name.upper()} baseline")
        return ", ".join([label] + recipe + ([tau_text] if tau_text else []))
    est, n = fields.get("estimator"), fields.get("n_steps")
    head = {"td0": "TD(0)", "nstep": f"n-step({n})"}.get(est, f"TD(λ={fields.get('lmbda')}, n={n})")
    parts = [f"{head} k={fields.get('stride'):g}"]
    if name != "edm":
        parts[0] = f"TD-{name.upper()} " + parts[0]
    if fields.get("full_reach"):
        parts.append("full reach")
    if fields.get("one_step") is not None and not math.isclose(fields["one_step"], form.default_one_step):
        parts.append(f"δ {fields['one_step']:g}")
    if fields.get("coupling") and fields["coupling"] != form.default_coupling:
        parts.append(f"{fields['coupling']} coupling")
    if fields.get("reweighting") and fields["reweighting"] != form.default_reweighting:
        parts.append("no reweighting" if fields["reweighting"] == "none" else f"{fields['reweighting']} weights")
    parts += recipe
    if fields.get("base_lambda") is not None and not math.isclose(fields["base_lambda"], 0.5):
        parts.append(f"λ {fields['base_lambda']:g}")
    if fields.get("shared_until"):
        parts.append(f"shared coupling for the first {fields['shared_until']:.0%}")
    if fields.get("target_rampup"):
        parts.append(f"target ramp-up {fields['target_rampup']:g}")
    if fields.get("target_halflife_images"):
        parts.append(f"target half-life {fields['target_halflife_images']:g} img")
    elif tau_text:
        parts.append(tau_text)
    if str(fields.get("method", "")).startswith("tdoff"):  # the matched control: the TD run without its TD term
        parts.append("TD term off")
    return ", ".join(parts)


def _consistency_recipe(fields: dict, form) -> list[str]:
    """What a CT / iCT record changes from the library's own recipe (method.md §10.1-§10.4): the preset, the TD-CT
    loss's earlier choices, the grid size, the target's mode; [] for the other families."""
    if not getattr(form, "consistency", False):
        return []
    loss = fields.get("ct_loss") or {}
    parts = [f"{fields['preset']} recipe"] if fields.get("preset") else []
    if loss.get("kappa") == "shared-path":
        parts.append("shared-path κ")
    if loss.get("boundary") == "mask":
        parts.append("masked boundary")
    if fields.get("ct_target") == "eval":
        parts.append("eval-mode target")
    if not fields.get("preset") and fields.get("ct_steps") not in (None, form.steps):
        parts.append(f"N={fields['ct_steps']}")
    return parts


def solver_name(d: dict, solver: str) -> str:
    """A table's name for `solver`; "default" is named by the samplers its records used (Heun/Euler for EDM, DDIM
    for VP, the one-step / multistep sampler for CT)."""
    if solver != "default":
        return SOLVERS.get(solver, solver)
    used = {r.get("sampler") for recs in d.get("runs", {}).values() for r in recs
            if split_label(r.get("variant", ""))[1] == "default"} - {None}
    if not used or used <= {"heun", "euler"}:
        return SOLVERS["default"]
    if used <= {"onestep", "multistep"}:
        return "one step (NFE 1), multistep CT sampling (NFE >= 2)"
    return ", ".join(SOLVERS.get(u, u) for u in sorted(used))


def solver_names(d: dict) -> dict[str, str]:
    """Each solver of a compare JSON -> its table name."""
    return {solver: solver_name(d, solver) for solver in solvers_of(d["summary"])}


def solvers_of(summary: list[dict]) -> list[str]:
    """The solvers of a compare JSON's summary rows, in their order of appearance."""
    return list(dict.fromkeys(split_label(s["variant"])[1] for s in summary))
