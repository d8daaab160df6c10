"""Named federated algorithms: recipes that only configure the engine's pieces."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_dp.core import aggregators, base, memory, sampling
from fedjax_dp.core import hparams as hparams_lib
from fedjax_dp.core import systems as systems_lib
from fedjax_dp.core.client import ClientUpdate, build_client_update
from fedjax_dp.core.round import Round, ServerState, build_round
from fedjax_dp.mechanisms import aggregation
from fedjax_dp.mechanisms import clipping as clipping_lib
from fedjax_dp.models import Model, cross_entropy

ALGORITHMS = (
    "fedavg",
    "fedsgd",
    "dp_fedavg",
    "dp_sgd_fedavg",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "scaffold",
)
#: Algorithms that take user-level DP when ``clip_norm`` (or another DP option) is set;
#: ``dp_fedavg`` always has it.
_OPTIONAL_USER_DP = ("fedprox", "scaffold")
_SERVER_ALIASES = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
#: User-level DP mechanisms of ``dp_fedavg`` (``AlgorithmConfig.mechanism``).
MECHANISMS = ("gaussian", "laplace", "local_gaussian")


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Everything that defines a federated algorithm run (static shape + numeric defaults).

    The numeric fields the round reads (:func:`hparams_of`; each declared by its stage, see
    :mod:`fedjax_dp.core.hparams`) become the traced ``hparams`` of the round: changing them
    does not recompile. The others fix shapes and code paths.
    """

    name: str = "fedavg"
    sampling: str = "fixed"
    cohort_size: int | None = 10
    sampling_rate: float | None = None
    local_epochs: int | None = 1
    local_steps: int | None = None
    batch_size: int | None = 16
    client_optimizer: str = "sgd"
    client_lr: float = 0.1
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    weighting: str = "uniform"
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    example_clip_norm: float | None = None
    example_noise_multiplier: float | None = None
    chunk_size: int | None = None
    memory_budget_mb: float | None = None
    clipping: str = "auto"
    mechanism: str = "gaussian"
    adaptive_clipping: bool = False
    target_quantile: float | None = None
    clip_lr: float | None = None
    clipped_count_stddev: float | None = None
    layer_clip_norms: str | None = None
    mu: float | None = None
    control_clip_norm: float | None = None
    control_noise_multiplier: float | None = None
    straggler_fraction: float = 0.0
    straggler_policy: str | None = None
    dropout_rate: float = 0.0
    min_clients: int = 0

    @property
    def user_dp(self) -> bool:
        return self.clip_norm is not None or bool(self.layer_clip_norms)

    @property
    def systems(self) -> systems_lib.Systems:
        """The systems model (stragglers, dropout, min_clients) of this config."""
        return systems_lib.systems(
            self.straggler_fraction,
            self.straggler_policy or "drop",
            self.dropout_rate,
            self.min_clients,
        )

    @property
    def example_dp(self) -> bool:
        return self.example_clip_norm is not None


def resolve(config: AlgorithmConfig) -> AlgorithmConfig:
    """Applies the named algorithm's recipe to ``config`` and validates it.

    - ``fedavg``: local epochs of an optax optimizer, server SGD (lr 1 is plain FedAvg).
    - ``fedsgd``: one local step of plain SGD (lr 1) on the whole client dataset, so each
      delta is minus the client's gradient; ``server_lr`` is the learning rate.
    - ``dp_fedavg``: user-level DP (McMahan et al. 2018): clip each delta to ``clip_norm``,
      sum, Gaussian noise ``noise_multiplier * clip_norm``, divide by the expected cohort
      size. Uniform weighting. Defaults ``clip_norm=1``, ``noise_multiplier=1``.
    - ``dp_sgd_fedavg``: example-level DP-SGD inside each client (per-example clipping to
      ``example_clip_norm`` and noise ``example_noise_multiplier`` on every local step).
    - ``fedadam``/``fedyogi``/``fedadagrad`` (Reddi et al. 2021): FedAvg with that server
      optimizer (``server_lr`` around 1e-2 is typical).
    - ``fedprox`` (Li et al. 2020): FedAvg with the proximal term ``mu/2 |w - w_global|^2``
      in every client's objective (``mu`` traced, default 0.01) and stragglers' partial
      work kept (``straggler_policy="partial"``).
    - ``scaffold`` (Karimireddy et al. 2020, option II): control variates correct the
      client drift; each client's control variate is per-client state. Uniform weighting,
      plain SGD locally.

    ``fedprox`` and ``scaffold`` take user-level DP when ``clip_norm`` is set (and
    ``noise_multiplier``, default 1): the Gaussian mechanism of ``dp_fedavg``. SCAFFOLD's
    control-variate upload is a second release: it is clipped to ``control_clip_norm``
    (default ``clip_norm``) and noised with ``control_noise_multiplier`` (default
    ``noise_multiplier``) over the same cohort, and the round is accounted as one Gaussian
    mechanism whose noise multiplier combines both
    (:meth:`Simulation.round_privacy`).

    Systems heterogeneity (:mod:`fedjax_dp.systems`; every algorithm): ``straggler_fraction``
    of the clients run fewer local epochs; ``straggler_policy`` ``"drop"`` (default, FedAvg)
    or ``"partial"`` (default for ``fedprox``); ``dropout_rate`` of the uploads are lost
    after training; a round with fewer than ``min_clients`` uploads is skipped.

    ``dp_fedavg`` options (see :mod:`fedjax_dp.mechanisms.aggregation` for each mechanism's
    sensitivity, neighbouring relation and accounting):

    - ``mechanism``: ``"gaussian"`` (default; central noise on the sum), ``"laplace"``
      (L1 clipping to ``clip_norm``, Laplace noise of scale ``noise_multiplier * clip_norm``
      on the sum: pure ``1 / noise_multiplier``-DP per round) or ``"local_gaussian"`` (every
      client adds ``N(0, (noise_multiplier * clip_norm)^2)`` to its own clipped update; no
      central noise; local DP).
    - ``adaptive_clipping=True`` (Andrew et al. 2021; ``mechanism="gaussian"`` only): the
      clip norm becomes round state that starts at ``clip_norm`` (default 0.1) and tracks
      the ``target_quantile`` (0.5) of the update norms with learning rate ``clip_lr`` (0.2)
      from a clipped count noised with std ``clipped_count_stddev`` (default 0.05 x the
      expected cohort size); ``noise_multiplier`` is the round's total, split between the
      deltas and the count.
    - ``layer_clip_norms``: a clip norm per parameter group instead of ``clip_norm``, as
      ``"pattern=norm, ..."`` (e.g. ``"Dense_0=0.5, Dense_1=1.0"``; patterns as in
      :func:`fedjax_dp.clip_per_layer`), or a mapping in Python. The hparams are named
      ``clip_norm[pattern]``; the noise uses the combined ``sqrt(sum_g C_g^2)``.
    """
    c = config
    if c.name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm name {c.name!r}; choose one of {list(ALGORITHMS)}")
    if c.name in _SERVER_ALIASES:
        c = dataclasses.replace(c, server_optimizer=_SERVER_ALIASES[c.name])
    if c.name == "fedsgd":
        c = dataclasses.replace(
            c,
            local_epochs=1,
            local_steps=None,
            batch_size=None,
            client_optimizer="sgd",
            client_lr=1.0,
        )
    if c.name == "fedprox":
        c = dataclasses.replace(
            c,
            mu=0.01 if c.mu is None else c.mu,
            straggler_policy=c.straggler_policy or "partial",
        )
    elif c.mu is not None:
        raise ValueError(
            f"mu (the FedProx proximal weight) is set but algorithm {c.name!r} does not use "
            "it; use name='fedprox' or unset it"
        )
    if c.name == "scaffold":
        if c.weighting != "uniform":
            raise ValueError(
                f"weighting={c.weighting!r}: scaffold averages control variates uniformly; "
                "use weighting='uniform'"
            )
        if c.client_optimizer != "sgd":
            raise ValueError(
                f"client_optimizer={c.client_optimizer!r}: scaffold's control-variate update "
                "(option II) assumes plain local SGD; use client_optimizer='sgd'"
            )
    if c.straggler_policy is None:
        c = dataclasses.replace(c, straggler_policy="drop")
    _ = c.systems  # validates the systems options
    dp_named = c.name == "dp_fedavg" or (
        c.name in _OPTIONAL_USER_DP
        and (c.clip_norm is not None or c.noise_multiplier is not None or c.layer_clip_norms)
    )
    if c.name != "scaffold" or not dp_named:
        extra = [f for f in ("control_clip_norm", "control_noise_multiplier") if getattr(c, f)]
        if extra:
            raise ValueError(
                f"{'/'.join(extra)} set, but only scaffold with user-level DP (clip_norm) "
                "clips and noises control variates; unset them"
            )
    if dp_named:
        c = _resolve_user_dp_options(c)
        if c.name == "scaffold":
            if c.mechanism != "gaussian" or c.adaptive_clipping or c.layer_clip_norms:
                raise ValueError(
                    "scaffold with user-level DP supports mechanism='gaussian' with one fixed "
                    "clip_norm (no adaptive_clipping, no layer_clip_norms)"
                )
            c = dataclasses.replace(
                c,
                control_clip_norm=c.control_clip_norm or c.clip_norm,
                control_noise_multiplier=(
                    c.noise_multiplier
                    if c.control_noise_multiplier is None
                    else c.control_noise_multiplier
                ),
            )
        if c.weighting != "uniform":
            raise ValueError(
                f"weighting={c.weighting!r} is not supported with user-level DP (the sum's "
                "sensitivity must not depend on client data sizes); use weighting='uniform'"
            )
    elif c.clip_norm is not None or c.noise_multiplier is not None:
        raise ValueError(
            f"clip_norm/noise_multiplier (user-level DP) are set but algorithm {c.name!r} does "
            "not use them; use name='dp_fedavg' (or fedprox/scaffold with clip_norm) or unset "
            "them"
        )
    else:
        extra = [f for f in _USER_DP_OPTIONS if (getattr(c, f) or None) != (_DEFAULTS[f] or None)]
        if extra:
            raise ValueError(
                f"{'/'.join(extra)} (user-level DP) set but algorithm {c.name!r} does not use "
                "them; use name='dp_fedavg' or unset them"
            )
    if c.name == "dp_sgd_fedavg":
        c = dataclasses.replace(
            c,
            example_clip_norm=1.0 if c.example_clip_norm is None else c.example_clip_norm,
            example_noise_multiplier=(
                1.0 if c.example_noise_multiplier is None else c.example_noise_multiplier
            ),
        )
    elif c.example_clip_norm is not None or c.example_noise_multiplier is not None:
        raise ValueError(
            "example_clip_norm/example_noise_multiplier (example-level DP) are set but algorithm "
            f"{c.name!r} does not use them; use name='dp_sgd_fedavg' or unset them"
        )
    if c.sampling not in SAMPLINGS:
        raise ValueError(f"sampling={c.sampling!r} must be one of {list(SAMPLINGS)}")
    if c.sampling == "poisson" and c.sampling_rate is None:
        raise ValueError("sampling='poisson' needs sampling_rate (the inclusion probability q)")
    if c.sampling in ("fixed", "shuffle") and c.cohort_size is None:
        raise ValueError(f"sampling={c.sampling!r} needs cohort_size")
    if c.sampling == "shuffle" and (c.user_dp or c.example_dp):
        raise ValueError(
            "sampling='shuffle' (epochs of disjoint cohorts) has no privacy amplification "
            "analysis here, so a DP run cannot be accounted with it; use sampling='fixed' or "
            "'poisson'"
        )
    if c.memory_budget_mb is not None and not c.memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb={c.memory_budget_mb!r} must be positive (MiB)")
    if c.clipping not in clipping_lib.METHODS:
        raise ValueError(f"clipping={c.clipping!r} must be one of {list(clipping_lib.METHODS)}")
    _optimizer(c.client_optimizer, "client_optimizer")
    _optimizer(c.server_optimizer, "server_optimizer")
    check_hparams(hparams_of(c))
    return c


#: Cohort samplers of :class:`AlgorithmConfig` (``fedjax_dp.sampling``).
SAMPLINGS = ("fixed", "poisson", "shuffle")

_USER_DP_OPTIONS = (
    "mechanism",
    "adaptive_clipping",
    "target_quantile",
    "clip_lr",
    "clipped_count_stddev",
    "layer_clip_norms",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AlgorithmConfig)}


def _resolve_user_dp_options(c: AlgorithmConfig) -> AlgorithmConfig:
    """Defaults and consistency of dp_fedavg's options (mechanism, adaptive, per-layer)."""
    if c.mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={c.mechanism!r} must be one of {list(MECHANISMS)}")
    if c.layer_clip_norms == "":
        c = dataclasses.replace(c, layer_clip_norms=None)
    if c.layer_clip_norms is not None:
        if c.clip_norm is not None:
            raise ValueError(
                "clip_norm and layer_clip_norms are both set; give one (layer_clip_norms "
                "replaces the single clip norm by one per parameter group)"
            )
        if c.mechanism == "laplace":
            raise ValueError(
                "layer_clip_norms works with the L2 mechanisms (mechanism='gaussian' or "
                "'local_gaussian'), not mechanism='laplace'"
            )
        parse_layer_clip_norms(c.layer_clip_norms)  # validates
    adaptive = dict(
        target_quantile=c.target_quantile,
        clip_lr=c.clip_lr,
        clipped_count_stddev=c.clipped_count_stddev,
    )
    if c.adaptive_clipping:
        if c.mechanism != "gaussian":
            raise ValueError(
                f"adaptive_clipping needs mechanism='gaussian' (got {c.mechanism!r}): the "
                "clipped count is noised centrally, next to the deltas"
            )
        if c.layer_clip_norms is not None:
            raise ValueError("adaptive_clipping adapts one clip norm; unset layer_clip_norms")
        c = dataclasses.replace(
            c,
            clip_norm=0.1 if c.clip_norm is None else c.clip_norm,
            target_quantile=0.5 if c.target_quantile is None else c.target_quantile,
            clip_lr=0.2 if c.clip_lr is None else c.clip_lr,
        )
    else:
        given = [k for k, v in adaptive.items() if v is not None]
        if given:
            raise ValueError(
                f"{'/'.join(given)} set, but these options configure adaptive clipping, "
                "which is off; set adaptive_clipping=True or unset them"
            )
        if c.layer_clip_norms is None and c.clip_norm is None:
            c = dataclasses.replace(c, clip_norm=1.0)
    if c.noise_multiplier is None:
        c = dataclasses.replace(c, noise_multiplier=1.0)
    return c


def parse_layer_clip_norms(spec) -> tuple[tuple[str, float], ...]:
    """``"Dense_0=0.5, Dense_1=1.0"`` (or a mapping) -> ``(("Dense_0", 0.5), ...)``, in order.

    Raises:
      ValueError: an entry is not ``pattern=number``, a pattern is repeated or not a
        regular expression, or a norm is not finite and > 0.
    """
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            pattern, sep, value = part.rpartition("=")
            if not sep or not pattern.strip():
                raise ValueError(
                    f"layer_clip_norms entry {part.strip()!r} must be 'pattern=norm', e.g. "
                    "'Dense_0=0.5, Dense_1=1.0'"
                )
            try:
                items.append((pattern.strip(), float(value)))
            except ValueError:
                raise ValueError(
                    f"layer_clip_norms entry {part.strip()!r}: {value.strip()!r} is not a number"
                ) from None
    else:
        items = [(str(k), float(v)) for k, v in dict(spec).items()]
    if not items:
        raise ValueError("layer_clip_norms is empty; give 'pattern=norm' entries")
    patterns = [p for p, _ in items]
    if len(set(patterns)) != len(patterns):
        raise ValueError(f"layer_clip_norms repeats a pattern: {patterns}")
    aggregation.clip_per_layer([(p, aggregation.layer_clip_hparam(p)) for p in patterns])
    for p, v in items:
        if not v > 0 or math.isinf(v):
            raise ValueError(f"layer_clip_norms[{p!r}]={v} must be finite and > 0")
    return tuple(items)


def hparams_of(config: AlgorithmConfig) -> dict[str, float]:
    """The numeric hyper-parameters of ``config`` that the round reads (host floats).

    With ``adaptive_clipping`` the clip norm is round state, not an hparam (its initial
    value is ``config.clip_norm``); with ``layer_clip_norms`` each group's clip norm is the
    hparam ``clip_norm[pattern]``.
    """
    out = {"client_lr": config.client_lr, "server_lr": config.server_lr}
    if config.mu is not None:
        out["mu"] = config.mu
    if config.control_clip_norm is not None:
        out["control_clip_norm"] = config.control_clip_norm
        out["control_noise_multiplier"] = config.control_noise_multiplier
    if config.user_dp:
        if config.layer_clip_norms:
            for pattern, value in parse_layer_clip_norms(config.layer_clip_norms):
                out[aggregation.layer_clip_hparam(pattern)] = value
        elif not config.adaptive_clipping:
            out["clip_norm"] = config.clip_norm
        out["noise_multiplier"] = config.noise_multiplier
        if config.adaptive_clipping:
            out["target_quantile"] = config.target_quantile
            out["clip_lr"] = config.clip_lr
            if config.clipped_count_stddev is not None:
                out["clipped_count_stddev"] = config.clipped_count_stddev
    if config.example_dp:
        out["example_clip_norm"] = config.example_clip_norm
        out["example_noise_multiplier"] = config.example_noise_multiplier
    return {k: float(v) for k, v in out.items()}


def check_hparams(
    hparams: dict[str, Any], specs: Sequence[hparams_lib.HParam] | None = None
) -> None:
    """Raises ValueError naming the first invalid numeric hyper-parameter.

    Each value is checked against its declaration (``specs``, e.g. ``sim.hparams``; else
    the library's, :data:`fedjax_dp.core.hparams.LIBRARY`), then the constraints that tie
    several together (adaptive clipping's noise split).
    """
    hparams_lib.check(hparams, specs)
    if "clipped_count_stddev" in hparams and "noise_multiplier" in hparams:
        aggregation.value_noise_multiplier(
            float(hparams["noise_multiplier"]), float(hparams["clipped_count_stddev"])
        )


def _optimizer(name: str, arg: str):
    fn = getattr(optax, name, None) if isinstance(name, str) else None
    if fn is None or not callable(fn) or name.startswith("_"):
        raise ValueError(
            f"{arg}={name!r} is not an optax optimizer; use e.g. 'sgd', 'adam', 'yogi', 'adagrad'"
        )
    return fn


@dataclasses.dataclass(frozen=True)
class Simulation:
    """A compiled federated simulation: its round, sampler, client update and privacy facts.

    Use :func:`build_simulation`. ``round_fn(state, data, hparams, key)`` is jitted once;
    ``hparams`` is a dict of scalars (see :meth:`make_hparams`).
    """

    config: AlgorithmConfig
    model: Model
    client: ClientUpdate
    sampler: sampling.CohortSampler
    round: Round

    def init(self, key: jax.Array) -> ServerState:
        return self.round.init(self.model.init(key))

    @property
    def round_fn(self):
        return self.round.round_fn

    @property
    def hparams(self) -> tuple[hparams_lib.HParam, ...]:
        """The declarations of every traced hyper-parameter of the round (``Round.hparams``)."""
        return self.round.hparams

    def make_hparams(self, **overrides: float) -> dict[str, jax.Array]:
        """Every declared hyper-parameter as a float32 array: ``overrides``, else the
        config's value, else the declared default; checked against the declarations.

        Raises:
          ValueError: an undeclared name (the message lists the declared ones) or a value
            outside its domain.
        """
        configured = hparams_of(self.config)
        declared = {h.name for h in self.hparams if not h.from_state}
        stray = sorted(set(configured) - declared)
        if stray:  # a config option that no stage reads: a bug in the recipe
            raise ValueError(f"the config sets {stray}, which no stage of this round reads")
        hp = hparams_lib.resolve(self.hparams, configured, overrides)
        check_hparams(hp, self.hparams)
        return {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}

    def hparams_table(self, **overrides: float) -> str:
        """The round's hyper-parameters as a text table (name, value, domain, help)."""
        values = {k: float(v) for k, v in self.make_hparams(**overrides).items()}
        return hparams_lib.table(self.hparams, values)

    def releases(self, hparams: dict[str, Any]) -> tuple:
        """The :class:`fedjax_dp.privacy.Release` of every DP noise stage of one round under
        ``hparams``: each upload's noise stage (SCAFFOLD with DP: the delta and the control
        variate) and, with DP-SGD inside the clients, the example-level steps. Empty for
        non-private runs. Each stage declares its release through its
        :class:`~fedjax_dp.DPTransform` fields (unit, mechanism, noise hparam)."""
        from fedjax_dp.privacy import plan  # host side only

        out = [
            plan.Release(
                upload=name,
                unit=stage.unit,
                mechanism=stage.mechanism,
                noise_hparam=stage.noise_multiplier,
                noise_multiplier=float(hparams[stage.noise_multiplier]),
            )
            for name, (cs, ss) in (self.round.upload_stages or {}).items()
            for stage in base.dp_stages((*cs, *ss))
            if stage.noise_multiplier
        ]
        if self.client.example_dp:
            out.append(
                plan.Release(
                    upload="delta",
                    unit="example",
                    mechanism="gaussian",
                    noise_hparam="example_noise_multiplier",
                    noise_multiplier=float(hparams["example_noise_multiplier"]),
                    compositions=int(self.client.local_epochs),
                )
            )
        return tuple(out)

    def round_privacy(self, hparams: dict[str, Any]):
        """The :class:`fedjax_dp.accounting.RoundPrivacy` of one round under ``hparams``.

        Built by :func:`fedjax_dp.privacy.round_privacy` from the round's :meth:`releases` and
        the sampler that builds the round, reading the noise multipliers from the same
        hparams the round reads. Empty list for non-private runs; one entry per unit of
        protection: several central Gaussian releases over one cohort (SCAFFOLD's delta and
        control variate) are ONE sampled Gaussian mechanism with noise multiplier
        ``(sum_j sigma_j^-2)^-1/2`` (see :mod:`fedjax_dp.privacy.plan`). With adaptive
        clipping the noise multiplier is the round's total ``z``.

        A Poisson sampler's static cohort size is its cap ``K`` (``max_cohort_size``: a
        uniformly random ``K`` of the selected clients are kept), accounted exactly. With
        stragglers dropped or dropouts, every kept client uploads with probability
        ``upload_probability`` independently of the data (:mod:`fedjax_dp.systems`): the
        user-level rounds credit that thinning where the cap does not bind
        (:attr:`fedjax_dp.accounting.RoundPrivacy.upload_probability`); example-level rounds
        and fixed-size sampling do not credit it (a valid, looser bound).
        """
        from fedjax_dp.privacy import plan  # host side only

        s = self.sampler
        return plan.round_privacy(
            self.releases(hparams),
            plan.Sampling(
                sampling=s.sampling,
                num_clients=s.num_clients,
                sampling_rate=s.sampling_rate if s.sampling == "poisson" else None,
                cohort_size=s.cohort_size,
                upload_probability=self.round.systems.upload_probability,
            ),
        )


def _user_dp_stages(config: AlgorithmConfig, sampler) -> tuple[list, list]:
    """The client and server stages of ``config``'s user-level DP mechanism (none without)."""
    if not config.user_dp:
        return [], []
    if config.adaptive_clipping:
        clip, noise = aggregation.adaptive_clipping(config.clip_norm, sampler.expected_cohort_size)
        return [clip], [noise]
    if config.layer_clip_norms:
        patterns = [p for p, _ in parse_layer_clip_norms(config.layer_clip_norms)]
        names = tuple(aggregation.layer_clip_hparam(p) for p in patterns)
        clip = aggregation.clip_per_layer(list(zip(patterns, names)))
        sensitivity = names
    else:
        norm = "l1" if config.mechanism == "laplace" else "l2"
        clip = aggregation.clip_per_client("clip_norm", norm=norm)
        sensitivity = "clip_norm"
    if config.mechanism == "laplace":
        return [clip], [aggregation.add_laplace_noise("clip_norm", "noise_multiplier")]
    if config.mechanism == "local_gaussian":
        return [clip, aggregation.add_local_gaussian_noise(sensitivity, "noise_multiplier")], []
    return [clip], [aggregation.add_gaussian_noise(sensitivity, "noise_multiplier")]


def _control_dp_stages(config: AlgorithmConfig) -> dict[str, tuple[list, list]]:
    """SCAFFOLD with user-level DP: the control-variate upload's own clip and noise."""
    if config.name != "scaffold" or not config.user_dp:
        return {}
    return {
        "control": (
            [aggregation.clip_per_client("control_clip_norm")],
            [aggregation.add_gaussian_noise("control_clip_norm", "control_noise_multiplier")],
        )
    }


def _auto_chunk(config, model, data, loss_fn, batch_size, mesh, sampler, aggregator) -> int:
    """Chunk size from the memory budget (see :mod:`fedjax_dp.core.memory`), less what
    ``aggregator`` holds for the whole round (a gathering aggregator's ``[C, *P]`` buffer).

    With Poisson sampling it is also at most half the expected cohort (per device): the
    round stops after the chunk holding the last real client, so smaller chunks skip most
    of the padding slots (a cohort of about 30 padded to 73 slots computes 2-3 chunks of 15
    instead of all 73 slots; ``benchmarks/RESULTS.md``, sweeps).
    """
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch_size, *data.feature_shape), data.x.dtype)
    y = jax.ShapeDtypeStruct((batch_size,), data.y.dtype)
    per_example = config.example_dp and (
        config.clipping == "per_example"
        or isinstance(clipping_lib.discover_layers(loss_fn, params, x, y), str)
    )
    budget = None if config.memory_budget_mb is None else int(config.memory_budget_mb * 2**20)
    num_devices = 1 if mesh is None else int(dict(mesh.shape).get("clients", 1))
    chunk = memory.auto_chunk_size(
        sampler.cohort_size,
        loss_fn,
        params,
        x,
        y,
        per_example_grads=per_example,
        budget_bytes=budget,
        num_devices=num_devices,
        fixed_bytes=memory.aggregator_bytes(
            aggregator, params, sampler.cohort_size, num_uploads=_num_uploads(config)
        ),
    )
    if sampler.sampling == "poisson":
        chunk = min(chunk, max(1, math.ceil(sampler.expected_cohort_size / num_devices / 2)))
    return chunk


def _num_uploads(config: AlgorithmConfig) -> int:
    """How many model-sized uploads each client sends (SCAFFOLD: delta and control)."""
    return 2 if config.name == "scaffold" else 1


def build_simulation(
    config: AlgorithmConfig,
    model: Model,
    data,
    *,
    mesh: jax.sharding.Mesh | None = None,
    wrap_client: Callable[[ClientUpdate], ClientUpdate] | None = None,
    client_stages: Sequence[base.RoundTransform] = (),
    server_stages: Sequence[base.RoundTransform] = (),
    aggregator: aggregators.Aggregator | None = None,
    host_client_states: bool = False,
) -> Simulation:
    """Builds the jitted round of ``config`` for ``model`` on the federated ``data``.

    Args:
      config: an :class:`AlgorithmConfig` (validated and completed by :func:`resolve`).
      model: a :class:`fedjax_dp.models.Model`.
      data: the training :class:`fedjax_dp.data.FederatedData` (only its static facts are
        used here: population size, largest client, feature shape, classes).
      mesh: optional mesh with an axis ``"clients"`` to shard the cohort over devices.
      wrap_client: optional ``ClientUpdate -> ClientUpdate`` applied to the config's client
        update before the round is built (e.g. :func:`fedjax_dp.audit.add_canaries`); the
        round, its DP stages and its accounting are unchanged.
      client_stages: your own per-client stages (:class:`fedjax_dp.RoundTransform`, leaves
        ``[C, *leaf]``), e.g. compression. They run BEFORE the config's DP client stages, so
        the clip that follows still bounds each client's contribution: the privacy
        guarantee and its accounting do not depend on what these stages do.
      server_stages: your own stages on the aggregated sum ``[*leaf]``. They run AFTER the
        config's server stages (the noise): post-processing, which cannot weaken DP.
      aggregator: a :class:`fedjax_dp.aggregators.Aggregator` in place of the config's
        weighted sum (e.g. :func:`fedjax_dp.aggregators.coordinate_median`); the automatic
        chunk size leaves room for a gathering aggregator's ``[C, *P]`` buffer. With DP
        noise it must be ``dp_compatible`` (the round refuses it otherwise).
      host_client_states: keep the per-client state (SCAFFOLD's control variates) on the
        host: see :func:`fedjax_dp.build_round` and
        :class:`fedjax_dp.runner.host_states.HostClientStates`.
    """
    config = resolve(config)
    if tuple(data.feature_shape) != tuple(model.input_shape):
        raise ValueError(
            f"model input_shape={tuple(model.input_shape)} does not match the data's feature "
            f"shape {tuple(data.feature_shape)}; reshape the data or set the model's input shape"
        )
    if data.num_classes > model.num_classes:
        raise ValueError(
            f"the data has {data.num_classes} classes but the model outputs {model.num_classes}"
        )
    if config.sampling == "fixed":
        sampler = sampling.fixed_size(data.num_clients, config.cohort_size)
    elif config.sampling == "shuffle":
        sampler = sampling.shuffled(data.num_clients, config.cohort_size)
    else:
        sampler = sampling.poisson(data.num_clients, config.sampling_rate)

    def loss_fn(params, x, y):
        return cross_entropy(model.apply(params, x), y)

    batch_size = data.max_count if config.batch_size is None else config.batch_size
    client = build_client_update(
        loss_fn,
        _optimizer(config.client_optimizer, "client_optimizer"),
        max_count=data.max_count,
        batch_size=batch_size,
        local_epochs=config.local_epochs,
        local_steps=config.local_steps,
        example_dp=config.example_dp,
        clipping_method=config.clipping,
        proximal=config.name == "fedprox",
        control_variates=config.name == "scaffold",
    )
    if wrap_client is not None:
        client = wrap_client(client)
    if aggregator is None:
        aggregator = aggregators.weighted_sum(
            config.weighting, "expected" if config.user_dp else "realised"
        )
    if config.chunk_size is None:
        config = dataclasses.replace(
            config,
            chunk_size=_auto_chunk(
                config, model, data, loss_fn, batch_size, mesh, sampler, aggregator
            ),
        )
    if config.adaptive_clipping and config.clipped_count_stddev is None:
        config = dataclasses.replace(
            config, clipped_count_stddev=0.05 * float(sampler.expected_cohort_size)
        )
        check_hparams(hparams_of(config))  # the noise split needs this sigma_b
    dp_client, dp_server = _user_dp_stages(config, sampler)
    for stage in (*client_stages, *server_stages):
        if isinstance(stage, base.DPTransform):
            raise TypeError(
                "client_stages/server_stages take your own RoundTransforms; DP stages come "
                "from the config (clip_norm, noise_multiplier, mechanism...)"
            )
    client_stages = (*client_stages, *dp_client)
    server_stages = (*dp_server, *server_stages)
    if config.layer_clip_norms:  # every parameter in exactly one group, checked now
        aggregation.group_of_leaves(
            aggregation.leaf_paths(jax.eval_shape(model.init, jax.random.key(0))),
            [p for p, _ in parse_layer_clip_norms(config.layer_clip_norms)],
        )
    rnd = build_round(
        client,
        sampler,
        client_stages=client_stages,
        server_stages=server_stages,
        upload_stages=_control_dp_stages(config),
        aggregator=aggregator,
        systems=config.systems,
        server_optimizer=_optimizer(config.server_optimizer, "server_optimizer"),
        chunk_size=config.chunk_size,
        mesh=mesh,
        host_client_states=host_client_states,
    )
    return Simulation(config, model, client, sampler, rnd)
