"""Automatic chunk size: how many clients to ``vmap`` together within a memory budget.

A round processes its cohort in chunks (a loop over ``vmap``): working memory is
O(chunk x per-client footprint) whatever the cohort size, and larger chunks give bigger
matrix products. The per-client footprint is estimated from the model, without compiling:
the parameters and their optimiser/gradient/noise/delta copies, plus the intermediates of
one local step (read off the loss function's jaxpr), plus the per-example gradients when
DP-SGD materialises them.

Default budgets (measured on R1, see ``benchmarks/RESULTS.md``): on CPU a cache-sized
16 MiB (small chunks: 1 for R1-cnn, 3 for R1-mlp ran fastest on a 2-core CPU; large chunks
were up to 2x slower); on accelerators a quarter of the device memory.
"""

from __future__ import annotations

import math

import jax
import numpy as np

CPU_BUDGET_BYTES = 16 * 2**20
ACCELERATOR_BUDGET_FRACTION = 0.25
_PARAM_COPIES = 6  # params, optimiser state, gradient, noise, delta, running sum


def default_budget(device: jax.Device | None = None) -> int:
    """The default working-memory budget of one device in bytes."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return CPU_BUDGET_BYTES
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - some backends do not report memory
        limit = None
    if not limit:
        return 4 * 2**30
    return int(limit * ACCELERATOR_BUDGET_FRACTION)


def per_client_bytes(loss_fn, params, x_batch, y_batch, *, per_example_grads: bool) -> int:
    """Estimated working memory of one client update in bytes (see module docstring)."""
    param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))
    jaxpr = jax.make_jaxpr(lambda p, a, b: loss_fn(p, a, b))(params, x_batch, y_batch)
    inter = 0
    for eqn in jaxpr.jaxpr.eqns:
        for v in eqn.outvars:
            aval = v.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                inter += int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
    # Forward intermediates are kept for the backward pass, which makes about as many.
    total = _PARAM_COPIES * param_bytes + 2 * inter
    if per_example_grads:
        total += int(x_batch.shape[0]) * param_bytes
    return max(total, 1)


def aggregator_bytes(aggregator, params, cohort_size: int, num_uploads: int = 1) -> int:
    """Bytes an aggregator holds for the whole round, outside the per-client footprint.

    A gathering aggregator (``aggregator.buffer_slots``, e.g. the coordinate median) keeps
    one float32 row per cohort slot and upload, ``[C, *P]``; on a mesh ``finalize``
    all-gathers it, so every device holds all ``C`` rows. A running-sum aggregator holds one
    copy of the upload, already counted in the per-client footprint: ``0``.
    """
    if not getattr(aggregator, "buffer_slots", False):
        return 0
    size = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return 4 * size * int(cohort_size) * int(num_uploads)


def auto_chunk_size(
    cohort_size: int,
    loss_fn,
    params,
    x_batch,
    y_batch,
    *,
    per_example_grads: bool = False,
    budget_bytes: int | None = None,
    num_devices: int = 1,
    fixed_bytes: int = 0,
) -> int:
    """The largest chunk whose estimated footprint fits ``budget_bytes`` (at least 1).

    ``fixed_bytes`` is memory held for the whole round whatever the chunk (a gathering
    aggregator's buffer, :func:`aggregator_bytes`): the chunks get what is left of the
    budget (a chunk of 1 if nothing is). Never more than the clients each device processes
    (``ceil(cohort / num_devices)``).
    """
    budget = default_budget() if budget_bytes is None else int(budget_bytes)
    if budget <= 0:
        raise ValueError(f"memory budget_bytes={budget_bytes!r} must be positive")
    if fixed_bytes < 0:
        raise ValueError(f"fixed_bytes={fixed_bytes!r} must be >= 0")
    need = per_client_bytes(loss_fn, params, x_batch, y_batch, per_example_grads=per_example_grads)
    per_device = math.ceil(cohort_size / max(num_devices, 1))
    return int(max(1, min(per_device, max(budget - int(fixed_bytes), 0) // need)))
