"""Declared hyper-parameters: each stage names the traced numbers it reads.

A round's numeric hyper-parameters (learning rates, clip norms, noise multipliers, FedProx's
``mu``...) are traced arguments, so changing one never recompiles and a sweep can ``vmap``
over them. Each piece of the round that reads one DECLARES it with an :class:`HParam`
(name, default, domain, help): client updates (:class:`fedjax_dp.ClientUpdate`), stages
(:class:`fedjax_dp.RoundTransform` / :class:`fedjax_dp.DPTransform`, field ``hparams``) and the
round itself (``server_lr``). :func:`fedjax_dp.build_round` collects the declarations into
``Round.hparams``, and everything downstream derives from that one list:

- ``Simulation.make_hparams`` fills every declared name (the config's value, else the
  declared default), refuses undeclared names and checks each value against its domain;
- ``fedjax-dp hparams CONFIG`` prints the run's table (name, value, domain, help);
- ``sweep.grid`` (``fedjax-dp sweep``) accepts any declared name as an axis.

Adding a stage with a new hyper-parameter is therefore one file: declare it next to the
code that reads it.

A :class:`DPTransform` also implies declarations from its privacy fields (its sensitivity
names are clip norms, ``> 0``; its noise multiplier is ``>= 0``), so a user's own DP stage is
checked even if it declares nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Domain:
    """The set of values a hyper-parameter may take, and how to say it in an error."""

    name: str
    contains: Callable[[float], bool]
    text: str

    def __repr__(self) -> str:
        return self.name


POSITIVE = Domain("positive", lambda v: 0 < v < math.inf, "finite and > 0")
NONNEGATIVE = Domain("nonnegative", lambda v: 0 <= v < math.inf, "finite and >= 0")
UNIT_INTERVAL = Domain("unit_interval", lambda v: 0 <= v <= 1, "in [0, 1]")
REAL = Domain("real", math.isfinite, "finite")


@dataclasses.dataclass(frozen=True)
class HParam:
    """One traced hyper-parameter of a round.

    Attributes:
      name: the key in ``hparams``.
      default: its value when neither the config nor the caller sets it (``None``: it must
        be given).
      domain: the values it may take (:data:`POSITIVE`, :data:`NONNEGATIVE`,
        :data:`UNIT_INTERVAL`, :data:`REAL`); checked on the host before a run.
      help: one line for ``fedjax-dp hparams`` and error messages.
      from_state: the round sets it from a stage's state every round (its
        ``state_hparams`` hook, e.g. an adaptive clip norm); callers must not pass it.
    """

    name: str
    default: float | None
    domain: Domain
    help: str = ""
    from_state: bool = False

    def renamed(self, name: str) -> HParam:
        """The same declaration under another key (a stage built with custom names)."""
        return dataclasses.replace(self, name=name)

    def set_from_state(self, name: str) -> HParam:
        """The same declaration under ``name``, set from a stage's state each round."""
        return dataclasses.replace(self, name=name, from_state=True)

    def check(self, value: Any) -> float:
        """``float(value)``, or ValueError naming the hyper-parameter and the fix."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}={value!r} is not a number") from None
        if math.isnan(v):
            raise ValueError(f"{self.name}=nan is not a number; give a value {self.domain.text}")
        if not self.domain.contains(v):
            hint = f" ({self.help})" if self.help else ""
            raise ValueError(f"{self.name}={v:g} must be {self.domain.text}{hint}")
        return v


# The library's hyper-parameters, declared once here and used by the stages that read them.
CLIENT_LR = HParam("client_lr", 0.1, NONNEGATIVE, "local optimizer learning rate")
SERVER_LR = HParam("server_lr", 1.0, NONNEGATIVE, "server optimizer learning rate")
CLIP_NORM = HParam("clip_norm", 1.0, POSITIVE, "bound on each client's delta (user-level DP)")
NOISE_MULTIPLIER = HParam(
    "noise_multiplier", 1.0, NONNEGATIVE, "noise std / clip norm (0 means no noise)"
)
EXAMPLE_CLIP_NORM = HParam(
    "example_clip_norm", 1.0, POSITIVE, "bound on each example's gradient (DP-SGD)"
)
EXAMPLE_NOISE_MULTIPLIER = HParam(
    "example_noise_multiplier", 1.0, NONNEGATIVE, "DP-SGD noise std / example clip norm"
)
MU = HParam("mu", 0.01, NONNEGATIVE, "FedProx proximal weight (0 is FedAvg)")
TARGET_QUANTILE = HParam(
    "target_quantile", 0.5, UNIT_INTERVAL, "adaptive clipping's quantile (0.5: the median norm)"
)
CLIP_LR = HParam("clip_lr", 0.2, NONNEGATIVE, "adaptive clipping's geometric learning rate")
CLIPPED_COUNT_STDDEV = HParam(
    "clipped_count_stddev", None, NONNEGATIVE, "noise std of adaptive clipping's count"
)

#: Every hyper-parameter the library's own stages declare, by name (for checks of a bare
#: mapping, e.g. the hparams a privacy schedule produces).
LIBRARY = {
    h.name: h
    for h in (
        CLIENT_LR,
        SERVER_LR,
        CLIP_NORM,
        NOISE_MULTIPLIER,
        EXAMPLE_CLIP_NORM,
        EXAMPLE_NOISE_MULTIPLIER,
        MU,
        TARGET_QUANTILE,
        CLIP_LR,
        CLIPPED_COUNT_STDDEV,
        HParam("control_clip_norm", 1.0, POSITIVE, "bound on each SCAFFOLD control upload"),
        HParam(
            "control_noise_multiplier", 1.0, NONNEGATIVE, "control noise std / control clip norm"
        ),
    )
}


def _implied(name: str, like: HParam) -> HParam:
    """The declaration a DP stage's field implies for the hparam ``name``."""
    if name in LIBRARY:
        return LIBRARY[name]
    if name.startswith("clip_norm[") and like is CLIP_NORM:
        return HParam(name, 1.0, POSITIVE, f"bound on the delta of the group {name[9:]}")
    return like.renamed(name)


def of_stage(stage: Any) -> tuple[HParam, ...]:
    """What a stage (or client update) declares, plus what a DP stage's fields imply."""
    out = list(getattr(stage, "hparams", None) or ())
    if hasattr(stage, "sensitivity") and hasattr(stage, "noise_multiplier"):
        names = {h.name for h in out}
        sens = (stage.sensitivity,) if isinstance(stage.sensitivity, str) else stage.sensitivity
        for name in sens:
            if name not in names:
                out.append(_implied(name, CLIP_NORM))
        if stage.noise_multiplier and stage.noise_multiplier not in names:
            out.append(_implied(stage.noise_multiplier, NOISE_MULTIPLIER))
    return tuple(out)


def collect(parts: Iterable[Any]) -> tuple[HParam, ...]:
    """The union of the declarations of ``parts`` (stages, client updates, HParams).

    A name declared twice must have the same domain (the first default and help win). A
    name that any part marks ``from_state`` is set from state.

    Raises:
      ValueError: two parts declare one name with different domains.
    """
    out: dict[str, HParam] = {}
    for part in parts:
        for h in (part,) if isinstance(part, HParam) else of_stage(part):
            old = out.get(h.name)
            if old is None:
                out[h.name] = h
                continue
            if old.domain != h.domain:
                raise ValueError(
                    f"hparam {h.name!r} is declared twice with different domains "
                    f"({old.domain.name} and {h.domain.name}); give one stage another name"
                )
            if h.from_state and not old.from_state:
                out[h.name] = dataclasses.replace(old, from_state=True)
    return tuple(out.values())


def resolve(
    specs: Iterable[HParam],
    configured: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Host floats for every declared (caller-given) hyper-parameter, checked.

    Each value is ``overrides[name]``, else ``configured[name]``, else the declared default.

    Raises:
      ValueError: an override that is not declared (the message lists those that are), a
        hyper-parameter without value, or a value outside its domain.
    """
    specs = [h for h in specs if not h.from_state]
    by_name = {h.name: h for h in specs}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(by_name))
    if unknown:
        raise ValueError(
            f"unknown hparams {unknown}; this run declares {sorted(by_name)} "
            "(`fedjax-dp hparams CONFIG` lists them with their domains)"
        )
    configured = dict(configured or {})
    out = {}
    for h in specs:
        value = overrides.get(h.name, configured.get(h.name, h.default))
        if value is None:
            raise ValueError(f"hparam {h.name!r} ({h.help or 'no help'}) has no default: set it")
        out[h.name] = h.check(value)
    return out


def check(values: Mapping[str, Any], specs: Iterable[HParam] | None = None) -> None:
    """Checks each value against its declaration (``specs``, else :data:`LIBRARY`; names
    of a per-layer clip norm ``clip_norm[pattern]`` are clip norms). Undeclared names are
    only checked to be numbers."""
    by_name = dict(LIBRARY)
    by_name.update({h.name: h for h in specs or ()})
    for name, value in values.items():
        h = by_name.get(name)
        if h is None and name.startswith("clip_norm["):
            h = _implied(name, CLIP_NORM)
        (h or HParam(name, None, REAL)).check(value)


def table(specs: Iterable[HParam], values: Mapping[str, float]) -> str:
    """A text table of the declarations and the values a run uses."""
    rows = [("name", "value", "domain", "help")]
    for h in specs:
        v = values.get(h.name, h.default)
        value = "from state" if h.from_state else ("required" if v is None else f"{v:g}")
        rows.append((h.name, value, h.domain.text, h.help))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows
    ).rstrip()
