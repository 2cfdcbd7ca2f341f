"""Checkpoints on disk: loading them safely (`torch.load(weights_only=True)`, every field a reader uses checked),
the denoiser of a checkpoint (`load_denoiser`), and what a resumed run must share with the checkpoint it resumes
(`run_identity`: the config less the settings a resume may change, RESUME_MAY_CHANGE). `Learner` (training.py)
writes them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .networks import Denoiser

__all__ = ["load_checkpoint", "check_checkpoint_fields", "check_data_hash", "load_denoiser", "RESUME_MAY_CHANGE",
           "checkpoint_identity", "run_identity", "config_diff"]


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True; a missing or corrupt file raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or not a diffusion-rl checkpoint ({type(e).__name__})")
    missing = {"model", "ema", "optimizer", "step", "config", "rng"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ConfigError(f"checkpoint {str(path)!r} is not a diffusion-rl checkpoint (missing {sorted(missing)})")
    check_checkpoint_fields(ckpt, path)
    return ckpt


# the config entries a checkpoint's readers use, with their types (the first two are required)
CHECKPOINT_CONFIG_TYPES: dict[str, type] = {"network": dict, "formulation": dict, "dataset": str, "train": dict,
                                            "method": str}


def check_checkpoint_fields(ckpt: dict, path: str | Path) -> None:
    """Raise ConfigError naming the first field of a loaded checkpoint whose type its readers cannot use (a step
    that is not an integer >= 0, a config entry of another type)."""
    where = f"checkpoint {str(path)!r} is corrupt"
    for key in ("step", "images_seen"):
        v = ckpt.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{where}: its {key} {v!r} is not an integer >= 0")
    cfg = ckpt["config"]
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: its config is a {type(cfg).__name__}, not a dict")
    for key, kind in CHECKPOINT_CONFIG_TYPES.items():
        if (key in cfg or key in ("network", "formulation")) and not isinstance(cfg.get(key), kind):
            raise ConfigError(f"{where}: its {key} config is a {type(cfg.get(key)).__name__}, not a {kind.__name__}")
    if not isinstance(cfg["formulation"].get("name"), str):
        raise ConfigError(f"{where}: its formulation config names no formulation")


def check_data_hash(dataset, config: dict, checkpoint: str | Path) -> None:
    """Raise ConfigError when `dataset`'s content differs from the data the checkpoint (its `config`) recorded it
    was trained on; a checkpoint without a recorded hash passes."""
    saved, now = config.get("data_hash"), dataset.content_hash()
    if saved is not None and saved != now:
        raise ConfigError(f"the data {dataset.name!r} differs from the data {str(checkpoint)!r} was trained on "
                          f"({config.get('dataset')!r}): content hash {now} now vs {saved} saved; pass the data it "
                          f"was trained on")


def load_denoiser(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> tuple[Denoiser, dict]:
    """(EMA denoiser in eval mode, or the online one with ema=False; the checkpoint's config) from a checkpoint."""
    from .formulations import make_formulation
    from .networks import network_from_config

    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    fcfg = dict(cfg["formulation"])
    formulation = make_formulation(fcfg.pop("name"), **fcfg)
    denoiser = Denoiser(network_from_config(cfg["network"]), formulation)
    try:
        denoiser.load_state_dict(ckpt["ema" if ema else "model"])
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint {str(path)!r}: its tensors do not fit its network config ({first})") from None
    denoiser.step = int(ckpt["step"])
    return denoiser.to(device).eval(), cfg


# train settings a resume may change without changing the run's identity
RESUME_MAY_CHANGE: tuple[str, ...] = ("lr", "checkpoint_every", "checkpoint_seconds", "log_every", "tensorboard",
                                      "precision", "compile", "channels_last", "tf32")


def checkpoint_identity(path: Path) -> dict:
    """{"run_id", "step"} of a checkpoint, read without loading its tensors; {} when unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {"run_id": str(ckpt.get("run_id")), "step": int(ckpt.get("step"))}
    except Exception:  # noqa: BLE001 - unreadable: another run's, or none
        return {}


def run_identity(config: dict) -> dict:
    """A run's config without the train settings a resume may change (RESUME_MAY_CHANGE)."""
    out = dict(config)
    out["train"] = {k: v for k, v in config.get("train", {}).items() if k not in RESUME_MAY_CHANGE}
    out["train"].setdefault("optimizer", "adam")  # checkpoints before RAdam was offered trained with Adam
    mc = config.get("method_config")
    if isinstance(mc, dict) and "lambda" in mc:  # checkpoints before the base weight had one name
        out["method_config"] = mc = {("base_lambda" if k == "lambda" else k): v for k, v in mc.items()}
    form = config.get("formulation")
    if isinstance(form, dict) and form.get("name") in ("ct", "ict") and "kappa" not in form:
        # TD-CT checkpoints from before the release's loss (method.md §10.1-§10.3) were trained with the library's
        # earlier choices: a resume must name them (--ct-kappa shared-path ...), never switch maths silently
        old = {"kappa": "shared-path", "boundary": "mask",
               "distance": "l2" if form["name"] == "ct" else "pseudo_huber"}
        out["formulation"] = {**old, **({"weight": "uniform"} if form["name"] == "ct" else {}), **form}
        if isinstance(mc, dict):
            out["method_config"] = {"ct_target": "eval", **mc}
    return out


def config_diff(a: Any, b: Any, prefix: str = "") -> str:
    """The first differing key between two nested config dicts, as 'key: saved X vs now Y'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: saved {a!r} vs now {b!r}"
