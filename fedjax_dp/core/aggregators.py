"""Pluggable aggregators: how a round turns the cohort's uploads into one update.

An aggregator is a NamedTuple of pure functions, optax style. The round calls them per
chunk of the cohort, on each device of a mesh:

- ``init(template, num_slots) -> acc``: ``template`` maps each upload name to a pytree of
  ``jax.ShapeDtypeStruct`` (one client's upload); ``num_slots`` is the number of cohort
  slots this device processes (what a gathering aggregator buffers).
- ``accumulate(acc, uploads, uploaded, client_metrics, offset) -> acc``: ``uploads`` maps
  names to leaves ``[c, *leaf]`` of one chunk, ``uploaded: bool[c]`` (padding, dropped
  stragglers and dropouts are ``False`` and must contribute nothing, even if NaN),
  ``client_metrics`` maps names to ``f32[c]``, ``offset: int32[]`` is the chunk's first slot
  among this device's slots.
- ``finalize(acc, round_ctx, axis_name) -> (totals, normalizer)``: ``totals`` maps each
  upload name to a pytree (what the server stages receive, e.g. the noisy SUM), and the
  round divides it by ``normalizer: f32[]`` afterwards. ``axis_name`` is the mesh axis
  (``"clients"``) or None: a linear aggregator ``psum``s over it, a gathering one
  ``all_gather``s, so the outputs are identical on every device.

Fields ``passes`` (the round re-runs the cohort's chunk loop, with the same keys, so the
client updates are recomputed exactly; ``accumulate`` then gets ``acc`` from ``between``),
``dp_compatible`` (the aggregate of clipped uploads has the clip norm as its sensitivity and
the normaliser is public: only then does the round accept central DP noise) and
``buffer_slots`` (a gathering aggregator holds ``[C, *P]``: the memory model counts it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
WEIGHTINGS = ("uniform", "num_examples")
DENOMINATORS = ("expected", "realised")


class Aggregator(NamedTuple):
    """A pluggable aggregation rule (see the module docstring for each function's contract).

    Attributes:
      init, accumulate, finalize: the per-chunk protocol.
      name: for messages and metrics.
      dp_compatible: True if the SUM that ``finalize`` returns has, per client, exactly
        the bound of the upload (uniform weights) and the normalizer is public (data
        independent): the precondition of central DP noise.
      passes: how many times the round runs the chunk loop (1 or 2).
      between: ``(acc, round_ctx, axis_name) -> acc`` run between passes (passes = 2).
      buffer_slots: True if the accumulator holds one row per cohort slot.
    """

    init: Callable[..., PyTree]
    accumulate: Callable[..., PyTree]
    finalize: Callable[..., tuple[dict[str, PyTree], jax.Array]]
    name: str = "aggregator"
    dp_compatible: bool = False
    passes: int = 1
    between: Callable[..., PyTree] | None = None
    buffer_slots: bool = False


def _zeros(template):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), template)


def _masked(x: jax.Array, keep: jax.Array) -> jax.Array:
    """``x`` in float32 with rows where ``keep`` is False set to exactly 0 (NaN included)."""
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x.astype(jnp.float32), 0.0)


def _psum(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def weighted_sum(weighting: str = "uniform", denominator: str = "expected") -> Aggregator:
    """The weighted sum of each upload, divided by a denominator: FedAvg's aggregation.

    Args:
      weighting: ``"uniform"`` (each uploading client weight 1) or ``"num_examples"``
        (weight = the client's number of examples, metric ``num_examples``).
      denominator: ``"expected"``: the public expected number of uploads
        (``RoundContext.expected_uploads``; DP-FedAvg's fixed denominator) or ``"realised"``:
        the sum of the weights of this round's uploads (data dependent: not for DP).

    Privacy: with uniform weights the sum of uploads clipped to ``C`` has L2 sensitivity
    ``C`` under add/remove of one client; with the expected denominator the division is by a
    public constant, so central noise on the sum gives the Gaussian mechanism that the
    accountant sees (``dp_compatible``). With ``num_examples`` weights a client's weight
    (its data size) scales its contribution, and a realised denominator depends on who took
    part: both are refused next to DP noise.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} must be one of {list(WEIGHTINGS)}")
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator={denominator!r} must be one of {list(DENOMINATORS)}")
    if weighting == "num_examples" and denominator == "expected":
        raise ValueError(
            "weighting='num_examples' needs denominator='realised' (the expected number of "
            "uploads is not a sum of example counts)"
        )

    def init(template, num_slots):
        del num_slots
        return {"sum": _zeros(template), "weight": jnp.zeros((), jnp.float32)}

    def accumulate(acc, uploads, uploaded, client_metrics, offset):
        del offset
        if weighting == "uniform":
            w = uploaded.astype(jnp.float32)
        else:
            w = jnp.where(uploaded, client_metrics["num_examples"], 0.0)
        total = jax.tree.map(
            lambda t, x: t + jnp.tensordot(w, _masked(x, uploaded), axes=1),
            acc["sum"],
            uploads,
        )
        return {"sum": total, "weight": acc["weight"] + jnp.sum(w)}

    def finalize(acc, round_ctx, axis_name):
        acc = _psum(acc, axis_name)
        if denominator == "expected":
            normalizer = jnp.asarray(round_ctx.expected_uploads, jnp.float32)
        else:
            normalizer = jnp.maximum(acc["weight"], 1e-12)
        return acc["sum"], normalizer

    return Aggregator(
        init,
        accumulate,
        finalize,
        name=f"weighted_sum({weighting}, {denominator})",
        dp_compatible=weighting == "uniform" and denominator == "expected",
    )


def coordinate_median() -> Aggregator:
    """The coordinate-wise median of the uploads (a gathering aggregator; not for DP).

    Buffers every slot's upload ``[C, *P]`` (on a mesh each device its own slots, then an
    ``all_gather``), then takes, per coordinate, the median over the clients that uploaded
    (``jnp.nanmedian`` with NaN in the other rows, and in the rows of skipped chunks). A
    round with no upload gives 0.

    Privacy: none (the median of clipped uploads has no bounded sensitivity the accountant
    models); the round refuses it next to central DP noise.
    """

    def init(template, num_slots):
        # NaN rows: a slot whose chunk is skipped (after the last real client, or on a
        # device that holds only padding) is never written and must not count as a zero.
        return jax.tree.map(
            lambda s: jnp.full((num_slots, *s.shape), jnp.nan, jnp.float32), template
        )

    def accumulate(acc, uploads, uploaded, client_metrics, offset):
        del client_metrics

        def put(buf, x):
            rows = jnp.where(
                uploaded.reshape((-1,) + (1,) * (x.ndim - 1)), x.astype(jnp.float32), jnp.nan
            )
            return jax.lax.dynamic_update_slice_in_dim(buf, rows, offset, axis=0)

        return jax.tree.map(put, acc, uploads)

    def finalize(acc, round_ctx, axis_name):
        del round_ctx
        if axis_name is not None:
            acc = jax.lax.all_gather(acc, axis_name, tiled=True)

        def median(buf):
            m = jnp.nanmedian(buf, axis=0)
            return jnp.where(jnp.isnan(m), 0.0, m)

        return jax.tree.map(median, acc), jnp.ones((), jnp.float32)

    return Aggregator(
        init,
        accumulate,
        finalize,
        name="coordinate_median",
        dp_compatible=False,
        buffer_slots=True,
    )


def norm_bounded_mean(radius: float) -> Aggregator:
    """Two passes: the mean of the uploads, then the mean of each upload clipped to L2
    distance ``radius`` around that first mean (a centred-clipping robust aggregator).

    The second pass recomputes every client update with the same keys (exact), so memory
    stays O(chunk x model). Not for DP (the centre depends on everyone's data).
    """
    if not radius > 0:
        raise ValueError(f"radius={radius!r} must be > 0")

    def init(template, num_slots):
        del num_slots
        z = {"sum": _zeros(template), "count": jnp.zeros((), jnp.float32)}
        return {"first": z, "second": z, "centre": _zeros(template), "pass": jnp.zeros((), bool)}

    def accumulate(acc, uploads, uploaded, client_metrics, offset):
        del client_metrics, offset
        w = uploaded.astype(jnp.float32)

        def first(_):
            s = jax.tree.map(
                lambda t, x: t + jnp.tensordot(w, _masked(x, uploaded), axes=1),
                acc["first"]["sum"],
                uploads,
            )
            return {**acc, "first": {"sum": s, "count": acc["first"]["count"] + jnp.sum(w)}}

        def second(_):
            diff = jax.tree.map(lambda x, c: _masked(x, uploaded) - c, uploads, acc["centre"])
            sq = sum(
                jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim))) for d in jax.tree.leaves(diff)
            )
            scale = jnp.minimum(1.0, radius / jnp.maximum(jnp.sqrt(sq), 1e-30)) * w
            s = jax.tree.map(
                lambda t, d, c: t + jnp.tensordot(scale, d, axes=1) + jnp.sum(w) * c,
                acc["second"]["sum"],
                diff,
                acc["centre"],
            )
            return {**acc, "second": {"sum": s, "count": acc["second"]["count"] + jnp.sum(w)}}

        return jax.lax.cond(acc["pass"], second, first, None)

    def between(acc, round_ctx, axis_name):
        del round_ctx
        first = _psum(acc["first"], axis_name)
        centre = jax.tree.map(lambda s: s / jnp.maximum(first["count"], 1.0), first["sum"])
        return {**acc, "centre": centre, "pass": jnp.ones((), bool)}

    def finalize(acc, round_ctx, axis_name):
        del round_ctx
        second = _psum(acc["second"], axis_name)
        return second["sum"], jnp.maximum(second["count"], 1.0)

    return Aggregator(
        init,
        accumulate,
        finalize,
        name=f"norm_bounded_mean({radius:g})",
        passes=2,
        between=between,
    )
