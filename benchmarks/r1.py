"""R1 reference benchmark: one round of example-level DP-SGD FedAvg on MNIST-shaped data.

Workload R1 (fixed):

- Data: ``fedjax_dp.data.synthetic_classification`` with float32 images 28x28x1, 10 classes,
  seed 0, exactly 32 examples per client; a population of 1024 clients, or of C clients when
  the cohort C is larger (same generator).
- Models: ``R1-mlp`` (784-256-10 ReLU) and ``R1-cnn`` (conv3x3(16) ReLU maxpool2, conv3x3(32)
  ReLU maxpool2, dense 10; SAME padding).
- One round: a fixed-size cohort of C clients; each runs 1 local epoch of DP-SGD with batch 8
  (4 local steps), per-example clipping to 1.0, noise multiplier 1.0 on each batch's clipped
  sum, SGD lr 0.1; the server takes the mean of the deltas with SGD lr 1.0.

Methods, compared side by side:

- ``engine``: ``sim.round_fn``, the whole round as one jitted function (chunked ``vmap``).
- ``loop``: the FedJAX-style baseline: the same per-client update ``sim.client.update``,
  jitted once for ONE client, called in a Python loop over the sampled clients; the deltas are
  summed on device (the running sum is fused into the per-client jitted call, so there is one
  dispatch per client: the cheapest form of this baseline), then a jitted server step.
- ``opacus``: torch + Opacus, one client at a time (only if both are installed).

Every configuration runs in a fresh subprocess (``--one``) so that its peak RSS is its own.
The default mode runs the grid and writes a markdown table (stdout) and a JSON file.

Usage::

    python -m benchmarks.r1                       # full grid (mlp, cnn) x (64, 512, 4096)
    python -m benchmarks.r1 --models mlp cnn --cohorts 64 512 --methods engine loop \\
        --rounds 5 --chunk-size 64
    python -m benchmarks.r1 --quick               # smoke test: mlp, C=16, 2 rounds
    python -m benchmarks.r1 --diagnose --models mlp cnn   # where a client update spends time
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "results" / "r1.json"
DEFAULT_DIAGNOSE_OUT = Path("benchmarks") / "results" / "r1_diagnose.json"

# ---------------------------------------------------------------------------- the workload

FEATURE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
EXAMPLES_PER_CLIENT = 32
POPULATION = 1024
DATA_SEED = 0
BATCH_SIZE = 8
LOCAL_EPOCHS = 1
CLIENT_LR = 0.1
SERVER_LR = 1.0
EXAMPLE_CLIP_NORM = 1.0
EXAMPLE_NOISE_MULTIPLIER = 1.0
MLP_HIDDEN = (256,)
CNN_CHANNELS = (16, 32)
MODEL_KWARGS = {"mlp": {"hidden": list(MLP_HIDDEN)}, "cnn": {"channels": list(CNN_CHANNELS)}}

FULL_COHORTS = (64, 512, 4096)
FULL_CHUNKS = (16, 64, 256)
METHODS = ("engine", "loop", "opacus")
MATMUL_N = 2048
INIT_SEED, ROUND_SEED = 0, 1

# Purposes of the sub-keys of a round key, as documented in README.md ("How a round is
# built": fold_in(root, round), then per purpose, then fold_in(.., client_id) per client). The
# loop baseline derives its keys from this scheme so that it computes the same round as the
# engine; the equality check below would fail if the two ever disagreed.
KEY_SAMPLE, KEY_CLIENTS = 0, 1
KEY_CLIENT_UPDATE = 0


# ---------------------------------------------------------------------------- FLOP counts


def layer_macs(model_name: str) -> list[int]:
    """Multiply-adds of the forward pass of each weight layer, for one example.

    - Dense ``n_in -> n_out``: ``n_in * n_out``.
    - Conv 3x3, stride 1, SAME padding, ``c_in -> c_out`` on an ``H x W`` input: the output is
      ``H x W x c_out`` and each output value is a dot product of length ``3 * 3 * c_in``
      (padded positions counted, as the convolution computes them): ``H * W * 9 * c_in *
      c_out``. Max pooling 2x2 stride 2 (SAME) maps ``H x W`` to ``ceil(H/2) x ceil(W/2)``.

    R1-mlp: [784*256, 256*10] = [200704, 2560].
    R1-cnn: [28*28*9*1*16, 14*14*9*16*32, 7*7*32*10] = [112896, 903168, 15680].
    Biases, activations, pooling, the softmax, clipping and noise are not counted.
    """
    if model_name == "mlp":
        dims = [math.prod(FEATURE_SHAPE), *MLP_HIDDEN, NUM_CLASSES]
        return [a * b for a, b in itertools.pairwise(dims)]
    if model_name == "cnn":
        h, w, c = FEATURE_SHAPE
        macs = []
        for out in CNN_CHANNELS:
            macs.append(h * w * 3 * 3 * c * out)
            h, w, c = -(-h // 2), -(-w // 2), out
        macs.append(h * w * c * NUM_CLASSES)
        return macs
    raise ValueError(f"unknown model {model_name!r}; choose mlp or cnn")


def train_flops_per_example(model_name: str) -> int:
    """FLOPs of one training step for one example (2 FLOPs per multiply-add).

    Counted per weight layer: the forward pass, the weight gradient (same multiply-adds as the
    forward pass) and the input gradient (same again) of every layer but the first, whose input
    gradient is never needed. R1-mlp: 2 * (203264 + 203264 + 2560) = 818176.
    R1-cnn: 2 * (1031744 + 1031744 + 918848) = 5964672.
    """
    macs = layer_macs(model_name)
    return 2 * (sum(macs) + sum(macs) + sum(macs[1:]))


def flops_per_round(model_name: str, cohort: int) -> int:
    """Every client uses each of its 32 examples once per local epoch."""
    return cohort * EXAMPLES_PER_CLIENT * LOCAL_EPOCHS * train_flops_per_example(model_name)


# ---------------------------------------------------------------------------- setup


def _config(cohort: int, chunk_size: int | None):
    import fedjax_dp

    return fedjax_dp.AlgorithmConfig(
        name="dp_sgd_fedavg",
        sampling="fixed",
        cohort_size=cohort,
        local_epochs=LOCAL_EPOCHS,
        batch_size=BATCH_SIZE,
        client_lr=CLIENT_LR,
        server_lr=SERVER_LR,
        example_clip_norm=EXAMPLE_CLIP_NORM,
        example_noise_multiplier=EXAMPLE_NOISE_MULTIPLIER,
        chunk_size=chunk_size,
    )


def _setup(model_name: str, cohort: int, chunk_size: int | None):
    """Host data, device data, model, simulation and hparams of one R1 configuration."""
    import fedjax_dp

    data = fedjax_dp.data.synthetic_classification(
        num_clients=max(POPULATION, cohort),
        examples_per_client=EXAMPLES_PER_CLIENT,
        feature_shape=FEATURE_SHAPE,
        num_classes=NUM_CLASSES,
        seed=DATA_SEED,
    )
    model = fedjax_dp.get_model(model_name, FEATURE_SHAPE, NUM_CLASSES, **MODEL_KWARGS[model_name])
    sim = fedjax_dp.build_simulation(_config(cohort, chunk_size), model, data)
    return data, data.to_device(), model, sim, sim.make_hparams()


def _round_keys(rounds: int):
    import jax

    root = jax.random.key(ROUND_SEED)
    return [jax.random.fold_in(root, r) for r in range(rounds)]


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _copy_tree(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.copy, tree)


# ---------------------------------------------------------------------------- the loop baseline


def make_loop_round(sim, cohort: int):
    """The FedJAX-style round: a Python loop over clients around a per-client jitted update.

    Returns ``(loop_round, compile_fn)``: ``loop_round(params, data, hparams, key) -> (params,
    train_loss)`` and ``compile_fn(params, data, hparams, key) -> seconds`` that compiles the
    three jitted pieces ahead of time (``lower().compile()``; the jit caches are shared).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    update = sim.client.update

    @jax.jit
    def sample(key):
        ids, _, _ = sim.sampler.sample(jax.random.fold_in(key, KEY_SAMPLE))
        return ids, jax.random.fold_in(key, KEY_CLIENTS)

    @functools.partial(jax.jit, donate_argnums=0)
    def client_step(acc, params, data, client_id, clients_key, hparams):
        key = jax.random.fold_in(jax.random.fold_in(clients_key, client_id), KEY_CLIENT_UPDATE)
        delta, metrics = update(params, data, client_id, key, hparams)
        total, loss_sum, seen = acc
        total = jax.tree.map(lambda t, d: t + d.astype(jnp.float32), total, delta)
        return total, loss_sum + metrics["loss_sum"], seen + metrics["num_seen"]

    @jax.jit
    def zeros(params):
        z = jnp.zeros((), jnp.float32)
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), z, z

    @jax.jit
    def server_step(params, acc, hparams):
        # FedAvg with server SGD: params - lr * (-mean_delta), as the engine computes it.
        total, loss_sum, seen = acc
        mean = jax.tree.map(lambda t, p: (t / cohort).astype(p.dtype), total, params)
        new = jax.tree.map(lambda p, d: p + d * hparams["server_lr"], params, mean)
        return new, loss_sum / jnp.maximum(seen, 1.0)

    def loop_round(params, data, hparams, key):
        ids, clients_key = sample(key)
        acc = zeros(params)
        for cid in np.asarray(ids):
            acc = client_step(acc, params, data, cid, clients_key, hparams)
        return server_step(params, acc, hparams)

    def compile_fn(params, data, hparams, key):
        t0 = time.perf_counter()
        ids, clients_key = sample.lower(key).compile()(key)
        acc = zeros.lower(params).compile()(params)
        client_step.lower(acc, params, data, np.asarray(ids)[0], clients_key, hparams).compile()
        server_step.lower(params, acc, hparams).compile()
        return time.perf_counter() - t0

    return loop_round, compile_fn


# ---------------------------------------------------------------------------- timed methods


def _time_engine(model_name: str, setup, rounds: int) -> dict:
    import jax

    _, dev, _, sim, hp = setup
    state = sim.init(jax.random.key(INIT_SEED))
    keys = _round_keys(rounds + 1)
    t0 = time.perf_counter()
    sim.round_fn.lower(state, dev, hp, keys[0]).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for key in keys:
        t0 = time.perf_counter()
        state, metrics = sim.round_fn(state, dev, hp, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "first_round_s": times[0],
        "round_times_s": times[1:],
        "train_loss": float(metrics["train_loss"]),
        "chunk_size_effective": min(sim.config.chunk_size or 64, sim.config.cohort_size),
    }


def _time_loop(model_name: str, setup, rounds: int) -> dict:
    import jax

    _, dev, model, sim, hp = setup
    params = model.init(jax.random.key(INIT_SEED))
    keys = _round_keys(rounds + 1)
    loop_round, compile_fn = make_loop_round(sim, sim.config.cohort_size)
    compile_s = compile_fn(params, dev, hp, keys[0])
    times = []
    for key in keys:
        t0 = time.perf_counter()
        params, loss = loop_round(params, dev, hp, key)
        jax.block_until_ready((params, loss))
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "first_round_s": times[0],
        "round_times_s": times[1:],
        "train_loss": float(loss),
    }


def _torch_model(model_name: str):
    import torch

    nn = torch.nn
    if model_name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(FEATURE_SHAPE), MLP_HIDDEN[0]),
            nn.ReLU(),
            nn.Linear(MLP_HIDDEN[0], NUM_CLASSES),
        )
    c1, c2 = CNN_CHANNELS
    return nn.Sequential(
        nn.Conv2d(FEATURE_SHAPE[2], c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * c2, NUM_CLASSES),
    )


def _time_opacus(model_name: str, setup, rounds: int) -> dict:
    """Opacus per-sample gradients, one client at a time; DP-SGD steps written out by hand.

    Same math as R1 (per-example clip 1.0, noise 1.0 * clip on each batch's clipped sum,
    divided by the batch size, SGD lr 0.1, 1 epoch in batches of 8, server mean of deltas).
    """
    import numpy as np
    import opacus
    import torch

    data = setup[0]
    cohort = setup[3].config.cohort_size
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    x_all = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data.x, -1, 1)))  # NCHW
    y_all = torch.from_numpy(data.y.astype(np.int64))
    offsets, counts = np.asarray(data.offsets), np.asarray(data.counts)
    module = opacus.GradSampleModule(_torch_model(model_name), loss_reduction="sum")
    params = list(module.parameters())
    global_params = [p.detach().clone() for p in params]
    rng = np.random.default_rng(ROUND_SEED)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    def one_round():
        total = [torch.zeros_like(g) for g in global_params]
        ids = rng.choice(data.num_clients, cohort, replace=False)
        for cid in ids:
            with torch.no_grad():
                for p, g in zip(params, global_params):
                    p.copy_(g)
            order = offsets[cid] + rng.permutation(counts[cid])
            for start in range(0, len(order), BATCH_SIZE):
                rows = torch.from_numpy(order[start : start + BATCH_SIZE])
                loss = loss_fn(module(x_all[rows]), y_all[rows])
                loss.backward()
                grads = [p.grad_sample.reshape(len(rows), -1) for p in params]
                norms = torch.sqrt(sum((g * g).sum(1) for g in grads))
                scale = torch.clamp(EXAMPLE_CLIP_NORM / torch.clamp(norms, min=1e-12), max=1.0)
                with torch.no_grad():
                    for p in params:
                        summed = torch.einsum("b,b...->...", scale, p.grad_sample)
                        noise = torch.randn_like(summed) * (
                            EXAMPLE_NOISE_MULTIPLIER * EXAMPLE_CLIP_NORM
                        )
                        p.add_((summed + noise) / BATCH_SIZE, alpha=-CLIENT_LR)
                        p.grad_sample = None
                        p.grad = None
            with torch.no_grad():
                for t, p, g in zip(total, params, global_params):
                    t.add_(p - g)
        with torch.no_grad():
            for g, t in zip(global_params, total):
                g.add_(t / cohort, alpha=SERVER_LR)

    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        one_round()
        times.append(time.perf_counter() - t0)
    return {"compile_s": None, "first_round_s": times[0], "round_times_s": times[1:]}


def matmul_gflops(reps: int = 10, n: int = MATMUL_N) -> float:
    """Achieved float32 GFLOP/s of a jitted ``n x n`` matmul (median of ``reps`` calls)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def run_one(model_name: str, cohort: int, method: str, chunk_size, rounds, matmul_reps) -> dict:
    """Times one (model, cohort, method[, chunk]) configuration in this process."""
    import jax

    load_start = os.getloadavg()[0]
    setup = _setup(model_name, cohort, chunk_size if method == "engine" else None)
    rss_setup = _maxrss_mib()
    timed = {"engine": _time_engine, "loop": _time_loop, "opacus": _time_opacus}[method]
    result = timed(model_name, setup, rounds)
    rss_peak = _maxrss_mib()
    peak = matmul_gflops(matmul_reps)
    median = statistics.median(result["round_times_s"])
    gflops = flops_per_round(model_name, cohort) / median / 1e9
    row = {
        "model": model_name,
        "cohort": cohort,
        "population": max(POPULATION, cohort),
        "method": method,
        "chunk_size": result.pop("chunk_size_effective", None),
        "rounds_timed": len(result["round_times_s"]),
        "median_round_s": median,
        "updates_per_s": cohort / median,
        **result,
        "peak_rss_mib": rss_peak,
        "rss_after_setup_mib": rss_setup,
        "flops_per_example_step": train_flops_per_example(model_name),
        "flops_per_round": flops_per_round(model_name, cohort),
        "gflops": gflops,
        "matmul_gflops": peak,
        "fraction_of_matmul_peak": gflops / peak,
        "loadavg_1min_start": load_start,
        "loadavg_1min_end": os.getloadavg()[0],
        "device": str(jax.devices()[0]),
    }
    return row


# ---------------------------------------------------------------------------- equality check


def check_engine_vs_loop(model_name: str, cohort: int, chunk_size: int) -> dict:
    """One round of the engine and of the loop from the same params and key; max |diff|."""
    import jax
    import numpy as np

    _, dev, _, sim, hp = _setup(model_name, cohort, chunk_size)
    state = sim.init(jax.random.key(INIT_SEED))
    params0 = _copy_tree(state.params)  # round_fn donates the state
    key = _round_keys(1)[0]
    loop_round, _ = make_loop_round(sim, cohort)
    loop_params, loop_loss = loop_round(params0, dev, hp, key)
    new_state, metrics = sim.round_fn(state, dev, hp, key)
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        new_state.params,
        loop_params,
    )
    moved = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), loop_params, params0
    )
    return {
        "model": model_name,
        "cohort": cohort,
        "chunk_size": chunk_size,
        "max_abs_diff_engine_vs_loop": max(jax.tree.leaves(diffs)),
        "max_abs_param_change": max(jax.tree.leaves(moved)),
        "train_loss_engine": float(metrics["train_loss"]),
        "train_loss_loop": float(loop_loss),
    }


# ---------------------------------------------------------------------------- diagnosis


def diagnose(model_name: str, reps: int) -> dict:
    """Milliseconds per client of the pieces of a DP-SGD client update, side by side.

    The ``S x`` pieces are one jitted call for one step, times S (so they include S dispatches);
    the others are one jitted call for the whole client. The pieces are timed round-robin, ``reps`` times each, so that they share the same
    background load; the median is reported.
    """
    import jax
    import jax.numpy as jnp

    import fedjax_dp

    _, dev, model, sim, hp = _setup(model_name, 64, 16)
    params = model.init(jax.random.key(INIT_SEED))
    key = jax.random.key(ROUND_SEED)
    steps = sim.client.num_steps
    x = dev.x[: steps * BATCH_SIZE].reshape((steps, BATCH_SIZE, *FEATURE_SHAPE))
    y = dev.y[: steps * BATCH_SIZE].reshape((steps, BATCH_SIZE))

    def loss_fn(p, xb, yb):
        return fedjax_dp.cross_entropy(model.apply(p, xb), yb)

    nodp = fedjax_dp.build_client_update(
        loss_fn, max_count=EXAMPLES_PER_CLIENT, batch_size=BATCH_SIZE, local_epochs=LOCAL_EPOCHS
    )

    def clipped_sum(p, xb, yb):
        """Per-example gradients (vmap of grad), clipped, summed: the engine's DP-SGD core."""

        def one(p, x1, y1):
            return loss_fn(p, x1[None], y1[None])[0]

        g = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(p, xb, yb)
        leaves = jax.tree.leaves(g)
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), 1) for v in leaves))
        scale = jnp.minimum(1.0, EXAMPLE_CLIP_NORM / jnp.maximum(norms, 1e-12))
        return jax.tree.map(lambda v: jnp.tensordot(scale, v, axes=1), g)

    def noise(k, p):
        leaves, treedef = jax.tree.flatten(p)
        ks = jax.random.split(k, len(leaves))
        return jax.tree.unflatten(
            treedef, [jax.random.normal(kk, v.shape, v.dtype) for kk, v in zip(ks, leaves)]
        )

    def batch_grad(p, xb, yb):
        return jax.grad(lambda p: jnp.mean(loss_fn(p, xb, yb)))(p)

    def sgd_step(p, xb, yb):
        return jax.tree.map(lambda a, b: a - CLIENT_LR * b, p, batch_grad(p, xb, yb))

    def dp_step(p, xb, yb):  # DP-SGD step without the noise
        return jax.tree.map(lambda a, b: a - CLIENT_LR * b / BATCH_SIZE, p, clipped_sum(p, xb, yb))

    def scanned(step):
        return lambda p, xs, ys: jax.lax.scan(lambda p, xy: (step(p, *xy), None), p, (xs, ys))[0]

    def unrolled(step):
        def run(p, xs, ys):
            for s in range(steps):
                p = step(p, xs[s], ys[s])
            return p

        return run

    clients = jnp.arange(16, dtype=jnp.int32)
    ckeys = jax.random.split(key, 16)
    cid = jnp.int32(3)
    vmapped = jax.vmap(sim.client.update, in_axes=(None, None, 0, 0, None))
    b = f"B={BATCH_SIZE}"
    pieces = {  # name -> (function, args, clients per call; 1/S: one step of S)
        "client update, DP-SGD (1 client)": (sim.client.update, (params, dev, cid, key, hp), 1),
        "client update, DP-SGD (vmap over 16 clients)": (
            vmapped,
            (params, dev, clients, ckeys, hp),
            16,
        ),
        "client update, no DP (1 client)": (nodp.update, (params, dev, cid, key, hp), 1),
        f"{steps} x per-example grads + clip + sum ({b})": (
            clipped_sum,
            (params, x[0], y[0]),
            1 / steps,
        ),
        f"{steps} x gaussian noise of the params' shape": (noise, (key, params), 1 / steps),
        f"{steps} x batch gradient ({b}, no DP)": (batch_grad, (params, x[0], y[0]), 1 / steps),
        f"{steps} SGD steps ({b}) in lax.scan": (scanned(sgd_step), (params, x, y), 1),
        f"{steps} SGD steps ({b}) unrolled": (unrolled(sgd_step), (params, x, y), 1),
        f"{steps} DP-SGD steps without noise ({b}) in lax.scan": (
            scanned(dp_step),
            (params, x, y),
            1,
        ),
        f"{steps} DP-SGD steps without noise ({b}) unrolled": (
            unrolled(dp_step),
            (params, x, y),
            1,
        ),
    }
    jitted = {name: (jax.jit(f), a, n) for name, (f, a, n) in pieces.items()}
    for f, a, _ in jitted.values():
        jax.block_until_ready(f(*a))
    times = {name: [] for name in jitted}
    for _ in range(reps):
        for name, (f, a, _) in jitted.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            times[name].append(time.perf_counter() - t0)
    rows = {name: 1e3 * statistics.median(times[name]) / jitted[name][2] for name in jitted}
    return {"model": model_name, "reps": reps, "ms_per_client": rows}


# ---------------------------------------------------------------------------- orchestration


def machine() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": importlib.metadata.version("jax"),
        "jaxlib": importlib.metadata.version("jaxlib"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return info


def grid(models, cohorts, methods, chunk_sizes):
    """(model, cohort, method, chunk) in run order; chunk sizes above C collapse to C."""
    for model_name in models:
        for cohort in cohorts:
            for method in methods:
                if method == "engine":
                    for chunk in sorted({min(c, cohort) for c in chunk_sizes}):
                        yield model_name, cohort, method, chunk
                else:
                    yield model_name, cohort, method, None


def _subprocess(args: list[str], timeout: float) -> tuple[dict | None, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, "-m", "benchmarks.r1", *args]
    try:
        proc = subprocess.run(
            cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    return json.loads(lines[-1]), ""


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    loop = {
        (r["model"], r["cohort"]): r["updates_per_s"]
        for r in rows
        if r.get("method") == "loop" and "updates_per_s" in r
    }
    head = (
        "| model | C | method | chunk | updates/s | median round s | first round s | compile s "
        "| peak RSS MiB | GFLOP/s | matmul GFLOP/s | % of matmul | engine/loop |"
    )
    out = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        if "updates_per_s" not in r:
            why = r.get("skipped") or r.get("error", "failed")
            out.append(
                f"| {r['model']} | {r['cohort']} | {r['method']} | {_fmt(r.get('chunk_size'))} "
                f"| {why.splitlines()[0][:80]} |" + " |" * 8
            )
            continue
        ratio = "-"
        if r["method"] == "engine" and (r["model"], r["cohort"]) in loop:
            ratio = f"{r['updates_per_s'] / loop[(r['model'], r['cohort'])]:.2f}"
        out.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    str(r["cohort"]),
                    r["method"],
                    _fmt(r.get("chunk_size")),
                    _fmt(r["updates_per_s"], 1),
                    _fmt(r["median_round_s"], 3),
                    _fmt(r["first_round_s"], 3),
                    _fmt(r["compile_s"], 2),
                    _fmt(r["peak_rss_mib"], 0),
                    _fmt(r["gflops"], 2),
                    _fmt(r["matmul_gflops"], 1),
                    f"{100 * r['fraction_of_matmul_peak']:.2f}%",
                    ratio,
                ]
            )
            + " |"
        )
    return "\n".join(out)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.r1", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    p.add_argument("--cohorts", nargs="+", type=int, default=list(FULL_COHORTS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--chunk-size", nargs="+", type=int, default=list(FULL_CHUNKS), help="engine chunk sizes"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after 1 warm-up round")
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT})")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--no-check", action="store_true", help="skip the engine-vs-loop check")
    p.add_argument("--quick", action="store_true", help="smoke test: mlp, C=16, 2 rounds")
    p.add_argument("--diagnose", action="store_true", help="time the pieces of a client update")
    p.add_argument("--diagnose-reps", type=int, default=20, help="timings per piece (--diagnose)")
    # Internal modes, run in subprocesses.
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        (chunk,) = args.chunk_size
        row = run_one(
            args.models[0], args.cohorts[0], args.methods[0], chunk, args.rounds, args.matmul_reps
        )
        print(json.dumps(row))
        return 0
    if args.check_one:
        print(json.dumps(check_engine_vs_loop(args.models[0], args.cohorts[0], args.chunk_size[0])))
        return 0
    if args.diagnose:
        results = [diagnose(m, args.diagnose_reps) for m in args.models]
        lines = ["| model | piece | ms per client |", "|---|---|---|"]
        for res in results:
            for name, ms in res["ms_per_client"].items():
                lines.append(f"| {res['model']} | {name} | {ms:.2f} |")
        print("\n".join(lines))
        out = args.out or ROOT / DEFAULT_DIAGNOSE_OUT
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "diagnose": results}, indent=2) + "\n")
        return 0

    if args.quick:
        args.models, args.cohorts, args.rounds = ["mlp"], [16], 2
        args.methods = [m for m in args.methods if m != "opacus"] or ["engine", "loop"]
        args.chunk_size, args.matmul_reps = [16], 3
    out = args.out or ROOT / DEFAULT_OUT
    t_start = time.perf_counter()
    rows, checks = [], []
    have_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "opacus"))
    configs = list(grid(args.models, args.cohorts, args.methods, args.chunk_size))
    for i, (model_name, cohort, method, chunk) in enumerate(configs, 1):
        label = f"[{i}/{len(configs)}] {model_name} C={cohort} {method}" + (
            f" chunk={chunk}" if chunk else ""
        )
        base = {"model": model_name, "cohort": cohort, "method": method, "chunk_size": chunk}
        if method == "opacus" and not have_torch:
            print(f"{label}: skipped (torch/opacus not installed)", flush=True)
            rows.append({**base, "skipped": "skipped (torch/opacus not installed)"})
            continue
        t0 = time.perf_counter()
        row, err = _subprocess(
            [
                "--one",
                f"--models={model_name}",
                f"--cohorts={cohort}",
                f"--methods={method}",
                f"--chunk-size={chunk or 0}",
                f"--rounds={args.rounds}",
                f"--matmul-reps={args.matmul_reps}",
            ],
            args.timeout,
        )
        if row is None:
            _log(f"{label}: FAILED ({err.splitlines()[0] if err else ''})")
            rows.append({**base, "error": err})
            continue
        rows.append(row)
        _log(
            f"{label}: {row['updates_per_s']:.1f} updates/s, compile {row['compile_s'] or 0:.1f} s,"
            f" peak RSS {row['peak_rss_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s)"
        )
    if not args.no_check:
        for model_name in args.models:
            cohort, chunk = 16, 8  # two chunks, so the scan over chunks is exercised
            res, err = _subprocess(
                ["--check-one", f"--models={model_name}", f"--cohorts={cohort}", "--chunk-size=8"],
                args.timeout,
            )
            res = res or {"model": model_name, "cohort": cohort, "chunk_size": chunk, "error": err}
            checks.append(res)
            _log(f"check {model_name}: {res}")

    diffs = [c["max_abs_diff_engine_vs_loop"] for c in checks if "max_abs_diff_engine_vs_loop" in c]
    peaks = [r["matmul_gflops"] for r in rows if "matmul_gflops" in r]
    result = {
        "benchmark": "R1",
        "command": "python -m benchmarks.r1 " + " ".join(sys.argv[1:] if argv is None else argv),
        "workload": {
            "data": (
                "fedjax_dp.data.synthetic_classification(num_clients=max(1024, C), "
                f"examples_per_client={EXAMPLES_PER_CLIENT}, feature_shape={FEATURE_SHAPE}, "
                f"num_classes={NUM_CLASSES}, seed={DATA_SEED})"
            ),
            "algorithm": repr(_config(0, None)).replace("cohort_size=0", "cohort_size=C"),
            "models": {m: MODEL_KWARGS[m] for m in args.models},
            "flops_per_example_step": {m: train_flops_per_example(m) for m in args.models},
            "layer_macs": {m: layer_macs(m) for m in args.models},
            "rounds_timed": args.rounds,
        },
        "machine": {
            **machine(),
            "matmul_gflops_median": statistics.median(peaks) if peaks else None,
            "matmul_n": MATMUL_N,
        },
        "rows": rows,
        "checks": checks,
        "max_abs_diff_engine_vs_loop": max(diffs) if diffs else None,
        "wall_s": time.perf_counter() - t_start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    if diffs:
        print(f"\nmax |engine - loop| after one round (params): {max(diffs):.3g}")
    print(f"\nwrote {out}")
    return 0 if all("error" not in r for r in rows + checks) else 1


if __name__ == "__main__":
    sys.exit(main())
