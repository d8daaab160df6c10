"""Assembles one federated round into a single pure function, compiled once.

``round_fn(state, data, hparams, key) -> (state, metrics)`` runs, with no Python loop over
clients: cohort sampling on device; for each chunk of the cohort (a loop on device) the
client updates (``vmap``), the per-client stages (e.g. clipping) and a streaming weighted
sum; then the server stages on the sum (e.g. Gaussian noise), division by the denominator,
and the server optax optimizer on the pseudo-gradient ``-mean_delta``.

The chunk loop stops after the chunk that holds the last real client: a Poisson cohort
(real clients first, then padding up to its static size) computes only its real clients'
chunks. Skipped chunks would add exact zeros, so results are bit-identical to computing
them all (with stateful client stages every chunk still runs).

``round_fn(state, cohort_data, hparams, key, cohort)`` is the same round on a cohort sampled
and gathered beforehand (:meth:`Round.sample`, then e.g.
:meth:`fedjax_dp.population.HostPopulation.gather`), for populations that live on the host:
each client keeps its global id for its keys, so both forms give the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_dp._src import base
from fedjax_dp._src.client import ClientUpdate
from fedjax_dp._src.sampling import CohortSampler

# Purposes of the sub-keys of a round key (fold_in constants).
_SAMPLE, _CLIENTS, _SERVER = 0, 1, 2


class ServerState(NamedTuple):
    params: base.Params
    opt_state: Any  # server optax state (inject_hyperparams)
    client_tx_state: Any  # state of the per-client stages
    server_tx_state: Any  # state of the server stages
    round: jax.Array  # shape=(), dtype=int32: rounds completed


class Cohort(NamedTuple):
    """The clients of one round, as ``sampler.sample(fold_in(key, 0))`` returns them.

    Attributes:
      ids: ``int32[C]`` global client ids (rows of the whole population); ``C`` is the
        sampler's static ``cohort_size``.
      mask: ``bool[C]``; ``False`` marks padding slots (Poisson sampling), which contribute
        nothing.
      overflow: ``int32[]``, clients selected but not fitting in ``C`` (see
        :func:`fedjax_dp.sampling.poisson`).
    """

    ids: jax.Array
    mask: jax.Array
    overflow: jax.Array


class Round(NamedTuple):
    """A built round.

    Attributes:
      init: ``params -> ServerState``.
      round_fn: the pure round ``(state, data, hparams, key, cohort=None) -> (state,
        metrics)``; jit it once (:func:`build_round` returns it jitted unless ``jit=False``).
        With ``cohort=None`` it samples the cohort from ``key`` and ``data`` is the whole
        population. With ``cohort`` (a :class:`Cohort`, i.e. ``sample(key)``) ``data`` holds
        only the cohort: ``cohort_size`` clients, slot ``i`` holding client ``ids[i]`` (any
        data in masked slots; it is never used). Both give the same result for the same key.
      client_stages, server_stages: the stages, for privacy metadata.
      sample: ``key -> Cohort``, the cohort that ``round_fn`` draws for the round key
        ``key``, so the host can gather its data ahead of the round (jitted unless
        ``jit=False``).
    """

    init: Callable[[base.Params], ServerState]
    round_fn: Callable[..., tuple[ServerState, dict[str, jax.Array]]]
    client_stages: tuple
    server_stages: tuple
    sample: Callable[[jax.Array], Cohort] | None = None


def build_round(
    client: ClientUpdate,
    sampler: CohortSampler,
    *,
    client_stages: Sequence[base.RoundTransform | base.DPTransform] = (),
    server_stages: Sequence[base.RoundTransform | base.DPTransform] = (),
    server_optimizer: Callable[..., optax.GradientTransformation] = optax.sgd,
    server_optimizer_kwargs: dict[str, Any] | None = None,
    weighting: str = "uniform",
    denominator: str = "mean",
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    jit: bool = True,
) -> Round:
    """Builds a federated round.

    Args:
      client: the per-client update (:func:`fedjax_dp.build_client_update`).
      sampler: the cohort sampler (:func:`fedjax_dp.sampling.fixed_size` / ``poisson``).
      client_stages: per-client transforms on the deltas ``[c, *P]`` of each chunk.
      server_stages: transforms on the weighted SUM of deltas ``[*P]``, before division.
      server_optimizer: optax optimizer factory taking ``learning_rate``; it receives the
        pseudo-gradient ``-mean_delta`` (FedAvg: ``optax.sgd`` with ``server_lr=1``).
      weighting: ``"uniform"`` (every real client weight 1) or ``"num_examples"``.
      denominator: ``"mean"`` divides by the sum of weights of the real clients (data
        dependent: not for DP); ``"expected"`` divides by the sampler's public expected cohort
        size (DP-FedAvg's fixed denominator).
      chunk_size: clients processed together (``vmap``); chunks run one after another, so
        memory is O(chunk_size x model), up to the chunk holding the last real client.
        Default: the whole cohort up to 64 (smaller chunks skip more Poisson padding).
      mesh: optional device mesh with an axis ``"clients"``: the cohort is split over it
        (``jax.shard_map``; slot ``i`` to device ``i % devices``, so the real clients of a
        Poisson cohort spread evenly); each device loops over its own chunks and the linear
        aggregates are reduced with ``psum``. Parameters and data are replicated. Results
        equal the single-device round up to float summation order. Client stages must be
        stateless.
      jit: return ``round_fn`` (state donated) and ``sample`` compiled with ``jax.jit``.

    Hyper-parameters read from ``hparams``: ``server_lr`` plus whatever the client update and
    the stages read, except those that a stage's state sets (its ``state_hparams`` hook, e.g.
    an adaptive clip norm): the round reads them from ``state`` at its start, every stage
    sees them in ``hparams``, and ``metrics`` reports them under their names. Per-client
    statistics that client stages declare (``client_stats``) are summed over the cohort's
    real clients and reach the server stages as ``hparams[name]``.
    """
    if weighting not in ("uniform", "num_examples"):
        raise ValueError(f"weighting={weighting!r} must be 'uniform' or 'num_examples'")
    if denominator not in ("mean", "expected"):
        raise ValueError(f"denominator={denominator!r} must be 'mean' or 'expected'")
    _check_dp_pairing(client_stages, server_stages)
    stat_names = base.stats_names(client_stages)
    if any(getattr(s, "client_stats", None) for s in server_stages):
        raise ValueError("client_stats are per-client statistics: declare them on client stages")
    cohort_size = sampler.cohort_size
    if chunk_size is None:
        chunk_size = min(cohort_size, 64)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    num_devices = 1
    if mesh is not None:
        if "clients" not in mesh.axis_names:
            raise ValueError(f"mesh axes {mesh.axis_names} lack the axis 'clients'")
        num_devices = int(mesh.shape["clients"])
    per_device = -(-cohort_size // num_devices)
    chunk_size = min(int(chunk_size), per_device)
    local_chunks = -(-per_device // chunk_size)
    num_chunks = local_chunks * num_devices
    padded = num_chunks * chunk_size
    client_tx = base.chain(*client_stages)
    server_tx = base.chain(*server_stages)
    opt = optax.inject_hyperparams(server_optimizer)(
        learning_rate=0.0, **(server_optimizer_kwargs or {})
    )
    vmapped_update = jax.vmap(client.update, in_axes=(None, None, 0, 0, None))

    def init(params):
        return ServerState(
            params=params,
            opt_state=opt.init(params),
            client_tx_state=client_tx.init(params),
            server_tx_state=server_tx.init(params),
            round=jnp.zeros((), jnp.int32),
        )

    def _run_chunks(ids, rows, mask, tx_state, params, data, hparams, clients_key):
        """Clients ``ids[n * chunk_size]`` in chunks: vmapped updates, client stages, sums.

        ``ids`` are global client ids (they pick the clients' keys); ``rows`` are the same
        clients' indices in ``data`` (equal to ``ids`` when ``data`` is the population).
        """

        def chunk(carry, xs):
            total, weight_sum, loss_sum, seen_sum, stat_sums, tx_state = carry
            cid, crow, cmask = xs
            ckeys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(clients_key, cid)
            update_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(ckeys, 0)
            tx_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(ckeys, 1)
            deltas, cm = vmapped_update(params, data, crow, update_keys, hparams)
            # Same keys as chain(*client_stages).update; also the stages' client statistics.
            deltas, tx_state, stats = base.apply_stages(
                client_stages, deltas, tx_state, key=tx_keys, mask=cmask, hparams=hparams
            )
            stat_sums = {
                k: stat_sums[k] + jnp.sum(jnp.where(cmask, stats[k], 0.0)) for k in stat_names
            }
            if weighting == "uniform":
                w = cmask.astype(jnp.float32)
            else:
                w = jnp.where(cmask, cm["num_examples"], 0.0)
            total = jax.tree.map(lambda t, d: t + _masked_weighted_sum(d, w, cmask), total, deltas)
            loss_sum = loss_sum + jnp.sum(jnp.where(cmask, cm["loss_sum"], 0.0))
            seen_sum = seen_sum + jnp.sum(jnp.where(cmask, cm["num_seen"], 0.0))
            carry = (total, weight_sum + jnp.sum(w), loss_sum, seen_sum, stat_sums, tx_state)
            return carry, None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        stat_zeros = {k: jnp.zeros((), jnp.float32) for k in stat_names}
        init_carry = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), stat_zeros, tx_state)
        n = ids.shape[0] // chunk_size
        xs = tuple(a.reshape(n, chunk_size) for a in (ids, rows, mask))
        if jax.tree.leaves(tx_state):
            # A stateful client stage sees every chunk, padding included, as it always has.
            carry, _ = jax.lax.scan(chunk, init_carry, xs)
            return carry
        # Chunks after the last real client hold only padding, which adds exact zeros: stop
        # there (a Poisson cohort puts its real clients first, so most padding is skipped).
        # The same chunks are summed in the same order, so the result is bit-identical.
        # Under vmap (sweeps) the loop runs to the largest count in the batch.
        num_active = (jnp.max(jnp.where(mask, jnp.arange(mask.shape[0]), -1)) + chunk_size) // (
            chunk_size
        )

        def body(i, carry):
            return chunk(carry, tuple(a[i] for a in xs))[0]

        return jax.lax.fori_loop(0, num_active, body, init_carry)

    def sample(key) -> Cohort:
        return Cohort(*sampler.sample(jax.random.fold_in(key, _SAMPLE)))

    def round_fn(state: ServerState, data, hparams, key, cohort: Cohort | None = None):
        params = state.params
        hparams = _with_state_hparams(hparams, state, client_stages, server_stages)
        if cohort is None:
            ids, mask, overflow = sample(key)
            rows = ids
        else:
            ids, mask, overflow = (jnp.asarray(a) for a in cohort)
            if ids.shape != (cohort_size,) or mask.shape != (cohort_size,):
                raise ValueError(
                    f"cohort ids/mask have shapes {ids.shape}/{mask.shape}; expected "
                    f"({cohort_size},), the sampler's cohort_size (use Round.sample(key))"
                )
            if data.counts.shape[0] != cohort_size:
                raise ValueError(
                    f"with a cohort, data must hold exactly the cohort's {cohort_size} clients "
                    f"(slot i = client ids[i]); it holds {data.counts.shape[0]}"
                )
            ids, mask, overflow = (
                ids.astype(jnp.int32),
                mask.astype(bool),
                overflow.astype(jnp.int32),
            )
            rows = jnp.arange(cohort_size, dtype=jnp.int32)
        # Chunk padding: client 0 (row 0), masked; the same keys in both forms of the round.
        ids = jnp.pad(ids, (0, padded - cohort_size))
        rows = jnp.pad(rows, (0, padded - cohort_size))
        mask = jnp.pad(mask, (0, padded - cohort_size))
        clients_key = jax.random.fold_in(key, _CLIENTS)
        if mesh is None:
            total, weight_sum, loss_sum, seen_sum, stat_sums, tx_state = _run_chunks(
                ids, rows, mask, state.client_tx_state, params, data, hparams, clients_key
            )
        else:
            if jax.tree.leaves(state.client_tx_state):
                raise ValueError("client stages with state cannot be sharded over a mesh yet")

            def per_device(ids, rows, mask, params, data, hparams, clients_key):
                *sums, _ = _run_chunks(
                    ids, rows, mask, state.client_tx_state, params, data, hparams, clients_key
                )
                return jax.lax.psum(tuple(sums), "clients")

            spec, rep = jax.sharding.PartitionSpec("clients"), jax.sharding.PartitionSpec()
            # Slot i goes to device i % num_devices, so the real clients at the front of a
            # Poisson cohort are spread evenly and every device skips its share of padding.
            ids, rows, mask = (
                _place(a.reshape(-1, num_devices).T.reshape(-1), mesh, spec)
                for a in (ids, rows, mask)
            )
            total, weight_sum, loss_sum, seen_sum, stat_sums = jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(spec, spec, spec, rep, rep, rep, rep),
                out_specs=rep,
                # Replicated params flow into per-device chunk loops; the psum makes outputs
                # replicated, which the varying-axes type check cannot see through the loop.
                check_vma=False,
            )(ids, rows, mask, params, data, hparams, clients_key)
            tx_state = state.client_tx_state

        clash = sorted(set(stat_sums) & set(hparams))
        if clash:
            raise ValueError(f"client statistics {clash} clash with hparams of the same names")
        total, server_tx_state = server_tx.update(
            total,
            state.server_tx_state,
            key=jax.random.fold_in(key, _SERVER),
            mask=None,
            hparams={**hparams, **stat_sums},
        )
        if denominator == "expected":
            denom = jnp.float32(sampler.expected_cohort_size)
        else:
            denom = jnp.maximum(weight_sum, 1e-12)
        mean_delta = jax.tree.map(lambda t, p: (t / denom).astype(p.dtype), total, params)
        pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
        opt_state = state.opt_state
        opt_state.hyperparams["learning_rate"] = jnp.asarray(hparams["server_lr"], jnp.float32)
        updates, opt_state = opt.update(pseudo_grad, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "train_loss": loss_sum / jnp.maximum(seen_sum, 1.0),
            "num_clients": jnp.sum(mask, dtype=jnp.int32),
            "cohort_overflow": overflow,
            "update_norm": base.tree_l2_norm(mean_delta),
        }
        for name, value in base.state_hparams_of(
            (*client_stages, *server_stages), (*state.client_tx_state, *state.server_tx_state)
        ).items():
            metrics[name] = jnp.asarray(value, jnp.float32)  # the value this round used
        new_state = ServerState(new_params, opt_state, tx_state, server_tx_state, state.round + 1)
        return new_state, metrics

    fn = jax.jit(round_fn, donate_argnums=0) if jit else round_fn
    sample_fn = jax.jit(sample) if jit else sample
    return Round(init, fn, tuple(client_stages), tuple(server_stages), sample_fn)


def _with_state_hparams(hparams, state: ServerState, client_stages, server_stages) -> dict:
    """``hparams`` plus the values that the stages' states set for this round."""
    from_state = base.state_hparams_of(
        (*client_stages, *server_stages), (*state.client_tx_state, *state.server_tx_state)
    )
    clash = sorted(set(from_state) & set(hparams))
    if clash:
        raise ValueError(
            f"hparams {clash} are set by the round's state (e.g. an adaptive clip norm, which "
            "evolves from round to round); do not pass them in hparams"
        )
    return {**hparams, **from_state}


def _place(x: jax.Array, mesh: jax.sharding.Mesh, spec) -> jax.Array:
    """Shards ``x`` over ``mesh`` inside jit, for Explicit and Auto mesh axes alike."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    if mesh.axis_types[mesh.axis_names.index("clients")] == jax.sharding.AxisType.Explicit:
        return jax.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def _masked_weighted_sum(d: jax.Array, w: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_c w[c] * d[c]`` in float32, masked rows contributing exactly zero."""
    m = mask.reshape((-1,) + (1,) * (d.ndim - 1))
    d = jnp.where(m, d.astype(jnp.float32), 0.0)
    return jnp.tensordot(w, d, axes=1)


def _check_dp_pairing(client_stages, server_stages) -> None:
    """Noise is only meaningful if an earlier client stage bounds the same sensitivity.

    The bound must be on the same hparam(s), unit and norm (L2 for Gaussian noise, L1 for
    Laplace noise). Central noise belongs to the server stages; local noise
    (``mechanism="local_gaussian"``) to the client stages, after the clip stage.
    """
    bounded: dict[tuple, int] = {}  # (sensitivity, unit, norm) -> first client stage bounding it
    for i, s in enumerate(client_stages):
        if isinstance(s, base.DPTransform) and not s.noise_multiplier:
            bounded.setdefault((s.sensitivity, s.unit, s.norm), i)
    for where, stages in (("client", client_stages), ("server", server_stages)):
        for j, s in enumerate(stages):
            if not isinstance(s, base.DPTransform) or not s.noise_multiplier:
                continue
            local = s.mechanism == "local_gaussian"
            if local != (where == "client"):
                raise ValueError(
                    f"a {s.mechanism} noise stage is a "
                    f"{'client' if local else 'server'} stage, but it is among the {where} "
                    "stages"
                )
            first = bounded.get((s.sensitivity, s.unit, s.norm))
            if first is None or (local and first > j):
                clip = (
                    f"clip_per_client({s.sensitivity!r}, norm={s.norm!r})"
                    if isinstance(s.sensitivity, str)
                    else "clip_per_layer(...) on the same names"
                )
                order = " before it" if local else ""
                raise ValueError(
                    f"a noise stage scales with hparams[{s.sensitivity!r}] but no client stage "
                    f"clips to it in the {s.norm.upper()} norm{order}, so the sensitivity is "
                    f"unbounded; add {clip}{order}"
                )
