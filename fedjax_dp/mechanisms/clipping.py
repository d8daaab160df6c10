"""Per-example gradient clipping: the clipped sum of one batch's gradients, fast or plain.

DP-SGD needs ``sum_i min(1, C / ||g_i||) g_i`` over the examples ``i`` of a batch, where
``g_i`` is the gradient of example ``i``'s loss. Two implementations compute the same value:

- ``"per_example"`` (the reference): ``vmap(grad)`` materialises every ``g_i``, then norms,
  scales and sums them. Works for any model; memory and time grow with ``B x |params|``.
- ``"ghost"``: for Flax linen models built of parameter-owning leaf layers (``nn.Dense``,
  ``nn.Conv``, and any other leaf whose output for an example depends only on that example's
  input), one forward pass records each layer's input ``a`` and one backward pass with
  respect to the layers' *outputs* gives their output gradients ``g``. A layer's weight
  gradient for example ``i`` is a function of ``(a_i, g_i)`` only, so its norm is computed
  without the full gradient: ``||a_i||^2 ||g_i||^2`` for a dense layer (the "ghost norm" of
  Goodfellow 2015 / Li et al. 2022), ``||P_i^T g_i||_F`` from the image patches ``P_i`` for a
  convolution, a per-example vector-Jacobian product of the layer alone for anything else.
  The clipped sum is then each layer's weight gradient with cotangent ``c_i g_i`` (the
  "book-keeping" trick of Bu et al. 2023): one batched matmul per layer, no second backward
  pass through the network. Cost: about one non-private step plus the norms.

``"auto"`` picks ``"ghost"`` when the model qualifies (checked at trace time, free at run
time) and ``"per_example"`` otherwise. The ghost path is tested against the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp import models
from fedjax_dp.core import base

METHODS = ("auto", "ghost", "per_example")

LossFn = Callable[[base.Params, jax.Array, jax.Array], jax.Array]


class ClippedSum(NamedTuple):
    """Result of clipping one batch.

    Attributes:
      summed: ``sum_i c_i g_i`` over the batch, structure of ``params`` (float32).
      losses: per-example losses ``f32[B]``.
      norms: per-example gradient L2 norms ``f32[B]`` before clipping (0 for masked rows).
    """

    summed: base.PyTree
    losses: jax.Array
    norms: jax.Array


def clipped_grad_sum(
    loss_fn: LossFn,
    params: base.Params,
    x: jax.Array,
    y: jax.Array,
    valid: jax.Array,
    clip_norm: jax.Array,
    *,
    method: str = "auto",
) -> ClippedSum:
    """``sum_i valid_i * min(1, clip_norm / ||g_i||) * g_i`` for ``g_i = grad loss_fn(x_i, y_i)``.

    Sensitivity: each example contributes a vector of L2 norm at most ``clip_norm``; an
    invalid (masked) example contributes exactly zero.

    Args:
      loss_fn: per-example loss ``(params, x[B, ...], y[B]) -> f32[B]``; row ``i`` of the
        output must depend only on row ``i`` of the inputs (no batch statistics).
      params: the parameters.
      x, y: the batch.
      valid: ``bool[B]``, which rows are real examples.
      clip_norm: the clipping bound ``C`` (traced scalar).
      method: ``"auto"``, ``"ghost"`` (raises if the model does not qualify) or
        ``"per_example"``.
    """
    if method not in METHODS:
        raise ValueError(f"clipping method={method!r} must be one of {METHODS}")
    if method != "per_example":
        taps = discover_layers(loss_fn, params, x, y)
        if isinstance(taps, str):
            if method == "ghost":
                raise ValueError(f"ghost clipping does not support this model: {taps}")
        else:
            return _ghost_clipped_sum(loss_fn, params, x, y, valid, clip_norm, taps)
    return _per_example_clipped_sum(loss_fn, params, x, y, valid, clip_norm)


def _clip_factors(norms, valid, clip_norm):
    return jnp.where(valid, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12)), 0.0)


def _per_example_clipped_sum(loss_fn, params, x, y, valid, clip_norm) -> ClippedSum:
    """The reference: materialise every per-example gradient with ``vmap(grad)``."""

    def one(p, x1, y1):
        return loss_fn(p, x1[None], y1[None])[0]

    losses, grads = jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0))(params, x, y)
    norms = jnp.where(valid, jax.vmap(base.tree_l2_norm)(grads), 0.0)
    scale = _clip_factors(norms, valid, clip_norm)
    summed = jax.tree.map(lambda g: jnp.tensordot(scale, g.astype(jnp.float32), axes=1), grads)
    return ClippedSum(summed, losses, norms)


# --------------------------------------------------------------------------------------
# Ghost clipping.


class _Layer(NamedTuple):
    """A parameter-owning leaf layer found in the model (static, discovered at trace time)."""

    path: tuple[str, ...]
    module: nn.Module  # an unbound copy: apply({"params": p}, a) recomputes the layer alone
    out: jax.ShapeDtypeStruct  # the layer's output


def discover_layers(loss_fn: LossFn, params, x, y) -> list[_Layer] | str:
    """The parameter-owning leaf layers of ``loss_fn``'s Flax model, or why it does not qualify.

    Runs ``loss_fn`` abstractly (``jax.eval_shape``) with a Flax method interceptor that
    records every module ``__call__``. Qualifies when: every parameter belongs to a leaf
    layer (a module that calls no other module); each such layer is called exactly once,
    with one array argument whose leading axis is the batch; and its output is one array
    with the same leading axis.
    """
    calls: list[dict[str, Any]] = []
    stack: list[dict[str, Any]] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        rec = {"module": context.module, "args": args, "kwargs": kwargs, "children": 0}
        if stack:
            stack[-1]["children"] += 1
        stack.append(rec)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            stack.pop()
        rec["out"] = out
        rec["path"] = tuple(context.module.scope.path)
        calls.append(rec)
        return out

    with nn.intercept_methods(interceptor):
        # A fresh closure: eval_shape caches traces by function, and a cached trace would
        # not run the interceptor.
        jax.eval_shape(lambda p, a, b: loss_fn(p, a, b), params, x, y)
    batch = x.shape[0]
    flat = _flatten(params)
    if not flat:
        return "the model has no parameters"
    layers, seen = [], set()
    for rec in calls:
        path = rec["path"]
        owned = [k for k in flat if k[: len(path)] == path]
        if rec["children"] or not owned:
            continue
        if path in seen:
            return f"layer {'/'.join(path)} is called more than once (shared weights)"
        seen.add(path)
        args, out = rec["args"], rec["out"]
        if rec["kwargs"] or len(args) != 1 or not isinstance(args[0], jax.Array):
            return f"layer {'/'.join(path)} is not called with a single array argument"
        if not isinstance(out, jax.Array):
            return f"layer {'/'.join(path)} does not return a single array"
        if args[0].ndim < 1 or args[0].shape[0] != batch or out.ndim < 1 or out.shape[0] != batch:
            return f"layer {'/'.join(path)} does not keep the batch as its leading axis"
        out_struct = jax.ShapeDtypeStruct(out.shape, out.dtype)
        layers.append(_Layer(path, rec["module"].clone(parent=None), out_struct))
    covered = {k for k in flat if any(k[: len(lay.path)] == lay.path for lay in layers)}
    missing = [k for k in flat if k not in covered]
    if missing:
        return (
            f"parameter {'/'.join(missing[0])} does not belong to a leaf layer called by the "
            "model (no Flax linen leaf module owns it)"
        )
    return layers


def _flatten(params) -> dict[tuple[str, ...], jax.Array]:
    out = {}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = []
        for k in kp:
            if not isinstance(k, jax.tree_util.DictKey):
                return {}
            keys.append(str(k.key))
        out[tuple(keys)] = leaf
    return out


def _subtree(params, path):
    for name in path:
        params = params[name]
    return params


def _ghost_clipped_sum(loss_fn, params, x, y, valid, clip_norm, layers) -> ClippedSum:
    def forward(perturb):
        acts = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__":
                path = tuple(context.module.scope.path)
                if path in perturb:
                    acts[path] = args[0]
                    return next_fun(*args, **kwargs) + perturb[path]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            losses = loss_fn(params, x, y)
        return losses, acts

    perturb = {lay.path: jnp.zeros(lay.out.shape, lay.out.dtype) for lay in layers}
    losses, vjp_fn, acts = jax.vjp(forward, perturb, has_aux=True)
    # Cotangent 1 per real example: output grads of masked rows are exactly zero.
    (out_grads,) = vjp_fn(valid.astype(losses.dtype))

    sq_norms = jnp.zeros(x.shape[0], jnp.float32)
    for lay in layers:
        p = _subtree(params, lay.path)
        sq_norms = sq_norms + _sq_norms(lay.module, p, acts[lay.path], out_grads[lay.path])
    norms = jnp.sqrt(sq_norms)
    scale = _clip_factors(norms, valid, clip_norm)

    grads = {}
    for lay in layers:
        p = _subtree(params, lay.path)
        g = out_grads[lay.path]
        g = g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
        a = acts[lay.path]
        _, layer_vjp = jax.vjp(lambda q, a=a, m=lay.module: _apply(m, q, a), p)
        (grads[lay.path],) = layer_vjp(g)
    summed = jax.tree_util.tree_map_with_path(
        lambda kp, _: _lookup(grads, tuple(str(k.key) for k in kp)).astype(jnp.float32), params
    )
    return ClippedSum(summed, losses, norms)


def _lookup(grads, key):
    for path, tree in grads.items():
        if key[: len(path)] == path:
            return _subtree(tree, key[len(path) :])
    raise KeyError(key)  # unreachable: discover_layers checked coverage


def _apply(module, p, a):
    return module.apply({"params": p}, a)


def _sq_norms(module, p, a, g) -> jax.Array:
    """Per-example squared norms ``f32[B]`` of the layer's parameter gradient."""
    a32, g32 = a.astype(jnp.float32), g.astype(jnp.float32)
    if type(module) is nn.Dense and set(p) <= {"kernel", "bias"}:
        return _dense_sq_norms(a32, g32, "bias" in p)
    if type(module) in (nn.Conv, models.PatchConv) and set(p) <= {"kernel", "bias"}:
        patches = models.conv_patches(module, a32)
        if patches is not None:
            return _dense_sq_norms(patches, g32, "bias" in p)
    return _generic_sq_norms(module, p, a, g)


def _dense_sq_norms(a, g, bias: bool) -> jax.Array:
    """``||a_i^T g_i||_F^2`` (+ ``||sum_t g_it||^2``) for ``a[B, ..., K]``, ``g[B, ..., N]``.

    With no middle axes this is the ghost norm ``||a_i||^2 ||g_i||^2``. With ``T`` positions
    it uses the cheaper of the Gram form ``sum (a a^T) * (g g^T)`` (``T^2 (K + N)``) and the
    explicit per-example gradient ``a_i^T g_i`` (``T K N``).
    """
    b = a.shape[0]
    a = a.reshape(b, -1, a.shape[-1])
    g = g.reshape(b, -1, g.shape[-1])
    t, k, n = a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        out = jnp.sum(a[:, 0] ** 2, -1) * jnp.sum(g[:, 0] ** 2, -1)
    elif t * t * (k + n) <= t * k * n:
        aa = jnp.einsum("btk,bsk->bts", a, a)
        gg = jnp.einsum("btn,bsn->bts", g, g)
        out = jnp.sum(aa * gg, axis=(1, 2))
    else:
        out = jnp.sum(jnp.einsum("btk,btn->bkn", a, g) ** 2, axis=(1, 2))
    if bias:
        out = out + jnp.sum(jnp.sum(g, axis=1) ** 2, -1)
    return out


def _generic_sq_norms(module, p, a, g) -> jax.Array:
    """Per-example vector-Jacobian products of the layer alone (materialised per example)."""

    def one(a1, g1):
        _, f = jax.vjp(lambda q: _apply(module, q, a1[None]), p)
        (grad,) = f(g1[None])
        return sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(grad))

    return jax.vmap(one)(a, g)
