"""The round's contracts: what a cohort is, what a client sees and returns, what stages see.

A round (:func:`fedjax_dp.build_round`) samples a :class:`Cohort`, runs every client's update
with a :class:`ClientContext` (vmapped over a chunk of the cohort), collects each client's
:class:`ClientResult` (named uploads, a new row of per-client state, per-client metrics),
aggregates the uploads with an :class:`fedjax_dp.aggregators.Aggregator`, and hands the
server stages a :class:`RoundContext`. All of it is traced once inside one jitted function.

Shapes: ``C`` is the cohort's static size (padding included), ``N`` the population size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

PyTree = Any


class Cohort(NamedTuple):
    """The clients of one round.

    Contract: real clients come first (every sampler puts its real clients in the leading
    slots, then padding), so the round stops its chunk loop after the last real client.

    Attributes:
      ids: ``int32[C]`` global client ids (rows of the population).
      mask: ``bool[C]``; ``False`` marks padding slots, which contribute exactly nothing.
      overflow: ``int32[]``, clients a Poisson sampler selected beyond ``C`` (left out).
      uploaded: ``bool[C]`` or None (= ``mask``): whether the client's upload reaches the
        server (a client that drops out after training, or a straggler that the algorithm
        drops, has ``False``). Drawn from the round key, never from client data.
      step_budget: ``int32[C]`` or None (= every step): local steps the client runs (a
        straggler runs fewer); steps past it leave the client's model untouched.
      weight: ``f32[C]`` or None: reserved for sampler-given weights (unused by the
        built-in samplers; aggregation weights are the aggregator's choice).
    """

    ids: jax.Array
    mask: jax.Array
    overflow: jax.Array
    uploaded: jax.Array | None = None
    step_budget: jax.Array | None = None
    weight: jax.Array | None = None


class ClientContext(NamedTuple):
    """What one client sees inside the vmapped update (each field is that client's entry).

    Attributes:
      client_id: ``int32[]`` global id (it picks the client's keys).
      row: ``int32[]`` the client's index in the ``data`` passed to the round (equal to
        ``client_id`` when ``data`` is the population; the slot for a gathered cohort).
      key: the client's typed key for its update (already folded with its id).
      mask: ``bool[]`` whether this slot is a real client.
      uploaded: ``bool[]`` whether its upload reaches the server.
      step_budget: ``int32[]`` local steps it may run.
      local: its row of the population's per-client state (``ServerState.client_states``),
        or ``()`` for a stateless client.
      server: what the server broadcasts besides the parameters (e.g. SCAFFOLD's server
        control variate), or ``()``.
    """

    client_id: jax.Array
    row: jax.Array
    key: jax.Array
    mask: jax.Array
    uploaded: jax.Array
    step_budget: jax.Array
    local: PyTree = ()
    server: PyTree = ()


class ClientResult(NamedTuple):
    """What one client's update returns.

    Attributes:
      upload: ``{name: pytree}``, the messages the client sends; ``"delta"`` (the model
        delta, structure of the params) is always there, others are algorithm specific
        (SCAFFOLD's ``"control"``). Each is aggregated on its own, through its own stages.
      local: the client's new state row (same structure as ``ClientContext.local``); the
        round writes it back only for real clients whose upload reached the server in a
        round that was not skipped.
      metrics: ``{name: f32[]}`` per-client scalars; the round sums them over the real
        clients (``loss_sum``, ``num_seen``, ``num_examples`` are the built-in ones).
    """

    upload: dict[str, PyTree]
    local: PyTree
    metrics: dict[str, jax.Array]


class RoundContext(NamedTuple):
    """What aggregators and server stages see; identical on every device.

    Attributes:
      round: ``int32[]`` index of this round (rounds completed before it).
      key: the round's key (shared randomness, e.g. for secure-aggregation masks).
      cohort: the round's :class:`Cohort`.
      num_uploads: ``f32[]`` real clients whose upload reached the server (a private
        quantity under Poisson sampling: never released by a DP run).
      expected_uploads: ``f32[]`` the public expected number of uploads (the DP
        denominator): expected cohort size x the probability of uploading.
      population: ``f32[]`` the population size ``N`` (public).
      stats: ``{name: f32[...]}`` cohort sums of the client stages' statistics.
    """

    round: jax.Array
    key: jax.Array
    cohort: Cohort
    num_uploads: jax.Array
    expected_uploads: jax.Array
    population: jax.Array
    stats: dict[str, jax.Array]
