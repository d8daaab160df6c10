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
- ``loop``: the FedJAX-style baseline, written as a user would: R1's model with stock Flax
  layers (``nn.Dense``; ``nn.Conv`` and ``nn.max_pool`` for the cnn: :func:`stock_model`), a
  per-client update jitted once for ONE client and called in a Python loop over the sampled
  clients, per-example gradients the straightforward way (``vmap(grad)`` over the batch, then
  clip, sum, noise: ``clipping="per_example"``, the engine's reference path). The deltas are summed on device (the running sum is fused into the
  per-client jitted call, so there is one dispatch per client: the cheapest form of this
  baseline), then a jitted server step.
- ``loop_fast``: the same loop around the engine's own client update and model (ghost
  clipping; ``PatchConv`` and ``max_pool_2d`` for the cnn). ``engine / loop_fast`` isolates what running the cohort
  as one chunked ``vmap`` adds on top of the faster client update.
- ``opacus``: torch + Opacus (``pip install -e .[bench]``), one client at a time: the model made
  private once with ``PrivacyEngine.make_private(poisson_sampling=False, max_grad_norm=1.0,
  noise_multiplier=1.0)`` around SGD(lr 0.1); per client, the global parameters are copied in
  and its 4 fixed batches of 8 are stepped through Opacus' per-sample gradients and DPOptimizer;
  the deltas are averaged at the server. torch uses all cores (``torch.set_num_threads(
  os.cpu_count())``) unless ``--torch-threads`` says otherwise. Checked against the engine by
  ``--check-opacus`` (run with the grid): same params and batches, noise off, one round.

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
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "results" / "r1.json"
DEFAULT_DIAGNOSE_OUT = Path("benchmarks") / "results" / "r1_diagnose.json"

# ---------------------------------------------------------------------------- the workload

FEATURE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
EXAMPLES_PER_CLIENT = 32
POPULATION = 1024
_POPULATION_OVERRIDE = 0  # --population: the same data for every C (memory comparisons)
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
FULL_CHUNKS = (0,)  # 0: the engine chooses (memory budget)
METHODS = ("engine", "loop", "loop_fast", "opacus")
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


def _config(cohort: int, chunk_size: int | None, clipping: str = "auto"):
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
        clipping=clipping,
    )


def population(cohort: int) -> int:
    """R1's population for cohort C: 1024 clients, or C if larger, or ``--population``."""
    return max(_POPULATION_OVERRIDE or POPULATION, cohort)


def host_data(cohort: int):
    """The R1 population for cohort size C, as host (numpy) arrays."""
    import fedjax_dp

    return fedjax_dp.data.synthetic_classification(
        num_clients=population(cohort),
        examples_per_client=EXAMPLES_PER_CLIENT,
        feature_shape=FEATURE_SHAPE,
        num_classes=NUM_CLASSES,
        seed=DATA_SEED,
    )


def stock_model(model_name: str):
    """R1's model written with stock Flax layers, as a user would write it.

    For ``cnn``: ``nn.Conv`` and ``nn.max_pool`` instead of the engine's ``PatchConv`` and
    ``max_pool_2d`` (same parameters, same function; the layer names match so that the two
    share parameters). ``mlp`` is the engine's own (stock ``nn.Dense`` layers).
    """
    import flax.linen as nn

    import fedjax_dp

    if model_name == "mlp":
        return fedjax_dp.get_model("mlp", FEATURE_SHAPE, NUM_CLASSES, **MODEL_KWARGS["mlp"])

    class StockCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, c in enumerate(CNN_CHANNELS):
                x = nn.Conv(c, (3, 3), padding="SAME", name=f"PatchConv_{i}")(x)
                x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
            x = x.reshape((x.shape[0], -1))
            return nn.Dense(NUM_CLASSES, name="Dense_0")(x)

    return fedjax_dp.models.from_flax(StockCNN(), FEATURE_SHAPE, NUM_CLASSES)


def _setup(model_name: str, cohort: int, chunk_size: int | None, reference: bool = False):
    """Host data, device data, model, simulation and hparams of one R1 configuration.

    ``chunk_size`` None: chosen by the engine from its memory budget. ``reference``: the
    straightforward implementation (stock Flax layers, per-example clipping by ``vmap(grad)``)
    instead of the engine's (ghost clipping, patch convolutions).
    """
    import fedjax_dp

    data = host_data(cohort)
    if reference:
        model, clipping = stock_model(model_name), "per_example"
    else:
        kwargs = MODEL_KWARGS[model_name]
        model = fedjax_dp.get_model(model_name, FEATURE_SHAPE, NUM_CLASSES, **kwargs)
        clipping = "auto"
    sim = fedjax_dp.build_simulation(_config(cohort, chunk_size, clipping), model, data)
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

    update = sim.client.simple

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
        "chunk_size_effective": min(sim.config.chunk_size, sim.config.cohort_size),
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


# ---------------------------------------------------------------------------- the Opacus baseline
#
# torch + Opacus, one client at a time, as an Opacus user would simulate R1: the model is made
# private ONCE with ``PrivacyEngine.make_private(..., poisson_sampling=False)`` (a
# GradSampleModule for per-sample gradients and a DPOptimizer around SGD(lr 0.1) that clips each
# per-sample gradient to ``max_grad_norm`` 1.0, adds N(0, (1.0 * 1.0)^2) noise to the clipped sum
# and divides by the batch size 8). Each client then resets the parameters to the global model
# and takes its 4 fixed batches of 8 (a uniform permutation of its 32 examples, as the engine
# does; no Poisson sampling), and the deltas are averaged at the server (SGD lr 1.0).

OPACUS_WARNINGS = (
    # Hooks on the first layer fire although the input needs no gradient: expected, harmless.
    "Full backward hook is firing when gradients are computed with respect to module outputs",
    # We seed the noise generator for reproducibility; this is a benchmark, not a release.
    "Secure RNG turned off",
)


def _torch_model(model_name: str):
    """R1-mlp / R1-cnn in torch (NCHW); the same layers as ``fedjax_dp.get_model``."""
    import torch

    nn = torch.nn
    if model_name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(FEATURE_SHAPE), MLP_HIDDEN[0]),
            nn.ReLU(),
            nn.Linear(MLP_HIDDEN[0], NUM_CLASSES),
        )
    if model_name != "cnn":
        raise ValueError(f"unknown model {model_name!r}; choose mlp or cnn")
    c1, c2 = CNN_CHANNELS
    h, w = -(-FEATURE_SHAPE[0] // 4), -(-FEATURE_SHAPE[1] // 4)  # two 2x2 pools (even sizes)
    return nn.Sequential(
        nn.Conv2d(FEATURE_SHAPE[2], c1, 3, padding=1),  # 3x3 SAME
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(h * w * c2, NUM_CLASSES),
    )


def flax_layer_names(params) -> list[str]:
    """Names of the weight layers of R1 flax params, in forward order.

    Convolutions (4-d kernels) first, then dense layers, each by the index flax appends to the
    module name (``Conv_0``, ``PatchConv_1``, ``Dense_0``, ...); dict order is not used, as
    ``jax.tree`` operations sort the keys.
    """
    import numpy as np

    def key(name):
        return (np.ndim(params[name]["kernel"]) != 4, int(name.rsplit("_", 1)[1]))

    return sorted(params, key=key)


def flax_to_torch(model_name: str, params) -> list:
    """Flax params of R1-mlp/cnn as float32 numpy arrays in the torch model's parameter order.

    Dense kernels ``[in, out]`` become ``weight[out, in]``; conv kernels HWIO become OIHW. The
    cnn's last dense layer also permutes its inputs: flax flattens ``(h, w, c)``, torch
    ``(c, h, w)``.
    """
    import numpy as np

    out = []
    for name in flax_layer_names(params):
        k, b = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
        if k.ndim == 4:
            k = k.transpose(3, 2, 0, 1)
        elif model_name == "cnn":  # the dense layer after the convs
            c = CNN_CHANNELS[-1]
            hw = k.shape[0] // c
            h = math.isqrt(hw)
            k = k.reshape(h, hw // h, c, -1).transpose(3, 2, 0, 1).reshape(k.shape[1], -1)
        else:
            k = k.T
        out += [np.ascontiguousarray(k, np.float32), np.asarray(b, np.float32)]
    return out


def torch_to_flax(model_name: str, arrays, like) -> dict:
    """Inverse of :func:`flax_to_torch`: numpy arrays in, flax params with the layer names of
    ``like`` (flax params of the same model) out."""
    import numpy as np

    params = {}
    for i, name in enumerate(flax_layer_names(like)):
        w, b = (np.asarray(a) for a in arrays[2 * i : 2 * i + 2])
        if w.ndim == 4:
            k = w.transpose(2, 3, 1, 0)
        elif model_name == "cnn":
            c = CNN_CHANNELS[-1]
            hw = w.shape[1] // c
            h = math.isqrt(hw)
            k = w.reshape(-1, c, h, hw // h).transpose(2, 3, 1, 0).reshape(hw * c, -1)
        else:
            k = w.T
        params[name] = {"kernel": k, "bias": b}
    return params


class OpacusRound:
    """One R1 round with Opacus, one client at a time (see the comment above).

    Args:
      model_name: ``mlp`` or ``cnn``.
      data: the host :class:`fedjax_dp.FederatedData`.
      noise_multiplier: Opacus' ``noise_multiplier`` (R1: 1.0; 0.0 in the equality check).
      seed: seeds torch's initialisation and the noise generator.
    """

    def __init__(self, model_name: str, data, noise_multiplier: float, seed: int = 0):
        import numpy as np
        import opacus
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        for msg in OPACUS_WARNINGS:
            warnings.filterwarnings("ignore", message=msg)
        torch.manual_seed(seed)
        model = _torch_model(model_name)
        optimizer = torch.optim.SGD(model.parameters(), lr=CLIENT_LR)
        # make_private needs a DataLoader; one client's worth of rows in batches of B, so that
        # Opacus derives expected_batch_size = B (32 rows / 4 batches). We feed each client's
        # batches ourselves, as this loader would (poisson_sampling=False leaves it as is).
        shape_loader = DataLoader(
            TensorDataset(torch.zeros(EXAMPLES_PER_CLIENT, 1)), batch_size=BATCH_SIZE
        )
        self.privacy_engine = opacus.PrivacyEngine(accountant="rdp")
        self.module, self.optimizer, _ = self.privacy_engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=shape_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=EXAMPLE_CLIP_NORM,
            poisson_sampling=False,
            loss_reduction="mean",
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
        if self.optimizer.expected_batch_size != BATCH_SIZE:
            raise AssertionError(f"Opacus batch size {self.optimizer.expected_batch_size}")
        self.loss_fn = torch.nn.CrossEntropyLoss()  # mean over the batch
        self.params = list(self.module.parameters())
        self.global_params = [p.detach().clone() for p in self.params]
        # NHWC -> NCHW in a fresh C-order array. Not np.ascontiguousarray: with one channel the
        # moved view already counts as contiguous and keeps the strides (784, 1, 28, 1), which
        # torch reads as channels_last; the convolutions then return channels_last tensors, and
        # Opacus' unfold2d (as_strided, assuming NCHW strides) gets the second conv's per-sample
        # gradients wrong (all zero here), silently.
        x = np.array(np.moveaxis(np.asarray(data.x), -1, 1), np.float32, order="C", copy=True)
        self.x = torch.from_numpy(x)
        if self.x.stride() != torch.empty(self.x.shape).stride():
            raise AssertionError(f"x strides {self.x.stride()} are not NCHW-contiguous")
        self.y = torch.from_numpy(np.asarray(data.y).astype(np.int64))
        self.offsets, self.counts = np.asarray(data.offsets), np.asarray(data.counts)
        self.num_clients = data.num_clients

    def set_params(self, arrays) -> None:
        import numpy as np
        import torch

        with torch.no_grad():
            for g, a in zip(self.global_params, arrays, strict=True):
                g.copy_(torch.from_numpy(np.array(a, np.float32)))

    def get_params(self) -> list:
        return [g.numpy().copy() for g in self.global_params]

    def schedule(self, rng, cohort: int) -> list:
        """Fixed-size sampling without replacement, then a uniform permutation per client."""
        ids = rng.choice(self.num_clients, cohort, replace=False)
        return [self.offsets[c] + rng.permutation(self.counts[c]) for c in ids]

    def __call__(self, client_rows: list) -> float:
        """One round; ``client_rows[k]``: the example rows of client k in the order used."""
        import torch

        total = [torch.zeros_like(g) for g in self.global_params]
        loss_sum, seen = torch.zeros(()), 0
        for rows in client_rows:
            with torch.no_grad():
                for p, g in zip(self.params, self.global_params):
                    p.copy_(g)
            for start in range(0, len(rows), BATCH_SIZE):
                batch = torch.from_numpy(rows[start : start + BATCH_SIZE])
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.module(self.x[batch]), self.y[batch])
                loss.backward()
                self.optimizer.step()  # clip per sample, sum, noise, / B, SGD step
                loss_sum += loss.detach() * len(batch)
                seen += len(batch)
            with torch.no_grad():
                for t, p, g in zip(total, self.params, self.global_params):
                    t.add_(p - g)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for g, t in zip(self.global_params, total):
                g.add_(t / len(client_rows), alpha=SERVER_LR)
        return float(loss_sum) / max(seen, 1)


def _time_opacus(model_name: str, setup, rounds: int, torch_threads: int | None = None) -> dict:
    import numpy as np
    import opacus
    import torch

    data, cohort = setup
    threads = torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rnd = OpacusRound(model_name, data, EXAMPLE_NOISE_MULTIPLIER, seed=INIT_SEED)
    rng = np.random.default_rng(ROUND_SEED)
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        loss = rnd(rnd.schedule(rng, cohort))
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": None,
        "first_round_s": times[0],
        "round_times_s": times[1:],
        "train_loss": loss,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
    }


def engine_client_rows(sim, data, key) -> list:
    """The example rows, in order, that each client of the engine's round ``key`` trains on.

    Same key derivation as the engine (and :func:`make_loop_round`); the order within a client
    comes from the client update's own schedule (``fedjax_dp.core.client._schedule``).
    """
    import jax
    import numpy as np

    from fedjax_dp.core.client import _schedule

    ids, _, _ = sim.sampler.sample(jax.random.fold_in(key, KEY_SAMPLE))
    clients_key = jax.random.fold_in(key, KEY_CLIENTS)
    offsets, counts = np.asarray(data.offsets), np.asarray(data.counts)
    out = []
    for cid in np.asarray(ids):
        ckey = jax.random.fold_in(jax.random.fold_in(clients_key, cid), KEY_CLIENT_UPDATE)
        order_key, _ = jax.random.split(ckey)
        idx, valid = _schedule(
            order_key,
            counts[cid],
            max_count=data.max_count,
            num_steps=sim.client.num_steps,
            batch_size=BATCH_SIZE,
            num_perms=LOCAL_EPOCHS,
            epoch_mode=True,
        )
        idx, valid = np.asarray(idx).reshape(-1), np.asarray(valid).reshape(-1)
        out.append(offsets[cid] + idx[valid].astype(np.int64))
    return out


def check_engine_vs_opacus(model_name: str, cohort: int) -> dict:
    """Does the Opacus round compute the engine's round? Same params, clients and batches.

    1. Noise off (noise multiplier 0 on both sides): the two rounds must agree to float
       rounding, which checks the model, the per-example clipping, the /B, the learning rates,
       the batches and the server mean.
    2. Noise on (1.0): the noise streams differ, so compare its scale: the std over all
       parameters of (noisy round - noise-free round) of each side.
    """
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    data, dev, _, sim, _ = _setup(model_name, cohort, cohort)
    key = _round_keys(1)[0]
    rows = engine_client_rows(sim, data, key)

    def engine(sigma):
        state = sim.init(jax.random.key(INIT_SEED))
        params0 = jax.tree.map(np.asarray, state.params)
        hp = sim.make_hparams(example_noise_multiplier=sigma)
        new, metrics = sim.round_fn(state, dev, hp, key)
        return params0, jax.tree.map(np.asarray, new.params), float(metrics["train_loss"])

    def opacus_round(params0, sigma):
        rnd = OpacusRound(model_name, data, sigma, seed=INIT_SEED)
        rnd.set_params(flax_to_torch(model_name, params0))
        loss = rnd(rows)
        return torch_to_flax(model_name, rnd.get_params(), params0), loss

    def flat(tree):
        return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])

    params0, eng0, eng_loss = engine(0.0)
    _, eng1, _ = engine(EXAMPLE_NOISE_MULTIPLIER)
    # The converters must round-trip exactly, or the comparison below would be meaningless.
    roundtrip = flat(torch_to_flax(model_name, flax_to_torch(model_name, params0), params0))
    if not np.array_equal(roundtrip, flat(params0)):
        raise AssertionError("flax_to_torch / torch_to_flax do not round-trip")
    opa0, opa_loss = opacus_round(params0, 0.0)
    opa1, _ = opacus_round(params0, EXAMPLE_NOISE_MULTIPLIER)
    std_eng = float(np.std(flat(eng1) - flat(eng0)))
    std_opa = float(np.std(flat(opa1) - flat(opa0)))
    return {
        "model": model_name,
        "cohort": cohort,
        "max_abs_diff_engine_vs_opacus_no_noise": float(np.max(np.abs(flat(eng0) - flat(opa0)))),
        "max_abs_param_change": float(np.max(np.abs(flat(eng0) - flat(params0)))),
        "train_loss_engine": eng_loss,
        "train_loss_opacus": opa_loss,
        "noise_std_engine": std_eng,
        "noise_std_opacus": std_opa,
        "noise_std_ratio_opacus_over_engine": std_opa / std_eng,
        # One step adds N(0, (sigma C)^2) / B * lr to each parameter; 4 steps per client, then
        # the mean over the cohort: about lr sigma C / B * sqrt(S / cohort) (before clipping
        # and the nonlinearity mix it further).
        "noise_std_expected_approx": CLIENT_LR
        * EXAMPLE_NOISE_MULTIPLIER
        * EXAMPLE_CLIP_NORM
        / BATCH_SIZE
        * math.sqrt(sim.client.num_steps / cohort),
    }


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


def run_one(
    model_name: str,
    cohort: int,
    method: str,
    chunk_size,
    rounds,
    matmul_reps,
    torch_threads: int | None = None,
) -> dict:
    """Times one (model, cohort, method[, chunk]) configuration in this process.

    ``chunk_size`` None or 0: the engine's automatic chunk (from its memory budget). The opacus method
    builds only the host data (no device copy, no simulation), so its peak RSS is torch's.
    """
    import jax

    load_start = os.getloadavg()[0]
    if method == "opacus":
        setup = (host_data(cohort), cohort)
        result_fn = functools.partial(_time_opacus, torch_threads=torch_threads)
    else:
        setup = _setup(model_name, cohort, chunk_size or None, reference=method == "loop")
        result_fn = {"engine": _time_engine, "loop": _time_loop, "loop_fast": _time_loop}[method]
    rss_setup = _maxrss_mib()
    result = result_fn(model_name, setup, rounds)
    rss_peak = _maxrss_mib()
    peak = matmul_gflops(matmul_reps)
    median = statistics.median(result["round_times_s"])
    gflops = flops_per_round(model_name, cohort) / median / 1e9
    row = {
        "model": model_name,
        "cohort": cohort,
        "population": population(cohort),
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
    """One round of the engine and of the loop from the same params and key; max |diff|.

    The engine runs its fast path (ghost clipping, patch convolutions); the loop runs the
    reference (stock Flax layers, per-example clipping), so the check covers the batching, the
    clipping and the layers.
    """
    import jax
    import numpy as np

    _, dev, _, sim, hp = _setup(model_name, cohort, chunk_size)
    _, _, _, ref_sim, _ = _setup(model_name, cohort, chunk_size, reference=True)
    state = sim.init(jax.random.key(INIT_SEED))
    params0 = _copy_tree(state.params)  # round_fn donates the state
    key = _round_keys(1)[0]
    loop_round, _ = make_loop_round(ref_sim, cohort)
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
    the others are one jitted call for the whole client. The pieces are timed round-robin,
    ``reps`` times each, so that they share the same background load; the median is reported.
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

    from fedjax_dp.mechanisms import clipping

    valid = jnp.ones((BATCH_SIZE,), bool)

    def clipped_sum(method):
        """The clipped sum of one batch's per-example gradients (the DP-SGD core)."""

        def fn(p, xb, yb):
            return clipping.clipped_grad_sum(
                loss_fn, p, xb, yb, valid, EXAMPLE_CLIP_NORM, method=method
            ).summed

        return fn

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

    def dp_step(p, xb, yb):  # DP-SGD step without the noise (ghost clipping)
        g = clipped_sum("auto")(p, xb, yb)
        return jax.tree.map(lambda a, b: a - CLIENT_LR * b / BATCH_SIZE, p, g)

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
    vmapped = jax.vmap(sim.client.simple, in_axes=(None, None, 0, 0, None))
    b = f"B={BATCH_SIZE}"
    pieces = {  # name -> (function, args, clients per call; 1/S: one step of S)
        "client update, DP-SGD (1 client)": (sim.client.simple, (params, dev, cid, key, hp), 1),
        "client update, DP-SGD (vmap over 16 clients)": (
            vmapped,
            (params, dev, clients, ckeys, hp),
            16,
        ),
        "client update, no DP (1 client)": (nodp.update, (params, dev, cid, key, hp), 1),
        f"{steps} x clipped sum, per-example reference ({b})": (
            clipped_sum("per_example"),
            (params, x[0], y[0]),
            1 / steps,
        ),
        f"{steps} x clipped sum, ghost ({b})": (
            clipped_sum("ghost"),
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


def one_args(model_name, cohort, method, chunk, rounds, matmul_reps) -> list[str]:
    """Command-line arguments of ``python -m benchmarks.r1 --one`` for one configuration."""
    return [
        f"--population={_POPULATION_OVERRIDE}",
        "--one",
        f"--models={model_name}",
        f"--cohorts={cohort}",
        f"--methods={method}",
        f"--chunk-size={chunk or 0}",
        f"--rounds={rounds}",
        f"--matmul-reps={matmul_reps}",
    ]


def run_subprocess(args: list[str], timeout: float) -> tuple[dict | None, str]:
    """``python -m benchmarks.r1 ARGS`` in a fresh process; its last JSON line, or (None, why).

    Runs from the repository root, so that ``benchmarks`` is this package (the opacus wheel
    installs an unrelated top-level ``benchmarks`` package into site-packages).
    """
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
    """Markdown table of the rows; the engine's ratios to each baseline of the same (model, C)."""
    base = {
        (r["model"], r["cohort"], r["method"]): r["updates_per_s"]
        for r in rows
        if r.get("method") != "engine" and "updates_per_s" in r
    }
    baselines = [m for m in METHODS if m != "engine"]
    head = (
        "| model | C | method | chunk | updates/s | median round s | first round s | compile s "
        "| peak RSS MiB | GFLOP/s | matmul GFLOP/s | % of matmul | "
        + " | ".join(f"x {m}" for m in baselines)
        + " |"
    )
    out = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        if "updates_per_s" not in r:
            why = r.get("skipped") or r.get("error", "failed")
            out.append(
                f"| {r['model']} | {r['cohort']} | {r['method']} | {_fmt(r.get('chunk_size'))} "
                f"| {why.splitlines()[0][:80]} |" + " |" * (7 + len(baselines))
            )
            continue
        ratios = []
        for m in baselines:
            b = base.get((r["model"], r["cohort"], m))
            ok = r["method"] == "engine" and b
            ratios.append(f"{r['updates_per_s'] / b:.2f}" if ok else "-")
        cells = [
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
            *ratios,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _torch_versions() -> dict | None:
    try:
        return {m: importlib.metadata.version(m) for m in ("torch", "opacus")}
    except importlib.metadata.PackageNotFoundError:
        return None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.r1", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    p.add_argument("--cohorts", nargs="+", type=int, default=list(FULL_COHORTS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--chunk-size",
        nargs="+",
        type=int,
        default=list(FULL_CHUNKS),
        help="engine chunk sizes (0: automatic, from the engine's memory budget)",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after 1 warm-up round")
    p.add_argument(
        "--population",
        type=int,
        default=0,
        help="clients in the population (default max(1024, C)); fix it to compare memory across C",
    )
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT})")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--no-check", action="store_true", help="skip the engine-vs-loop check")
    p.add_argument("--quick", action="store_true", help="smoke test: mlp, C=16, 2 rounds")
    p.add_argument("--diagnose", action="store_true", help="time the pieces of a client update")
    p.add_argument("--diagnose-reps", type=int, default=20, help="timings per piece (--diagnose)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the opacus method (default: os.cpu_count(), all cores)",
    )
    # Internal modes, run in subprocesses.
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-opacus", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global _POPULATION_OVERRIDE
    _POPULATION_OVERRIDE = args.population

    if args.one:
        (chunk,) = args.chunk_size
        row = run_one(
            args.models[0],
            args.cohorts[0],
            args.methods[0],
            chunk,
            args.rounds,
            args.matmul_reps,
            args.torch_threads,
        )
        print(json.dumps(row))
        return 0
    if args.check_opacus:
        print(json.dumps(check_engine_vs_opacus(args.models[0], args.cohorts[0])))
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
            f" chunk={chunk or 'auto'}" if method == "engine" else ""
        )
        base = {"model": model_name, "cohort": cohort, "method": method, "chunk_size": chunk}
        if method == "opacus" and not have_torch:
            print(f"{label}: skipped (torch/opacus not installed)", flush=True)
            rows.append({**base, "skipped": "skipped (torch/opacus not installed)"})
            continue
        t0 = time.perf_counter()
        row, err = run_subprocess(
            one_args(model_name, cohort, method, chunk, args.rounds, args.matmul_reps)
            + ([f"--torch-threads={args.torch_threads}"] if args.torch_threads else []),
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
            res, err = run_subprocess(
                ["--check-one", f"--models={model_name}", f"--cohorts={cohort}", "--chunk-size=8"],
                args.timeout,
            )
            res = res or {"model": model_name, "cohort": cohort, "chunk_size": chunk, "error": err}
            checks.append(res)
            _log(f"check {model_name}: {res}")
        if "opacus" in args.methods and have_torch:
            for model_name in args.models:
                cohort = 8
                res, err = run_subprocess(
                    ["--check-opacus", f"--models={model_name}", f"--cohorts={cohort}"],
                    args.timeout,
                )
                res = res or {"model": model_name, "cohort": cohort, "error": err}
                checks.append(res)
                _log(f"check opacus {model_name}: {res}")

    diffs = [c["max_abs_diff_engine_vs_loop"] for c in checks if "max_abs_diff_engine_vs_loop" in c]
    peaks = [r["matmul_gflops"] for r in rows if "matmul_gflops" in r]
    result = {
        "benchmark": "R1",
        "command": "python -m benchmarks.r1 " + " ".join(sys.argv[1:] if argv is None else argv),
        "workload": {
            "data": (
                f"fedjax_dp.data.synthetic_classification(num_clients=max({args.population or POPULATION}, C), "
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
        "torch_versions": _torch_versions() if "opacus" in args.methods else None,
        "wall_s": time.perf_counter() - t_start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    if diffs:
        print(f"\nmax |engine - loop| after one round (params): {max(diffs):.3g}")
    for c in checks:
        if "max_abs_diff_engine_vs_opacus_no_noise" in c:
            print(
                f"opacus check {c['model']} (C={c['cohort']}, same params and batches): "
                "max |engine - opacus| without noise "
                f"{c['max_abs_diff_engine_vs_opacus_no_noise']:.3g}"
                f" (largest param change {c['max_abs_param_change']:.3g}); noise std "
                f"opacus/engine {c['noise_std_ratio_opacus_over_engine']:.3f}"
            )
    print(f"\nwrote {out}")
    return 0 if all("error" not in r for r in rows + checks) else 1


if __name__ == "__main__":
    sys.exit(main())
