"""Client updates: local optax optimisation over ``S`` steps, optionally with DP-SGD inside.

A client update is a pure function of ONE client, ``(params, data, ctx, hparams) ->
ClientResult``, with ``ctx`` its :class:`fedjax_dp.contexts.ClientContext`; the round
``vmap``s it over a chunk of the cohort. It gathers the client's own examples from the flat
dataset arrays step by step, so a cohort never materialises its data as a whole.

Algorithms on top of local SGD: FedProx (Li et al. 2020: a proximal term
``mu/2 |w - w_global|^2``, ``mu`` a traced hparam) and SCAFFOLD (Karimireddy et al. 2020,
option II: control variates, the client's own in ``ServerState.client_states``, the
server's in ``ServerState.server_aux``; the client uploads its delta and the change of its
control variate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_dp.core import base
from fedjax_dp.core import hparams as hparams_lib
from fedjax_dp.core.contexts import ClientContext, ClientResult
from fedjax_dp.mechanisms import clipping

LossFn = Callable[[base.Params, jax.Array, jax.Array], jax.Array]
"""``(params, x[B, *feature], y[B]) -> per-example losses f32[B]``."""


class ClientUpdate(NamedTuple):
    """A per-client update, the public facts of its schedule, and its state contracts.

    Attributes:
      update: ``(params, data, ctx: ClientContext, hparams) -> ClientResult`` for one
        client. ``upload["delta"]`` has the structure of ``params``; metrics is a dict of
        scalars (``loss_sum``, ``num_seen``, ``num_examples``, and any of the algorithm's).
      num_steps: static number of local steps ``S`` (steps past a client's data, or past
        its step budget, are masked).
      batch_size: static local batch size ``B``.
      local_epochs: passes over each client's data per round, or None in fixed-step mode.
      example_dp: whether DP-SGD (per-example clipping + noise) runs inside the client.
      uploads: names of the messages the client sends (``"delta"`` first).
      init_local: ``params -> row``: the initial per-client state row (None: stateless).
      server_init: ``params -> aux``: what the server keeps and broadcasts besides the
        params (None: nothing).
      server_update: ``(aux, means, normalizer, round_ctx, hparams) -> aux``: the server
        half, after aggregation; ``means`` maps each upload to its aggregate divided by
        ``normalizer``.
      hparams: the :class:`fedjax_dp.core.hparams.HParam` declarations of what ``update``
        and ``server_update`` read from ``hparams`` (collected into ``Round.hparams``).
    """

    update: Callable[..., ClientResult]
    num_steps: int
    batch_size: int
    local_epochs: int | None
    example_dp: bool
    uploads: tuple[str, ...] = ("delta",)
    init_local: Callable[[base.Params], base.PyTree] | None = None
    server_init: Callable[[base.Params], base.PyTree] | None = None
    server_update: Callable[..., base.PyTree] | None = None
    hparams: tuple = ()

    def simple(self, params, data, client_id, key, hparams, *, local=(), server=()):
        """One client with a full step budget: ``(upload["delta"], metrics)``.

        A convenience for tests and benchmarks that call a single client outside a round
        (``client_id`` is also its row in ``data``).
        """
        ctx = single_context(client_id, key, self.num_steps, local=local, server=server)
        result = self.update(params, data, ctx, hparams)
        return result.upload["delta"], result.metrics


def single_context(client_id, key, num_steps, *, local=(), server=()) -> ClientContext:
    """The :class:`ClientContext` of one real, uploading client with every step."""
    cid = jnp.asarray(client_id, jnp.int32)
    return ClientContext(
        client_id=cid,
        row=cid,
        key=key,
        mask=jnp.ones((), bool),
        uploaded=jnp.ones((), bool),
        step_budget=jnp.asarray(num_steps, jnp.int32),
        local=local,
        server=server,
    )


def build_client_update(
    loss_fn: LossFn,
    optimizer: Callable[..., optax.GradientTransformation] = optax.sgd,
    *,
    max_count: int,
    batch_size: int,
    local_epochs: int | None = 1,
    local_steps: int | None = None,
    example_dp: bool = False,
    clipping_method: str = "auto",
    unroll: int | bool | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
    proximal: bool = False,
    control_variates: bool = False,
) -> ClientUpdate:
    """Builds the update of one client.

    Local data order: each round every client draws fresh uniform permutations of its
    examples (one per epoch) from its own key. In epoch mode (``local_epochs=E``) each epoch
    owns a block of ``ceil(max_count / B)`` steps (``S = E * ceil(max_count / B)``) that
    visits that epoch's permutation; slots past the client's ``count`` are masked, so every
    example is used exactly ``E`` times and no batch spans two epochs. In step mode
    (``local_steps=S``) the client cycles through one permutation for ``S`` steps (slot
    ``j`` holds its position ``j mod count``). A step whose batch is entirely masked leaves
    parameters and optimizer state untouched.

    Step budget: a client runs only its first ``ctx.step_budget`` steps (a straggler); the
    rest leave its parameters and optimizer state untouched.

    Hyper-parameters read from ``hparams``: ``client_lr``; with ``example_dp`` also
    ``example_clip_norm`` and ``example_noise_multiplier``; with ``proximal`` also ``mu``.

    FedProx (``proximal=True``): each step adds ``mu * (w - w_global)`` to the gradient
    (the gradient of ``mu/2 |w - w_global|^2``), after the DP-SGD noise when example-level
    DP is on (it is data independent). ``mu = 0`` is FedAvg; ``mu`` is traced, so a sweep
    over it does not recompile.

    SCAFFOLD (``control_variates=True``; Karimireddy et al. 2020, Alg. 1 with option II):
    each step uses the corrected gradient ``g + c - c_i`` (``c`` the server control variate
    ``ctx.server["control"]``, ``c_i`` the client's ``ctx.local["control"]``). After its
    ``K`` real steps (``K >= 1``) with learning rate ``eta = hparams["client_lr"]`` the client
    sets ``c_i+ = c_i - c - delta / (K eta)`` and uploads ``delta`` and
    ``control = c_i+ - c_i``; a client that took no step uploads zeros and keeps ``c_i``.
    The server sets ``c <- c + sum_i control_i / N`` (``N`` the population; the sum is the
    aggregate, noised when DP stages sit on the ``"control"`` upload). Option II assumes
    plain SGD locally (``optimizer=optax.sgd``); the control variates live in
    ``ServerState.client_states`` (``[N, *params]``).

    Privacy (``example_dp=True``): in each step, per-example gradients are clipped to L2 norm
    ``example_clip_norm`` (C), the clipped gradients of the real examples are summed, Gaussian
    noise ``N(0, (sigma * C)^2)`` is added to the sum and it is divided by the public batch
    size ``B``. Sensitivity of the sum: C under the zero-out relation (one example replaced by
    a null example that contributes nothing; client dataset sizes, hence the schedule, are
    public). Each example is in exactly ``E`` noised sums per round. Not protected: which
    clients took part and how many examples each holds; the per-client training loss metric.

    Args:
      loss_fn: per-example loss ``(params, x[B, ...], y[B]) -> f32[B]``.
      optimizer: an optax optimizer factory taking ``learning_rate`` (e.g. ``optax.sgd``).
      max_count: the largest client's number of examples (static).
      batch_size: local batch size ``B``.
      local_epochs: passes over the client's data (exclusive with ``local_steps``).
      local_steps: fixed number of local steps (exclusive with ``local_epochs``).
      example_dp: run DP-SGD inside the client.
      clipping_method: how DP-SGD computes the clipped gradient sum: ``"auto"`` (ghost
        clipping when the model qualifies, else per-example gradients), ``"ghost"`` or
        ``"per_example"`` (the reference); see :mod:`fedjax_dp.mechanisms.clipping`. Same result.
      unroll: ``unroll`` of the ``lax.scan`` over local steps. Default: fully unrolled up to
        16 steps (XLA optimises straight-line steps better, notably convolutions on CPU),
        a rolled loop beyond.
      optimizer_kwargs: further static keyword arguments of ``optimizer``.

    Returns:
      A :class:`ClientUpdate`.
    """
    if batch_size is None or int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if (local_epochs is None) == (local_steps is None):
        raise ValueError(
            f"give exactly one of local_epochs={local_epochs!r} and local_steps={local_steps!r}"
        )
    if local_epochs is not None and (int(local_epochs) != local_epochs or local_epochs < 1):
        raise ValueError(f"local_epochs={local_epochs!r} must be a positive integer")
    if local_steps is not None and (int(local_steps) != local_steps or local_steps < 1):
        raise ValueError(f"local_steps={local_steps!r} must be a positive integer")
    if example_dp and local_epochs is None:
        raise ValueError(
            "example-level DP needs local_epochs (each example used a known number of times "
            "per round); set local_epochs instead of local_steps"
        )
    if control_variates and proximal:
        raise ValueError("give either proximal (FedProx) or control_variates (SCAFFOLD)")
    if clipping_method not in clipping.METHODS:
        raise ValueError(f"clipping_method={clipping_method!r} must be one of {clipping.METHODS}")
    batch_size = int(batch_size)
    if local_epochs is not None:
        num_steps = int(local_epochs) * steps_per_epoch(max_count, batch_size)
        num_perms = int(local_epochs)
    else:
        num_steps, num_perms = int(local_steps), 1
    if unroll is None:
        unroll = num_steps <= 16
    opt = optax.inject_hyperparams(optimizer)(learning_rate=0.0, **(optimizer_kwargs or {}))

    def mean_loss_and_grad(params, x, y, valid, key, hparams):
        del key, hparams

        def mean_loss(p):
            losses = loss_fn(p, x, y)
            total = jnp.sum(jnp.where(valid, losses, 0.0))
            return total / jnp.maximum(jnp.sum(valid), 1), total

        (_, loss_sum), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        return grads, loss_sum

    def dp_sgd_grad(params, x, y, valid, key, hparams):
        clip = hparams["example_clip_norm"]
        sigma = hparams["example_noise_multiplier"]

        summed, losses, _ = clipping.clipped_grad_sum(
            loss_fn, params, x, y, valid, clip, method=clipping_method
        )
        noise = base.gaussian_like(key, summed, sigma * clip)
        noisy = jax.tree.map(
            lambda s, n, p: ((s + n) / batch_size).astype(p.dtype), summed, noise, params
        )
        return noisy, jnp.sum(jnp.where(valid, losses, 0.0))

    grad_fn = dp_sgd_grad if example_dp else mean_loss_and_grad

    def update(params, data, ctx: ClientContext, hparams) -> ClientResult:
        order_key, step_key = jax.random.split(ctx.key)
        offset = data.offsets[ctx.row]
        count = data.counts[ctx.row]
        idx, valid = _schedule(
            order_key,
            count,
            max_count=max_count,
            num_steps=num_steps,
            batch_size=batch_size,
            num_perms=num_perms,
            epoch_mode=local_epochs is not None,
        )
        in_budget = jnp.arange(num_steps) < ctx.step_budget
        valid = valid & in_budget[:, None]
        opt_state = opt.init(params)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(hparams["client_lr"], jnp.float32)
        if control_variates:
            correction = jax.tree.map(
                lambda c, ci: c - ci, ctx.server["control"], ctx.local["control"]
            )

        def step(carry, xs):
            p, o = carry
            step_idx, step_valid, k = xs
            rows = offset + step_idx
            x = jnp.take(data.x, rows, axis=0, mode="clip")
            # Masked slots see zeros, so nothing from outside the client can leak into grads.
            x = jnp.where(
                step_valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype)
            )
            y = jnp.take(data.y, rows, axis=0, mode="clip")
            grads, loss_sum = grad_fn(p, x, y, step_valid, k, hparams)
            if proximal:
                mu = jnp.asarray(hparams["mu"], jnp.float32)
                grads = jax.tree.map(
                    lambda g, w, w0: (g + mu * (w - w0)).astype(g.dtype), grads, p, params
                )
            if control_variates:
                grads = jax.tree.map(lambda g, c: (g + c).astype(g.dtype), grads, correction)
            updates, new_o = opt.update(grads, o, p)
            new_p = optax.apply_updates(p, updates)
            any_valid = jnp.any(step_valid)
            return (base.tree_where(any_valid, new_p, p), base.tree_where(any_valid, new_o, o)), (
                loss_sum,
                jnp.sum(step_valid),
                any_valid,
            )

        step_keys = jax.random.split(step_key, num_steps)
        (final, _), (loss_sums, seen, stepped) = jax.lax.scan(
            step, (params, opt_state), (idx, valid, step_keys), unroll=unroll
        )
        delta = jax.tree.map(jnp.subtract, final, params)
        metrics = {
            "loss_sum": jnp.sum(loss_sums),
            "num_seen": jnp.sum(seen).astype(jnp.float32),
            "num_examples": count.astype(jnp.float32),
        }
        upload, local = {"delta": delta}, ctx.local
        if control_variates:
            k_steps = jnp.sum(stepped).astype(jnp.float32)
            eta = jnp.asarray(hparams["client_lr"], jnp.float32)
            inv = jnp.where(k_steps > 0, 1.0 / jnp.maximum(k_steps * eta, 1e-30), 0.0)
            # c_i+ - c_i = -c - delta / (K eta) when K >= 1; 0 otherwise.
            change = jax.tree.map(
                lambda c, d: jnp.where(k_steps > 0, -c - d.astype(jnp.float32) * inv, 0.0),
                ctx.server["control"],
                delta,
            )
            upload["control"] = change
            local = {"control": jax.tree.map(jnp.add, ctx.local["control"], change)}
        return ClientResult(upload, local, metrics)

    extra: dict[str, Any] = {}
    if control_variates:

        def zeros(params):
            return {"control": jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)}

        def server_update(aux, means, normalizer, round_ctx, hparams):
            del hparams
            # sum_i control_i / N: the aggregate (mean x normaliser) over the population.
            scale = normalizer / round_ctx.population
            return {
                "control": jax.tree.map(
                    lambda c, m: c + scale * m.astype(jnp.float32),
                    aux["control"],
                    means["control"],
                )
            }

        extra = dict(
            uploads=("delta", "control"),
            init_local=zeros,
            server_init=zeros,
            server_update=server_update,
        )
    declared = [hparams_lib.CLIENT_LR]
    if example_dp:
        declared += [hparams_lib.EXAMPLE_CLIP_NORM, hparams_lib.EXAMPLE_NOISE_MULTIPLIER]
    if proximal:
        declared.append(hparams_lib.MU)
    return ClientUpdate(
        update,
        num_steps,
        batch_size,
        local_epochs,
        bool(example_dp),
        hparams=tuple(declared),
        **extra,
    )


def steps_per_epoch(max_count: int, batch_size: int) -> int:
    """Local steps of one epoch: ``ceil(max_count / batch_size)`` (the last batch padded)."""
    return -(-int(max_count) // int(batch_size))


def _schedule(key, count, *, max_count, num_steps, batch_size, num_perms, epoch_mode):
    """Example positions ``int32[S, B]`` within the client and their validity ``bool[S, B]``.

    Epoch mode (``num_perms`` epochs): epoch ``e`` owns its own block of
    ``steps_per_epoch(max_count, batch_size)`` steps and visits a fresh permutation of the
    client's ``count`` examples, its tail masked. No batch spans two epochs, so every example
    is in exactly one batch per epoch and never twice in a batch: each example passes
    through exactly ``num_perms`` noised sums with sensitivity ``C`` (what example-level
    accounting assumes). Step mode (``num_perms = 1``): the one permutation is cycled, no
    masking.
    """
    slots = jnp.arange(num_steps * batch_size, dtype=jnp.int32)
    count = jnp.maximum(count, 1)
    u = jax.random.uniform(key, (num_perms, max_count))
    u = jnp.where(jnp.arange(max_count) < count, u, 2.0)  # padding sorts last
    perms = jnp.argsort(u, axis=-1).astype(jnp.int32)
    if epoch_mode:
        per_epoch = steps_per_epoch(max_count, batch_size) * batch_size
        epoch = jnp.minimum(slots // per_epoch, num_perms - 1)
        pos = slots % per_epoch
        idx = perms[epoch, jnp.minimum(pos, max_count - 1)]
        valid = pos < count
    else:
        idx = perms[0, slots % count]
        valid = jnp.ones_like(slots, dtype=bool)
    return idx.reshape(num_steps, batch_size), valid.reshape(num_steps, batch_size)
