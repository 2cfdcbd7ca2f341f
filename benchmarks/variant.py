"""A grid's variant as a value: parsed once from its label, read by `compare` and `report` alike.

Label grammar: `method[:key=value,key=value...][ @solver]`, e.g. `baseline`, `td:stride=6`, `tdoff:stride=6`,
`td:estimator=nstep,n_steps=2,full_reach=true @dpmpp_2m`. `method` is a `diffusion_rl.config.METHODS` name, the keys
are `Args` fields, and the solver is the one the records were scored with ("default": the family's own, written
without the `@` part). The options keep the order they were written in, so a label round-trips exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from urllib.parse import quote

from diffusion_rl.config import Args, apply_preset, cast_field
from diffusion_rl.errors import ConfigError

__all__ = ["Variant"]


@dataclass(frozen=True)
class Variant:
    """method, its option overrides as written ((key, value) pairs), and the solver."""

    method: str
    options: tuple[tuple[str, str], ...] = ()
    solver: str = "default"

    @classmethod
    def parse(cls, label: str) -> "Variant":
        """'td:stride=2,n_steps=2 @dpmpp_2m' -> Variant('td', (('stride', '2'), ('n_steps', '2')), 'dpmpp_2m')."""
        text, _, solver = label.partition(" @")
        method, _, opts = text.partition(":")
        options = []
        for item in filter(None, opts.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"variant option {item!r} in {label!r} must be key=value")
            options.append((key, value))
        return cls(method, tuple(options), solver or "default")

    @property
    def base(self) -> str:
        """The label without the solver ('td:stride=2')."""
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.method}:{opts}" if opts else self.method

    @property
    def label(self) -> str:
        """The label as written ('td:stride=2 @dpmpp_2m'; the default solver unnamed)."""
        return self.base if self.solver == "default" else f"{self.base} @{self.solver}"

    def __str__(self) -> str:
        return self.label

    @property
    def given(self) -> dict[str, str]:
        """The options it sets, as written."""
        return dict(self.options)

    @property
    def is_baseline(self) -> bool:
        return self.method == "baseline"

    def args(self, base: Args) -> Args:
        """`base` with this variant's method and options (each cast to its Args field's type; ConfigError names a bad
        key or value), then its presets for the options it does not set."""
        values = {k: cast_field(Args, k, v) for k, v in self.options}
        return apply_preset(dataclasses.replace(base, method=self.method, **values), set(values))

    def on_solver(self, solver: str) -> "Variant":
        """The same run scored by another solver."""
        return dataclasses.replace(self, solver=solver)

    def at_steps(self, steps: int) -> "Variant":
        """The variant that trains for `steps` ('td' -> 'td:steps=N'): what a run scored on its way equals."""
        return dataclasses.replace(self, options=(*self.options, ("steps", str(steps))))

    def without(self, key: str) -> "Variant":
        """The variant without option `key` ('td:stride=6,steps=750' -> 'td:stride=6'): a budget grid's method."""
        return dataclasses.replace(self, options=tuple((k, v) for k, v in self.options if k != key))

    def folder(self) -> str:
        """The label (without solver) as a folder name, one to one ('td:stride=6,n_steps=2' ->
        'td@stride=6+n_steps=2'; other characters than letters, digits, '_.-~=' are %-escaped)."""
        escaped = self.base.replace("%", "%25").replace("@", "%40").replace("+", "%2B")  # frees '@' and '+'
        return quote(escaped.replace(":", "@").replace(",", "+"), safe="@+=%")
