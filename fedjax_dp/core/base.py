"""Core types: round transforms, DP transforms, state and hyper-parameter containers.

A federated round is a chain of pure transforms in the style of optax's
``GradientTransformation``: a factory captures static configuration and returns a
NamedTuple of pure ``init``/``update`` functions. Numeric hyper-parameters (learning
rates, clip norms, noise multipliers) are *not* captured: they arrive in the ``hparams``
mapping at call time, so changing them never recompiles and a sweep can ``vmap`` over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
Params = PyTree
HParams = Mapping[str, jax.Array]
"""Numeric hyper-parameters of a round: a flat mapping of name -> scalar array (traced)."""


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class RoundTransform(NamedTuple):
    """A pure stage of a federated round.

    Attributes:
      init: ``params -> state``.
      update: ``(x, state, *, key, mask, hparams) -> (x, state)``. Client stages receive
        leaves ``[C, *leaf]``, per-client keys ``key[C]`` and ``mask: bool[C]``; server
        stages receive leaves ``[*leaf]``, one key and ``mask=None``. Stateless client
        stages are not called on chunks after the one holding the last real client (only
        padding there); stages with state see every chunk.
      client_stats: optional, client stages only: ``name -> fn(x, *, hparams) -> f32[C]``,
        per-client scalars computed from the stage's INPUT ``x`` (leaves ``[C, *leaf]``).
        The round sums each over the real clients of the cohort (through the chunk loop
        and, on a mesh, across devices) and the server stages read the sums as
        ``hparams[name]``. A released statistic is a DP query like the deltas: the stage
        that consumes it must noise it (e.g. :func:`fedjax_dp.adaptive_clipping`).
      state_hparams: optional: ``state -> {name: f32[]}``, hyper-parameters that the
        stage's state sets for the round. At the start of every round the round reads
        them from the stage's state and every stage sees them as ``hparams[name]`` (the
        caller must not pass them); the round reports their values in its metrics. This
        is how a value the round itself adapts (e.g. an adaptive clip norm) reaches the
        client stages of the same round.
      hparams: the :class:`fedjax_dp.core.hparams.HParam` declarations of the traced
        hyper-parameters the stage reads (name, default, domain); the round collects them
        into ``Round.hparams`` (declare those its ``state_hparams`` sets ``from_state``).
    """

    init: Callable[[Params], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]
    client_stats: Mapping[str, Callable[..., jax.Array]] | None = None
    state_hparams: Callable[[PyTree], Mapping[str, jax.Array]] | None = None
    hparams: tuple = ()


class DPTransform(NamedTuple):
    """A :class:`RoundTransform` that is part of a DP mechanism, with its privacy metadata.

    The first two fields match :class:`RoundTransform`, so :func:`chain` accepts it. The
    metadata names the hyper-parameters that hold the numbers, so the accountant reads
    exactly the values the round used; nothing recomputes them.

    Attributes:
      init, update: as in :class:`RoundTransform`.
      sensitivity: name of the hparam holding the sensitivity of the summed quantity
        under the add/remove-one-``unit`` relation (the clip norm), measured in ``norm``.
        A tuple of names means a clip norm per parameter group: the combined L2
        sensitivity is ``sqrt(sum_g hparams[name_g]^2)`` (:func:`sensitivity_value`).
      noise_multiplier: name of the hparam holding sigma; noise std (Gaussian) or scale
        (Laplace) = sigma * sensitivity. ``""`` for a stage that adds no noise (clipping).
      unit: ``"user"`` or ``"example"``: what the neighbouring relation adds or removes.
      norm: ``"l2"`` or ``"l1"``, the norm the sensitivity is measured in.
      mechanism: for noise stages, how the accountant treats a round: ``"gaussian"``
        (central Gaussian noise on the sum), ``"laplace"`` (central Laplace noise on the
        sum, L1 sensitivity) or ``"local_gaussian"`` (a client stage: every client noises
        its own update; see :func:`fedjax_dp.add_local_gaussian_noise`).
      client_stats, state_hparams, hparams: as in :class:`RoundTransform`; the
        sensitivity and noise-multiplier names are declared implicitly (clip norms ``> 0``,
        noise multiplier ``>= 0``) unless ``hparams`` declares them.
    """

    init: Callable[[Params], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]
    sensitivity: str | tuple[str, ...] = "clip_norm"
    noise_multiplier: str = "noise_multiplier"
    unit: str = "user"
    norm: str = "l2"
    mechanism: str = "gaussian"
    client_stats: Mapping[str, Callable[..., jax.Array]] | None = None
    state_hparams: Callable[[PyTree], Mapping[str, jax.Array]] | None = None
    hparams: tuple = ()


def identity() -> RoundTransform:
    """A stage that returns its input unchanged."""

    def update(x, state, *, key=None, mask=None, hparams=None):
        del key, mask, hparams
        return x, state

    return RoundTransform(lambda _: EmptyState(), update)


def chain(*stages: RoundTransform | DPTransform) -> RoundTransform:
    """Composes stages left to right; each gets its own key via ``fold_in(key, index)``.

    Works for client stages (``key[C]``: folded per client) and server stages (one key).
    """

    def init(params):
        return tuple(s.init(params) for s in stages)

    def update(x, state, *, key, mask=None, hparams=None):
        x, new_state, _ = apply_stages(stages, x, state, key=key, mask=mask, hparams=hparams)
        return x, new_state

    return RoundTransform(init, update)


def apply_stages(stages, x, state, *, key, mask=None, hparams=None):
    """``chain(*stages).update`` that also evaluates the stages' ``client_stats``.

    Returns:
      ``(x, state, stats)``: ``stats`` maps each statistic name to its per-client values
      ``f32[C]``, computed from the input of the stage that declares it (not masked).
    """
    new_state, stats = [], {}
    for i, (stage, st) in enumerate(zip(stages, state)):  # stages, unrolled at trace time
        for name, fn in (getattr(stage, "client_stats", None) or {}).items():
            stats[name] = jnp.asarray(fn(x, hparams=hparams), jnp.float32)
        x, st = stage.update(x, st, key=_fold_in(key, i), mask=mask, hparams=hparams)
        new_state.append(st)
    return x, tuple(new_state), stats


def stats_names(stages) -> tuple[str, ...]:
    """Names of the per-client statistics the stages declare; raises on a duplicate."""
    names: list[str] = []
    for stage in stages:
        for name in getattr(stage, "client_stats", None) or {}:
            if name in names:
                raise ValueError(f"two client stages declare the statistic {name!r}")
            names.append(name)
    return tuple(names)


def state_hparams_of(stages, states) -> dict[str, jax.Array]:
    """The hyper-parameters that the stages' states set (``state_hparams`` hooks)."""
    out: dict[str, jax.Array] = {}
    for stage, st in zip(stages, states):
        fn = getattr(stage, "state_hparams", None)
        if fn is not None:
            for name, value in fn(st).items():
                if name in out:
                    raise ValueError(f"two stages set the hparam {name!r} from their state")
                out[name] = value
    return out


def sensitivity_value(
    sensitivity: str | tuple[str, ...], hparams: Mapping[str, Any], norm: str = "l2"
) -> jax.Array:
    """The numeric sensitivity that a :class:`DPTransform`'s ``sensitivity`` field names.

    One name: ``hparams[name]``. A tuple (a clip norm per parameter group): the combined
    sensitivity of the concatenated groups, ``sqrt(sum_g C_g^2)`` in L2 (each group can
    move by at most ``C_g`` at once, and the worst case has every group at its bound) and
    ``sum_g C_g`` in L1. Works on host floats and traced arrays alike.
    """
    if isinstance(sensitivity, str):
        return jnp.asarray(hparams[sensitivity], jnp.float32)
    values = [jnp.asarray(hparams[n], jnp.float32) for n in sensitivity]
    if norm == "l1":
        return sum(values)
    return jnp.sqrt(sum(jnp.square(v) for v in values))


def dp_stages(stages) -> list[DPTransform]:
    """The :class:`DPTransform` entries of a sequence of stages."""
    return [s for s in stages if isinstance(s, DPTransform)]


def _fold_in(key: jax.Array, data: int) -> jax.Array:
    if key.ndim == 0:
        return jax.random.fold_in(key, data)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)


def tree_l2_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm of a pytree, computed in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def tree_where(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """Selects ``a`` where the scalar ``cond`` is true, else ``b`` (leaf by leaf)."""
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def gaussian_like(key: jax.Array, tree: PyTree, stddev: jax.Array) -> PyTree:
    """Independent N(0, stddev^2) noise with the structure of ``tree``; one key per leaf.

    Drawn in float32 by :func:`fedjax_dp.mechanisms.noise.gaussian` (support to 9.49 sigma; float32
    ``jax.random.normal`` stops near 5.4 sigma, which breaks the claimed ``delta``), scaled,
    then cast to each leaf's dtype.
    """
    from fedjax_dp.mechanisms import noise as noise_lib

    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [
        (stddev * noise_lib.gaussian(k, x.shape, jnp.float32)).astype(x.dtype)
        for k, x in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, noise)
