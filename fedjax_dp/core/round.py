"""Assembles one federated round into a single pure function, compiled once.

``round_fn(state, data, hparams, key) -> (state, metrics)`` runs, with no Python loop over
clients:

1. the cohort (:class:`fedjax_dp.contexts.Cohort`) is sampled on device, with its systems
   draws (who uploads, each client's step budget: :mod:`fedjax_dp.systems`);
2. for each chunk of the cohort (a loop on device), the client updates run ``vmap``ped, each
   with a :class:`~fedjax_dp.contexts.ClientContext` (its id, key, flags, step budget, its
   row of ``ServerState.client_states``, the server's broadcast), and return named uploads,
   a new state row and metrics (:class:`~fedjax_dp.contexts.ClientResult`);
3. each upload passes through its own client stages (e.g. the DP clip) and into the
   :class:`~fedjax_dp.aggregators.Aggregator` (default: a streaming weighted sum);
4. each aggregate passes through its server stages (e.g. Gaussian noise on the sum), is
   divided by the aggregator's normaliser, the server optax optimizer steps on
   ``-mean_delta``, the client's server half updates its state (e.g. SCAFFOLD's control
   variate), and the new state rows are scattered back (padding and clients that did not
   upload never write);
5. metrics come back as arrays (no host sync inside the round).

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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_dp.core import aggregators, base
from fedjax_dp.core import hparams as hparams_lib
from fedjax_dp.core import systems as systems_lib
from fedjax_dp.core.client import ClientUpdate
from fedjax_dp.core.contexts import ClientContext, ClientResult, Cohort, RoundContext
from fedjax_dp.core.sampling import CohortSampler

__all__ = ["ClientContext", "ClientResult", "Cohort", "Round", "RoundContext", "ServerState"]

# Purposes of the sub-keys of a round key (fold_in constants).
_SAMPLE, _CLIENTS, _SERVER, _SYSTEMS = 0, 1, 2, 3


class ServerState(NamedTuple):
    """The state of a federated simulation between rounds (a pytree).

    Attributes:
      params: the global model.
      opt_state: the server optax state (``inject_hyperparams``).
      client_tx_state, server_tx_state: states of the per-client and server stages (one
        tuple per upload: ``{"delta": ..., "control": ...}``).
      round: ``int32[]`` rounds completed.
      client_states: population-sized per-client state, leaves ``[N, ...]`` (``()`` for
        stateless clients): the round gathers the cohort's rows and writes back the rows
        of real clients whose upload reached the server (masked scatter, ``mode="drop"``).
      server_aux: what the server keeps and broadcasts besides the params (e.g. SCAFFOLD's
        server control variate), ``()`` if nothing.
      sampler_state: the cohort sampler's state (:class:`fedjax_dp.sampling.CohortSampler`;
        ``()`` for a stateless sampler), advanced every round, skipped rounds included.
    """

    params: base.Params
    opt_state: Any
    client_tx_state: Any
    server_tx_state: Any
    round: jax.Array  # shape=(), dtype=int32: rounds completed
    client_states: Any = ()
    server_aux: Any = ()
    sampler_state: Any = ()


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
      client_stages, server_stages: the stages of the ``"delta"`` upload, for privacy
        metadata.
      sample: ``key -> Cohort``, the cohort (with its systems draws: who uploads, step
        budgets) that ``round_fn`` uses for the round key ``key``, so the host can gather
        its data ahead of the round (jitted unless ``jit=False``). A stateful sampler's
        cohort also depends on the round index and the sampler state: ``sample`` raises,
        use ``sample_step``.
      sample_step: ``(key, round_index, sampler_state) -> (Cohort, new_sampler_state)``,
        the same for any sampler (``round_index = state.round``, ``sampler_state =
        state.sampler_state``).
      upload_stages: ``{name: (client_stages, server_stages)}`` of every upload,
        ``"delta"`` included.
      aggregator: the :class:`fedjax_dp.aggregators.Aggregator`.
      systems: the :class:`fedjax_dp.systems.Systems` model.
      hparams: the :class:`fedjax_dp.core.hparams.HParam` declarations of every traced
        hyper-parameter the round reads: the client update's, ``server_lr``, and every
        stage's (those a stage's state sets are marked ``from_state``).
      host_client_states: whether ``ServerState.client_states`` holds only the cohort's
        rows (the population's live on the host; see :func:`build_round`).
    """

    init: Callable[[base.Params], ServerState]
    round_fn: Callable[..., tuple[ServerState, dict[str, jax.Array]]]
    client_stages: tuple
    server_stages: tuple
    sample: Callable[[jax.Array], Cohort] | None = None
    upload_stages: Mapping[str, tuple[tuple, tuple]] | None = None
    aggregator: aggregators.Aggregator | None = None
    systems: systems_lib.Systems = systems_lib.Systems()
    sample_step: Callable[..., tuple[Cohort, Any]] | None = None
    hparams: tuple = ()
    host_client_states: bool = False


def build_round(
    client: ClientUpdate,
    sampler: CohortSampler,
    *,
    client_stages: Sequence[base.RoundTransform | base.DPTransform] = (),
    server_stages: Sequence[base.RoundTransform | base.DPTransform] = (),
    upload_stages: Mapping[str, tuple[Sequence, Sequence]] | None = None,
    aggregator: aggregators.Aggregator | None = None,
    systems: systems_lib.Systems | None = None,
    server_optimizer: Callable[..., optax.GradientTransformation] = optax.sgd,
    server_optimizer_kwargs: dict[str, Any] | None = None,
    weighting: str | None = None,
    denominator: str | None = None,
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    jit: bool = True,
    host_client_states: bool = False,
) -> Round:
    """Builds a federated round.

    Args:
      client: the per-client update (:func:`fedjax_dp.build_client_update`): its uploads,
        per-client state and server half (:class:`fedjax_dp.ClientUpdate`).
      sampler: the cohort sampler (:func:`fedjax_dp.sampling.fixed_size` / ``poisson``).
      client_stages: per-client transforms on the ``"delta"`` uploads ``[c, *P]`` of each
        chunk (e.g. the DP clip).
      server_stages: transforms on the aggregated ``"delta"`` (the weighted SUM for the
        default aggregator), before division by the aggregator's normaliser (e.g. noise).
      upload_stages: ``{name: (client_stages, server_stages)}`` for the client's other
        uploads (e.g. SCAFFOLD's ``"control"``: its own clip and noise, a second release).
      aggregator: how uploads are combined (:mod:`fedjax_dp.aggregators`); default
        ``weighted_sum(weighting, denominator)``.
      systems: stragglers, dropout, ``min_clients`` (:func:`fedjax_dp.systems.systems`).
      server_optimizer: optax optimizer factory taking ``learning_rate``; it receives the
        pseudo-gradient ``-mean_delta`` (FedAvg: ``optax.sgd`` with ``server_lr=1``).
      weighting, denominator: shorthand for the default aggregator
        (:func:`fedjax_dp.aggregators.weighted_sum`): ``"uniform"`` or ``"num_examples"``;
        ``"expected"`` (public) or ``"mean"``/``"realised"`` (the realised sum of weights).
        Defaults ``"uniform"`` and ``"mean"``. Not with ``aggregator``.
      chunk_size: clients processed together (``vmap``); chunks run one after another, so
        memory is O(chunk_size x model), up to the chunk holding the last real client.
        Default: the whole cohort up to 64.
      mesh: optional device mesh with an axis ``"clients"``: the cohort is split over it
        (``jax.shard_map``; slot ``i`` to device ``i % devices``); each device loops over its
        own chunks and the aggregator reduces over the axis. Client states are gathered and
        scattered on the global arrays (every device the same rows). Client stages must be
        stateless.
      jit: return ``round_fn`` (state donated) and ``sample`` compiled with ``jax.jit``.
      host_client_states: the population's per-client state lives on the HOST (for host
        populations too large for the device, :class:`fedjax_dp.runner.host_states.HostClientStates`):
        ``ServerState.client_states`` then holds only the cohort's rows ``[cohort_size,
        ...]`` (slot ``i``: client ``cohort.ids[i]``), the round must be called with its
        ``cohort``, and it returns the rows updated where a real client uploaded in a round
        that was not skipped (the others unchanged), for the host to scatter back.

    Raises:
      ValueError: a DP noise stage without a clip on the same sensitivity before it; a
        non-DP client stage after the clip (it could rescale clipped uploads); central
        noise with an aggregator whose sum or normaliser is data dependent (num_examples
        weights, a realised denominator, a robust aggregator); ``min_clients`` with Poisson
        sampling next to DP noise.

    Hyper-parameters read from ``hparams``: ``server_lr`` plus whatever the client update and
    the stages read, except those that a stage's state sets (its ``state_hparams`` hook, e.g.
    an adaptive clip norm): the round reads them from ``state`` at its start, every stage
    sees them in ``hparams``, and ``metrics`` reports them under their names. Per-client
    statistics that client stages declare (``client_stats``) are summed over the uploading
    clients and reach the server stages as ``hparams[name]``.
    """
    if aggregator is None:
        denominator = {"mean": "realised", None: "realised"}.get(denominator, denominator)
        aggregator = aggregators.weighted_sum(weighting or "uniform", denominator)
    elif weighting is not None or denominator is not None:
        raise ValueError("give either aggregator or weighting/denominator, not both")
    systems = systems or systems_lib.Systems()
    uploads = tuple(client.uploads)
    if "delta" not in uploads:
        raise ValueError(f"the client's uploads {uploads} must include 'delta'")
    stages_of: dict[str, tuple[tuple, tuple]] = {
        "delta": (tuple(client_stages), tuple(server_stages))
    }
    for name, (cs, ss) in (upload_stages or {}).items():
        if name == "delta":
            raise ValueError("give the 'delta' stages as client_stages/server_stages")
        if name not in uploads:
            raise ValueError(f"upload_stages names {name!r}, which the client does not upload")
        stages_of[name] = (tuple(cs), tuple(ss))
    for name in uploads:
        stages_of.setdefault(name, ((), ()))
    noisy = False
    for name, (cs, ss) in stages_of.items():
        _check_dp_pairing(cs, ss, upload=name)
        noisy = noisy or any(
            isinstance(s, base.DPTransform)
            and s.noise_multiplier
            and s.mechanism != "local_gaussian"
            for s in ss
        )
        if any(getattr(s, "client_stats", None) for s in ss):
            raise ValueError(
                "client_stats are per-client statistics: declare them on client stages"
            )
    if noisy and not aggregator.dp_compatible:
        raise ValueError(
            f"central DP noise needs an aggregator whose sum has the clip norm as its "
            f"sensitivity and a public normaliser; {aggregator.name} is not (use "
            "fedjax_dp.aggregators.weighted_sum('uniform', 'expected'), i.e. weighting="
            "'uniform', denominator='expected')"
        )
    if noisy and systems.min_clients and sampler.sampling == "poisson":
        raise ValueError(
            f"min_clients={systems.min_clients} with Poisson sampling and DP noise: skipping "
            "a round reveals that the realised cohort was small, which the accountant does "
            "not cover; use sampling='fixed' or min_clients=0"
        )
    if aggregator.passes not in (1, 2):
        raise ValueError(f"aggregator {aggregator.name}: passes={aggregator.passes} must be 1 or 2")
    stat_names = base.stats_names([s for cs, _ in stages_of.values() for s in cs])
    declared = hparams_lib.collect(
        [
            client,
            hparams_lib.SERVER_LR,
            *(s for cs, ss in stages_of.values() for s in (*cs, *ss)),
        ]
    )
    cohort_size = sampler.cohort_size
    population = sampler.num_clients
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
    local_slots = local_chunks * chunk_size
    padded = local_slots * num_devices
    client_txs = {name: base.chain(*cs) for name, (cs, _) in stages_of.items()}
    server_txs = {name: base.chain(*ss) for name, (_, ss) in stages_of.items()}
    all_stages = [s for cs, ss in stages_of.values() for s in (*cs, *ss)]
    opt = optax.inject_hyperparams(server_optimizer)(
        learning_rate=0.0, **(server_optimizer_kwargs or {})
    )
    vmapped_update = jax.vmap(
        client.update, in_axes=(None, None, ClientContext(0, 0, 0, 0, 0, 0, 0, None), None)
    )
    expected_uploads = float(sampler.expected_cohort_size) * systems.upload_probability

    def init(params):
        client_states = ()
        if client.init_local is not None:
            row = client.init_local(params)
            rows = cohort_size if host_client_states else population
            client_states = jax.tree.map(
                lambda x: jnp.broadcast_to(x, (rows, *jnp.shape(x))).copy(), row
            )
        server_aux = client.server_init(params) if client.server_init is not None else ()
        return ServerState(
            params=params,
            opt_state=opt.init(params),
            client_tx_state={n: tx.init(params) for n, tx in client_txs.items()},
            server_tx_state={n: tx.init(params) for n, tx in server_txs.items()},
            round=jnp.zeros((), jnp.int32),
            client_states=client_states,
            server_aux=server_aux,
            sampler_state=sampler.initial_state(),
        )

    def _upload_template(params, server_aux, data, local_template, hparams, key):
        """Shapes of one client's uploads and metrics (traced abstractly, never run)."""
        ctx = ClientContext(
            client_id=jnp.zeros((), jnp.int32),
            row=jnp.zeros((), jnp.int32),
            key=key,
            mask=jnp.ones((), bool),
            uploaded=jnp.ones((), bool),
            step_budget=jnp.zeros((), jnp.int32),
            local=local_template,
            server=server_aux,
        )
        out = jax.eval_shape(client.update, params, data, ctx, hparams)
        return out.upload, out.metrics

    def _run_chunks(slots, tx_state, params, server_aux, client_states, data, hparams, keys, rctx):
        """This device's slots in chunks: client updates, client stages, the aggregator.

        ``slots`` holds ``ids`` (global ids: they pick keys and state rows), ``rows`` (the
        clients' indices in ``data``), ``mask``, ``uploaded`` and ``budget``, each
        ``[local_slots]``.
        """
        clients_key = keys
        local_rows0 = jax.tree.map(lambda s: s[0], client_states)
        template, metric_template = _upload_template(
            params, server_aux, data, local_rows0, hparams, clients_key
        )
        n = local_slots // chunk_size
        xs = {k: v.reshape(n, chunk_size) for k, v in slots.items()}

        def chunk(carry, i):
            acc, msums, stat_sums, tx_state, new_local = carry
            c = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in xs.items()}
            cmask, cup = c["mask"], c["mask"] & c["uploaded"]
            ckeys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(clients_key, c["ids"])
            update_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(ckeys, 0)
            tx_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(ckeys, 1)
            local = jax.tree.map(
                lambda s: jnp.take(s, c[state_index], axis=0, mode="clip"), client_states
            )
            ctx = ClientContext(
                c["ids"], c["rows"], update_keys, cmask, cup, c["budget"], local, server_aux
            )
            result = vmapped_update(params, data, ctx, hparams)
            ups = dict(result.upload)
            new_tx = {}
            for j, name in enumerate(stages_of):
                keys_j = (
                    tx_keys
                    if j == 0
                    else jax.vmap(jax.random.fold_in, in_axes=(0, None))(tx_keys, 1000 + j)
                )
                # Same keys as chain(*client_stages).update; also the client statistics.
                ups[name], new_tx[name], stats = base.apply_stages(
                    stages_of[name][0],
                    ups[name],
                    tx_state[name],
                    key=keys_j,
                    mask=cup,
                    hparams=hparams,
                )
                for k in stats:
                    stat_sums = {
                        **stat_sums,
                        k: stat_sums[k] + jnp.sum(jnp.where(cup, stats[k], 0.0)),
                    }
            offset = i * chunk_size
            acc = aggregator.accumulate(acc, ups, cup, result.metrics, offset)
            msums = {k: msums[k] + jnp.sum(jnp.where(cmask, result.metrics[k], 0.0)) for k in msums}
            new_local = jax.tree.map(
                lambda buf, r: jax.lax.dynamic_update_slice_in_dim(buf, r, offset, axis=0),
                new_local,
                result.local,
            )
            return acc, msums, stat_sums, new_tx, new_local

        def run_pass(acc):
            carry = (
                acc,
                {k: jnp.zeros((), jnp.float32) for k in metric_template},
                {k: jnp.zeros((), jnp.float32) for k in stat_names},
                tx_state,
                jax.tree.map(
                    lambda s: jnp.zeros((local_slots, *s.shape[1:]), s.dtype), client_states
                ),
            )
            if jax.tree.leaves(tx_state):
                # A stateful client stage sees every chunk, padding included.
                return jax.lax.fori_loop(0, n, lambda i, cr: chunk(cr, i), carry)
            # Chunks after the last real client hold only padding, which contributes exact
            # zeros and writes no state: stop there (a Poisson cohort puts its real clients
            # first, so most padding is skipped). Bit-identical to computing them all.
            mask = slots["mask"]
            num_active = (
                jnp.max(jnp.where(mask, jnp.arange(mask.shape[0]), -1)) + chunk_size
            ) // chunk_size
            return jax.lax.fori_loop(0, num_active, lambda i, cr: chunk(cr, i), carry)

        acc = aggregator.init(template, local_slots)
        carry = run_pass(acc)
        if aggregator.passes == 2:
            acc = aggregator.between(carry[0], rctx, _axis)
            carry = run_pass(acc)
        acc, msums, stat_sums, new_tx, new_local = carry
        totals, normalizer = aggregator.finalize(acc, rctx, _axis)
        if _axis is not None:
            msums, stat_sums = jax.lax.psum((msums, stat_sums), _axis)
        return totals, normalizer, msums, stat_sums, new_tx, new_local

    _axis = None if mesh is None else "clients"
    # Which slot field indexes client_states: global ids, or the cohort slot (host states).
    state_index = "rows" if host_client_states else "ids"
    state_rows = cohort_size if host_client_states else population

    def sample_step(key, round_index, sampler_state) -> tuple[Cohort, Any]:
        ids, mask, overflow, sampler_state = sampler.step(
            jax.random.fold_in(key, _SAMPLE), round_index, sampler_state
        )
        cohort = Cohort(ids, mask, overflow, *_draw_systems(systems, key, ids, mask, client))
        return cohort, sampler_state

    def sample(key) -> Cohort:
        if sampler.stateful:
            raise ValueError(
                f"the {sampler.sampling!r} sampler is stateful: its cohort depends on the "
                "round index and the sampler state; use Round.sample_step(key, state.round, "
                "state.sampler_state), or pass state= to fedjax_dp.population.prefetch_cohorts"
            )
        return sample_step(key, jnp.zeros((), jnp.int32), ())[0]

    def round_fn(state: ServerState, data, hparams, key, cohort: Cohort | None = None):
        params = state.params
        hparams = _with_state_hparams(hparams, state, stages_of)
        if cohort is None:
            if host_client_states and client.init_local is not None:
                raise ValueError(
                    "host_client_states: the state holds only the cohort's rows, so pass "
                    "the cohort (round_fn(state, cohort_data, hparams, key, cohort); "
                    "fedjax_dp.population.run_rounds does it)"
                )
            cohort, sampler_state = sample_step(key, state.round, state.sampler_state)
            rows = cohort.ids
        else:
            cohort = _check_cohort(cohort, data, cohort_size, systems, key, client)
            rows = jnp.arange(cohort_size, dtype=jnp.int32)
            sampler_state = state.sampler_state
            if sampler.stateful:  # the state the host's sample_step reached for this round
                sampler_state = sampler.step(
                    jax.random.fold_in(key, _SAMPLE), state.round, state.sampler_state
                )[3]
        ids, mask, uploaded, budget = (
            cohort.ids,
            cohort.mask,
            cohort.uploaded & cohort.mask,
            cohort.step_budget,
        )
        num_uploads = jnp.sum(uploaded, dtype=jnp.int32)
        rctx = RoundContext(
            round=state.round,
            key=key,
            cohort=cohort,
            num_uploads=num_uploads.astype(jnp.float32),
            expected_uploads=jnp.float32(expected_uploads),
            population=jnp.float32(population),
            stats={},
        )
        # Chunk padding: client 0 (row 0), masked; the same keys in both forms of the round.
        pad = padded - cohort_size
        slots = {
            "ids": jnp.pad(ids, (0, pad)),
            "rows": jnp.pad(rows, (0, pad)),
            "mask": jnp.pad(mask, (0, pad)),
            "uploaded": jnp.pad(uploaded, (0, pad)),
            "budget": jnp.pad(budget, (0, pad)),
        }
        clients_key = jax.random.fold_in(key, _CLIENTS)
        args = (params, state.server_aux, state.client_states, data, hparams, clients_key, rctx)
        if mesh is None:
            totals, normalizer, msums, stat_sums, tx_state, new_local = _run_chunks(
                slots, state.client_tx_state, *args
            )
            slot_index = slots[state_index]
        else:
            if jax.tree.leaves(state.client_tx_state):
                raise ValueError("client stages with state cannot be sharded over a mesh yet")

            def per_device(slots, *args):
                *out, _, new_local = _run_chunks(slots, state.client_tx_state, *args)
                return (*out, new_local)

            spec, rep = jax.sharding.PartitionSpec("clients"), jax.sharding.PartitionSpec()
            # Slot i goes to device i % num_devices, so the real clients at the front of a
            # Poisson cohort are spread evenly and every device skips its share of padding.
            slots = {
                k: _place(a.reshape(-1, num_devices).T.reshape(-1), mesh, spec)
                for k, a in slots.items()
            }
            totals, normalizer, msums, stat_sums, new_local = jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(spec, rep, rep, rep, rep, rep, rep, rep),
                # Per-slot new client-state rows stay sharded: the scatter below runs on the
                # global arrays, so every device writes the same rows.
                out_specs=(rep, rep, rep, rep, spec),
                # Replicated params flow into per-device chunk loops; the aggregator's psum
                # (or all_gather) makes outputs replicated, which the varying-axes type check
                # cannot see through the loop.
                check_vma=False,
            )(slots, *args)
            tx_state = state.client_tx_state
            slot_index = slots[state_index]

        clash = sorted(set(stat_sums) & set(hparams))
        if clash:
            raise ValueError(f"client statistics {clash} clash with hparams of the same names")
        rctx = rctx._replace(stats=stat_sums)
        server_hp = {**hparams, **stat_sums}
        server_key = jax.random.fold_in(key, _SERVER)
        means, server_tx_state = {}, {}
        for j, name in enumerate(stages_of):
            k = server_key if j == 0 else jax.random.fold_in(server_key, 1000 + j)
            total, server_tx_state[name] = server_txs[name].update(
                totals[name], state.server_tx_state[name], key=k, mask=None, hparams=server_hp
            )
            means[name] = jax.tree.map(
                lambda t, p: (t / normalizer).astype(jnp.result_type(p)),
                total,
                _like(name, params, total),
            )
        mean_delta = means["delta"]
        pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
        opt_state = state.opt_state
        opt_state.hyperparams["learning_rate"] = jnp.asarray(hparams["server_lr"], jnp.float32)
        updates, opt_state = opt.update(pseudo_grad, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        server_aux = state.server_aux
        if client.server_update is not None:
            server_aux = client.server_update(server_aux, means, normalizer, rctx, hparams)
        skipped = num_uploads < systems.min_clients
        client_states = state.client_states
        if jax.tree.leaves(client_states):
            write = slots["mask"] & slots["uploaded"] & ~skipped
            where = jnp.where(write, slot_index, state_rows)  # out of range: dropped
            if mesh is not None:
                # The scatter runs on replicated indices and rows: every device the same.
                rep = jax.sharding.PartitionSpec()
                where = _place(where, mesh, rep)
                new_local = jax.tree.map(lambda r: _place(r, mesh, rep), new_local)
            client_states = jax.tree.map(
                lambda s, r: s.at[where].set(r.astype(s.dtype), mode="drop"),
                client_states,
                new_local,
            )
        new_state = ServerState(
            new_params,
            opt_state,
            tx_state,
            server_tx_state,
            state.round + 1,
            client_states,
            server_aux,
            sampler_state,
        )
        if systems.min_clients:
            # Skipped round: nothing but the round counter and the sampler state change
            # (client states were not written above).
            kept = state._replace(
                round=state.round + 1, client_states=client_states, sampler_state=sampler_state
            )
            new_state = base.tree_where(skipped, kept, new_state)
        metrics = {
            "train_loss": msums["loss_sum"] / jnp.maximum(msums["num_seen"], 1.0),
            "num_clients": jnp.sum(mask, dtype=jnp.int32),
            "num_uploads": num_uploads,
            "cohort_overflow": cohort.overflow,
            "update_norm": base.tree_l2_norm(mean_delta),
        }
        if systems.min_clients:
            metrics["skipped"] = skipped.astype(jnp.int32)
        for name, value in msums.items():
            if name not in _BUILTIN_METRICS:
                metrics[name] = value
        for name, value in base.state_hparams_of(
            all_stages, _stage_states(state, stages_of)
        ).items():
            metrics[name] = jnp.asarray(value, jnp.float32)  # the value this round used
        return new_state, metrics

    fn = jax.jit(round_fn, donate_argnums=0) if jit else round_fn
    sample_fn = jax.jit(sample) if jit and not sampler.stateful else sample
    sample_step_fn = jax.jit(sample_step) if jit else sample_step
    return Round(
        init,
        fn,
        stages_of["delta"][0],
        stages_of["delta"][1],
        sample_fn,
        upload_stages=stages_of,
        aggregator=aggregator,
        systems=systems,
        sample_step=sample_step_fn,
        hparams=declared,
        host_client_states=bool(host_client_states and client.init_local is not None),
    )


_BUILTIN_METRICS = ("loss_sum", "num_seen", "num_examples")


def _like(name, params, total):
    """The dtype reference of an upload's mean: the params for ``delta``, else itself."""
    return params if name == "delta" else total


def _stage_states(state: ServerState, stages_of) -> tuple:
    """The stage states in the order of ``[*client, *server]`` stages of every upload."""
    out = []
    for name in stages_of:
        out.extend(state.client_tx_state[name])
        out.extend(state.server_tx_state[name])
    return tuple(out)


def _check_cohort(cohort, data, cohort_size, systems, key, client) -> Cohort:
    """A cohort given by the host: shapes checked, missing systems draws filled in."""
    ids, mask, overflow = (jnp.asarray(a) for a in cohort[:3])
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
    ids, mask, overflow = ids.astype(jnp.int32), mask.astype(bool), overflow.astype(jnp.int32)
    uploaded, budget = getattr(cohort, "uploaded", None), getattr(cohort, "step_budget", None)
    if uploaded is None or budget is None:
        uploaded, budget = _draw_systems(systems, key, ids, mask, client)
    return Cohort(ids, mask, overflow, jnp.asarray(uploaded, bool), jnp.asarray(budget, jnp.int32))


def _draw_systems(systems, key, ids, mask, client):
    """The round's systems draws (who uploads, step budgets) from its key."""
    return systems_lib.draw(
        systems,
        jax.random.fold_in(key, _SYSTEMS),
        ids,
        mask,
        num_steps=client.num_steps,
        local_epochs=client.local_epochs,
    )


def _with_state_hparams(hparams, state: ServerState, stages_of) -> dict:
    """``hparams`` plus the values that the stages' states set for this round."""
    all_stages = [s for cs, ss in stages_of.values() for s in (*cs, *ss)]
    from_state = base.state_hparams_of(all_stages, _stage_states(state, stages_of))
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


def _check_dp_pairing(client_stages, server_stages, upload: str = "delta") -> None:
    """Noise is only meaningful if an earlier client stage bounds the same sensitivity.

    The bound must be on the same hparam(s), unit and norm (L2 for Gaussian noise, L1 for
    Laplace noise). Central noise belongs to the server stages; local noise
    (``mechanism="local_gaussian"``) to the client stages, after the clip stage. Between
    the clip and the noise no stage may change the clipped uploads: a non-DP client stage
    after the clip (e.g. a rescaling) is refused, since it could undo the bound.
    """
    bounded: dict[tuple, int] = {}  # (sensitivity, unit, norm) -> first client stage bounding it
    where_upload = "" if upload == "delta" else f" of upload {upload!r}"
    for i, s in enumerate(client_stages):
        if isinstance(s, base.DPTransform) and not s.noise_multiplier:
            bounded.setdefault((s.sensitivity, s.unit, s.norm), i)
        elif bounded and not isinstance(s, base.DPTransform):
            raise ValueError(
                f"client stage {i}{where_upload} runs after the DP clip stage and may change "
                "the clipped updates (their norm bound is what the noise is calibrated to); "
                "put your own client stages before the clip (build_simulation does so)"
            )
    for where, stages in (("client", client_stages), ("server", server_stages)):
        for j, s in enumerate(stages):
            if not isinstance(s, base.DPTransform) or not s.noise_multiplier:
                continue
            local = s.mechanism == "local_gaussian"
            if local != (where == "client"):
                raise ValueError(
                    f"a {s.mechanism} noise stage is a "
                    f"{'client' if local else 'server'} stage, but it is among the {where} "
                    f"stages{where_upload}"
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
                    f"a noise stage{where_upload} scales with hparams[{s.sensitivity!r}] but "
                    f"no client stage clips to it in the {s.norm.upper()} norm{order}, so the "
                    f"sensitivity is unbounded; add {clip}{order}"
                )
