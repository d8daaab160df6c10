"""Shared test helpers: small federated data, tree asserts and plain-loop references."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_dp
from fedjax_dp.core import base
from fedjax_dp.core import client as client_lib

# A tiny DP-FedAvg run: 20 digits clients, Poisson rate 0.5, an MLP with 8 hidden units.
TINY_DP_RUN = """\
[run]
seed = 3
rounds = 6
eval_every = 3
checkpoint_every = 4
progress = false

[data]
source = "digits"
num_clients = 20
partition = "iid"

[model]
name = "mlp"
hidden = [8]

[algorithm]
name = "dp_fedavg"
sampling = "poisson"
sampling_rate = 0.5
local_epochs = 0
local_steps = 1
batch_size = 16
client_lr = 0.2
clip_norm = 0.5
noise_multiplier = 1.0

[privacy]
delta = 1e-3
"""


def cli_output(argv: list[str], stream: str = "stderr") -> tuple[int, str]:
    """Runs ``fedjax-dp`` in this process: ``(exit code, what it wrote to stream)``."""
    from fedjax_dp import cli

    buf = io.StringIO()
    redirect = contextlib.redirect_stderr if stream == "stderr" else contextlib.redirect_stdout
    with redirect(buf):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # --help and argparse errors exit
            code = e.code
    return code, buf.getvalue()


def cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    """Runs ``python -m fedjax_dp *args`` in a fresh process (text output, no check)."""
    return subprocess.run(
        [sys.executable, "-m", "fedjax_dp", *args], capture_output=True, text=True, check=False
    )


# The round's key purposes, restated here so the loop reference derives keys independently.
SAMPLE, CLIENTS, SERVER, SYSTEMS = 0, 1, 2, 3


def small_data(num_clients=12, seed=0, feature_dim=6, num_classes=3, min_count=2, max_count=9):
    """A federated dataset with unequal client sizes (host numpy)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(min_count, max_count + 1, size=num_clients)
    counts[0] = max_count
    ids = np.repeat(np.arange(num_clients), counts)
    x = rng.normal(size=(len(ids), feature_dim)).astype(np.float32)
    y = rng.integers(0, num_classes, size=len(ids)).astype(np.int32)
    return fedjax_dp.from_arrays(x, y, ids, num_classes=num_classes)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
        a,
        b,
    )


def tree_flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def epoch_schedule(key, count, max_count, batch_size, epochs):
    """The client's epoch-mode batch schedule as numpy ``(idx[S, B], valid[S, B])``."""
    idx, valid = client_lib._schedule(
        key,
        jnp.int32(count),
        max_count=max_count,
        num_steps=epochs * client_lib.steps_per_epoch(max_count, batch_size),
        batch_size=batch_size,
        num_perms=epochs,
        epoch_mode=True,
    )
    return np.asarray(idx), np.asarray(valid)


def single_and_sharded(config, model, data, mesh, rounds):
    """Runs ``rounds`` rounds on one device and on ``mesh`` from the same keys.

    Returns ``[(params, [metrics per round]) for single, sharded]``.
    """
    sims = [
        fedjax_dp.build_simulation(config, model, data),
        fedjax_dp.build_simulation(config, model, data, mesh=mesh),
    ]
    dev = data.to_device()
    hp = sims[0].make_hparams()
    outs = []
    for sim in sims:
        state, history = sim.init(jax.random.key(0)), []
        for r in range(rounds):
            state, metrics = sim.round_fn(state, dev, hp, jax.random.key(r))
            history.append(metrics)
        outs.append((state.params, history))
    return outs


def loop_clip(deltas_list, clip):
    out = []
    for d in deltas_list:
        norm = float(
            np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(d)))
        )
        s = min(1.0, clip / max(norm, 1e-30))
        out.append(jax.tree.map(lambda x, s=s: np.asarray(x, np.float64) * s, d))
    return out


def loop_round(sim: fedjax_dp.Simulation, state, data, hparams, key):
    """A plain-Python reference of one round: a loop over sampled clients, SGD server only.

    Derives every key on its own from the documented scheme (round key -> purpose ->
    client id) and adds the server noise with the same key as the round's noise stage.
    """
    assert sim.config.server_optimizer == "sgd"
    ids, mask, _ = sim.sampler.sample(jax.random.fold_in(key, SAMPLE))
    clients_key = jax.random.fold_in(key, CLIENTS)
    deltas, weights = [], []
    for cid, m in zip(np.asarray(ids), np.asarray(mask)):
        if not m:
            continue
        ckey = jax.random.fold_in(clients_key, int(cid))
        d, metrics = sim.client.simple(
            state.params, data, jnp.int32(cid), jax.random.fold_in(ckey, 0), hparams
        )
        deltas.append(d)
        weights.append(
            float(metrics["num_examples"]) if sim.config.weighting == "num_examples" else 1.0
        )
    if sim.config.user_dp:
        deltas = loop_clip(deltas, float(hparams["clip_norm"]))
    total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), state.params)
    for d, w in zip(deltas, weights):
        total = jax.tree.map(lambda t, x, w=w: t + w * np.asarray(x, np.float64), total, d)
    if sim.config.user_dp:
        std = float(hparams["noise_multiplier"]) * float(hparams["clip_norm"])
        # chain(...) folds the stage index (0) into the server key.
        noise = base.gaussian_like(
            jax.random.fold_in(jax.random.fold_in(key, SERVER), 0), state.params, jnp.float32(std)
        )
        total = jax.tree.map(lambda t, n: t + np.asarray(n, np.float64), total, noise)
        denom = sim.sampler.expected_cohort_size
    else:
        denom = max(sum(weights), 1e-12)
    lr = float(hparams["server_lr"])
    return jax.tree.map(
        lambda p, t: np.asarray(p, np.float64) + lr * t / denom, state.params, total
    )


def loop_client_sgd(
    loss_fn,
    params,
    data,
    client_id,
    key,
    *,
    max_count,
    batch_size,
    epochs,
    lr,
    clip=None,
    budget=None,
    mu=0.0,
    correction=None,
    return_steps=False,
):
    """Plain loop over local steps and examples: SGD, optional per-example clipping (no noise).

    ``budget``: only the first ``budget`` steps run (a straggler); ``mu``: FedProx's
    gradient term ``mu (w - w0)``; ``correction``: SCAFFOLD's ``c - c_i`` added to every
    step's gradient. With ``return_steps`` also returns the number of steps taken.
    """
    order_key, _ = jax.random.split(key)
    offset = int(data.offsets[client_id])
    count = int(data.counts[client_id])
    idx, valid = epoch_schedule(order_key, count, max_count, batch_size, epochs)
    num_steps = len(idx)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    x_all, y_all = np.asarray(data.x), np.asarray(data.y)

    def grad_one(p, i):
        xi = jnp.asarray(x_all[offset + i][None], jnp.float32)
        yi = jnp.asarray(y_all[offset + i][None])
        p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
        g = jax.grad(lambda q: loss_fn(q, xi, yi)[0])(p32)
        return jax.tree.map(lambda a: np.asarray(a, np.float64), g)

    p0 = p
    taken = 0
    for s in range(num_steps if budget is None else min(num_steps, budget)):
        rows = [int(i) for i, v in zip(idx[s], valid[s]) if v]
        if not rows:
            continue
        taken += 1
        grads = [grad_one(p, i) for i in rows]
        if clip is not None:
            grads = loop_clip(grads, clip)
            denom = batch_size
        else:
            denom = len(rows)
        g_sum = grads[0]
        for g in grads[1:]:
            g_sum = jax.tree.map(np.add, g_sum, g)
        g_step = jax.tree.map(lambda g, denom=denom: g / denom, g_sum)
        g_step = jax.tree.map(lambda g, a, a0: g + mu * (a - a0), g_step, p, p0)
        if correction is not None:
            g_step = jax.tree.map(lambda g, c: g + np.asarray(c, np.float64), g_step, correction)
        p = jax.tree.map(lambda a, g: a - lr * g, p, g_step)
    delta = jax.tree.map(lambda a, b: a - np.asarray(b, np.float64), p, params)
    return (delta, taken) if return_steps else delta


def poisson_run_privacy(sigma, num_clients, q, **kwargs):
    """The user-level RoundPrivacy of a run with Poisson sampling at its default cap."""
    from fedjax_dp import accounting, sampling

    return accounting.RoundPrivacy(
        sigma,
        "poisson",
        num_clients,
        sampling_rate=q,
        max_cohort_size=sampling.poisson(num_clients, q).cohort_size,
        **kwargs,
    )


def checkpoint_round_trip(sim: fedjax_dp.Simulation, state, round_index: int = 1):
    """Saves ``state`` as the checkpoint of round ``round_index`` in a temporary folder and
    restores it into a freshly initialised state of ``sim``: the restored ``ServerState``."""
    import tempfile

    from fedjax_dp.runner import checkpointing

    with tempfile.TemporaryDirectory() as d:
        ck = checkpointing.Checkpointer(d)
        try:
            ck.save(
                round_index,
                state,
                history=[{"round": r + 1} for r in range(round_index)],
                accountants={},
                train_key=jax.random.key(9),
                config={},
                elapsed_s=0.0,
            )
            return ck.restore(sim.init(jax.random.key(5)), round_index).state
        finally:
            ck.close()
