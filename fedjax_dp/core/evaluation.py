"""Vectorised evaluation on held-out data (no per-example Python loops)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp.models import Model, cross_entropy


def _evaluate_impl(params, x, y, mask, *, apply_fn, batch_size):
    xb = x.reshape((-1, batch_size) + x.shape[1:])
    yb = y.reshape((-1, batch_size))
    mb = mask.reshape((-1, batch_size))

    def one(args):
        xi, yi, mi = args
        logits = apply_fn(params, xi)
        loss = jnp.sum(jnp.where(mi, cross_entropy(logits, yi), 0.0))
        correct = jnp.sum(jnp.where(mi, jnp.argmax(logits, -1) == yi, False))
        return loss, correct

    losses, corrects = jax.lax.map(one, (xb, yb, mb))
    n = jnp.maximum(jnp.sum(mask), 1)
    return {"loss": jnp.sum(losses) / n, "accuracy": jnp.sum(corrects) / n}


_evaluate = jax.jit(_evaluate_impl, static_argnames=("apply_fn", "batch_size"))


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def _evaluate_batch(params, x, y, mask, *, apply_fn, batch_size):
    def one(p):
        return _evaluate_impl(p, x, y, mask, apply_fn=apply_fn, batch_size=batch_size)

    return jax.vmap(one)(params)


def _padded(x, y, batch_size: int):
    """``(x, y, mask, batch_size)``: the data padded to a multiple of the batch, and masked."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    n = len(y)
    if n == 0:
        raise ValueError("evaluation data is empty")
    batch_size = int(min(batch_size, n))
    pad = (-n) % batch_size
    mask = np.arange(n + pad) < n
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    return x, y, mask, batch_size


def evaluate(model: Model, params, x, y, *, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x[N, ...], y[N])``.

    Batches are padded to a static size and masked, then mapped with ``lax.map`` inside one
    jitted call; the result is synced to the host once.
    """
    x, y, mask, batch_size = _padded(x, y, batch_size)
    out = _evaluate(params, x, y, mask, apply_fn=model.apply, batch_size=batch_size)
    return {k: float(v) for k, v in out.items()}


def evaluate_batch(model: Model, params, x, y, *, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """:func:`evaluate` for a batch of models at once (``vmap`` over their parameters).

    Args:
      model: the model shared by all parameter sets.
      params: a parameter pytree whose leaves have a leading axis ``[M, *leaf]`` (``M``
        models, e.g. the points of a sweep).
      x, y: held-out data ``[N, ...]`` and labels ``[N]``, shared by the models.
      batch_size: evaluation batch size.

    Returns:
      ``{"loss": f32[M], "accuracy": f32[M]}`` as numpy arrays (one host sync).
    """
    x, y, mask, batch_size = _padded(x, y, batch_size)
    out = _evaluate_batch(params, x, y, mask, apply_fn=model.apply, batch_size=batch_size)
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}
