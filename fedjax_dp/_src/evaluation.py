"""Vectorised evaluation on held-out data (no per-example Python loops)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp._src.models import Model, cross_entropy


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def _evaluate(params, x, y, mask, *, apply_fn, batch_size):
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


def evaluate(model: Model, params, x, y, *, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x[N, ...], y[N])``.

    Batches are padded to a static size and masked, then mapped with ``lax.map`` inside one
    jitted call; the result is synced to the host once.
    """
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
    out = _evaluate(params, x, y, mask, apply_fn=model.apply, batch_size=batch_size)
    return {k: float(v) for k, v in out.items()}
