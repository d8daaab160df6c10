"""Named federated algorithms: recipes that only configure the engine's pieces."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_dp._src import aggregation, base, memory, sampling
from fedjax_dp._src import clipping as clipping_lib
from fedjax_dp._src.client import ClientUpdate, build_client_update
from fedjax_dp._src.models import Model, cross_entropy
from fedjax_dp._src.round import Round, ServerState, build_round

ALGORITHMS = ("fedavg", "fedsgd", "dp_fedavg", "dp_sgd_fedavg", "fedadam", "fedyogi", "fedadagrad")
_SERVER_ALIASES = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
NUMERIC_HPARAMS = (
    "client_lr",
    "server_lr",
    "clip_norm",
    "noise_multiplier",
    "example_clip_norm",
    "example_noise_multiplier",
)


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Everything that defines a federated algorithm run (static shape + numeric defaults).

    Numeric fields listed in ``NUMERIC_HPARAMS`` become the traced ``hparams`` of the round:
    changing them does not recompile. The others fix shapes and code paths.
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

    @property
    def user_dp(self) -> bool:
        return self.clip_norm is not None

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
    if c.name == "dp_fedavg":
        c = dataclasses.replace(
            c,
            clip_norm=1.0 if c.clip_norm is None else c.clip_norm,
            noise_multiplier=1.0 if c.noise_multiplier is None else c.noise_multiplier,
        )
        if c.weighting != "uniform":
            raise ValueError(
                f"weighting={c.weighting!r} is not supported with user-level DP (the sum's "
                "sensitivity must not depend on client data sizes); use weighting='uniform'"
            )
    elif c.clip_norm is not None or c.noise_multiplier is not None:
        raise ValueError(
            f"clip_norm/noise_multiplier (user-level DP) are set but algorithm {c.name!r} does "
            "not use them; use name='dp_fedavg' or unset them"
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
    if c.sampling not in ("fixed", "poisson"):
        raise ValueError(f"sampling={c.sampling!r} must be 'fixed' or 'poisson'")
    if c.sampling == "poisson" and c.sampling_rate is None:
        raise ValueError("sampling='poisson' needs sampling_rate (the inclusion probability q)")
    if c.sampling == "fixed" and c.cohort_size is None:
        raise ValueError("sampling='fixed' needs cohort_size")
    if c.memory_budget_mb is not None and not c.memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb={c.memory_budget_mb!r} must be positive (MiB)")
    if c.clipping not in clipping_lib.METHODS:
        raise ValueError(f"clipping={c.clipping!r} must be one of {list(clipping_lib.METHODS)}")
    _optimizer(c.client_optimizer, "client_optimizer")
    _optimizer(c.server_optimizer, "server_optimizer")
    check_hparams(hparams_of(c))
    return c


def hparams_of(config: AlgorithmConfig) -> dict[str, float]:
    """The numeric hyper-parameters of ``config`` that the round reads (host floats)."""
    out = {"client_lr": config.client_lr, "server_lr": config.server_lr}
    if config.user_dp:
        out["clip_norm"] = config.clip_norm
        out["noise_multiplier"] = config.noise_multiplier
    if config.example_dp:
        out["example_clip_norm"] = config.example_clip_norm
        out["example_noise_multiplier"] = config.example_noise_multiplier
    return {k: float(v) for k, v in out.items()}


def check_hparams(hparams: dict[str, Any]) -> None:
    """Raises ValueError naming the first invalid numeric hyper-parameter."""
    for name, value in hparams.items():
        v = float(value)
        if math.isnan(v):
            raise ValueError(f"{name}=nan is not a number; give a finite value >= 0")
        if name.endswith("noise_multiplier"):
            if v < 0 or math.isinf(v):
                raise ValueError(f"{name}={v} must be finite and >= 0 (0 means no noise)")
        elif name.endswith("clip_norm"):
            if not v > 0 or math.isinf(v):
                raise ValueError(f"{name}={v} must be finite and > 0")
        elif name.endswith("_lr") and (v < 0 or math.isinf(v)):
            raise ValueError(f"{name}={v} must be finite and >= 0")


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

    def make_hparams(self, **overrides: float) -> dict[str, jax.Array]:
        """The config's numeric hyper-parameters as float32 arrays, with overrides."""
        hp = hparams_of(self.config)
        unknown = set(overrides) - set(hp)
        if unknown:
            raise ValueError(f"unknown hparams {sorted(unknown)}; this run uses {sorted(hp)}")
        hp.update(overrides)
        check_hparams(hp)
        return {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}

    def round_privacy(self, hparams: dict[str, Any]):
        """The :class:`fedjax_dp.accounting.RoundPrivacy` of one round under ``hparams``.

        Built from the DP stages and the sampler that build the round, reading the noise
        multipliers from the same hparams the round reads. Empty list for non-private runs.
        """
        from fedjax_dp import accounting  # host side only

        s = self.sampler
        common = dict(
            sampling=s.sampling,
            num_clients=s.num_clients,
            sampling_rate=s.sampling_rate if s.sampling == "poisson" else None,
            cohort_size=s.cohort_size if s.sampling == "fixed" else None,
        )
        out = []
        for stage in base.dp_stages(self.round.server_stages):
            if stage.noise_multiplier:
                out.append(
                    accounting.RoundPrivacy(
                        noise_multiplier=float(hparams[stage.noise_multiplier]),
                        unit=stage.unit,
                        compositions=1,
                        **common,
                    )
                )
        if self.client.example_dp:
            out.append(
                accounting.RoundPrivacy(
                    noise_multiplier=float(hparams["example_noise_multiplier"]),
                    unit="example",
                    compositions=int(self.client.local_epochs),
                    **common,
                )
            )
        return out


def _auto_chunk(config, model, data, loss_fn, batch_size, mesh) -> int:
    """Chunk size from the memory budget (see :mod:`fedjax_dp._src.memory`)."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch_size, *data.feature_shape), data.x.dtype)
    y = jax.ShapeDtypeStruct((batch_size,), data.y.dtype)
    per_example = config.example_dp and (
        config.clipping == "per_example"
        or isinstance(clipping_lib.discover_layers(loss_fn, params, x, y), str)
    )
    cohort = config.cohort_size
    if config.sampling == "poisson":
        cohort = sampling.poisson(data.num_clients, config.sampling_rate).cohort_size
    budget = None if config.memory_budget_mb is None else int(config.memory_budget_mb * 2**20)
    return memory.auto_chunk_size(
        cohort,
        loss_fn,
        params,
        x,
        y,
        per_example_grads=per_example,
        budget_bytes=budget,
        num_devices=1 if mesh is None else int(dict(mesh.shape).get("clients", 1)),
    )


def build_simulation(
    config: AlgorithmConfig, model: Model, data, *, mesh: jax.sharding.Mesh | None = None
) -> Simulation:
    """Builds the jitted round of ``config`` for ``model`` on the federated ``data``.

    Args:
      config: an :class:`AlgorithmConfig` (validated and completed by :func:`resolve`).
      model: a :class:`fedjax_dp.models.Model`.
      data: the training :class:`fedjax_dp.data.FederatedData` (only its static facts are
        used here: population size, largest client, feature shape, classes).
      mesh: optional mesh with an axis ``"clients"`` to shard the cohort over devices.
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
    )
    if config.chunk_size is None:
        config = dataclasses.replace(
            config, chunk_size=_auto_chunk(config, model, data, loss_fn, batch_size, mesh)
        )
    client_stages, server_stages = [], []
    if config.user_dp:
        client_stages.append(aggregation.clip_per_client("clip_norm"))
        server_stages.append(aggregation.add_gaussian_noise("clip_norm", "noise_multiplier"))
    rnd = build_round(
        client,
        sampler,
        client_stages=client_stages,
        server_stages=server_stages,
        server_optimizer=_optimizer(config.server_optimizer, "server_optimizer"),
        weighting=config.weighting,
        denominator="expected" if config.user_dp else "mean",
        chunk_size=config.chunk_size,
        mesh=mesh,
    )
    return Simulation(config, model, client, sampler, rnd)
