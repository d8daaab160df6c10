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
        stages receive leaves ``[*leaf]``, one key and ``mask=None``.
    """

    init: Callable[[Params], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]


class DPTransform(NamedTuple):
    """A :class:`RoundTransform` that is part of a DP mechanism, with its privacy metadata.

    The first two fields match :class:`RoundTransform`, so :func:`chain` accepts it. The
    metadata names the hyper-parameters that hold the numbers, so the accountant reads
    exactly the values the round used; nothing recomputes them.

    Attributes:
      init, update: as in :class:`RoundTransform`.
      sensitivity: name of the hparam holding the L2 sensitivity of the summed quantity
        under the add/remove-one-``unit`` relation (the clip norm).
      noise_multiplier: name of the hparam holding sigma; noise std = sigma * sensitivity.
      unit: ``"user"`` or ``"example"``: what the neighbouring relation adds or removes.
    """

    init: Callable[[Params], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]
    sensitivity: str = "clip_norm"
    noise_multiplier: str = "noise_multiplier"
    unit: str = "user"


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
        new_state = []
        for i, (stage, st) in enumerate(zip(stages, state)):  # stages, unrolled at trace time
            stage_key = _fold_in(key, i)
            x, st = stage.update(x, st, key=stage_key, mask=mask, hparams=hparams)
            new_state.append(st)
        return x, tuple(new_state)

    return RoundTransform(init, update)


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
    """Independent N(0, stddev^2) noise with the structure of ``tree``; one key per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [
        (stddev * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        for k, x in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, noise)
