"""Two CPU processes joined by ``jax.distributed`` (gloo) equal the single-device round.

Each worker process (:mod:`tests.multihost._worker`) has 2 CPU devices, so the global mesh
has 4 devices over 2 processes; the cohort is split over all of them and reduced across
processes. The params after 2 rounds of DP-SGD-FedAvg and DP-FedAvg must equal those of the
same simulation in one process on one device (no mesh), up to float summation order, and
be identical on both processes.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fedjax_dp
from tests import _testing
from tests.multihost import _worker

NUM_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 240
_REPO = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(port: int) -> dict[str, str]:
    # Proxy variables can make the gRPC coordinator connection hang (JAX warns about it).
    env = {k: v for k, v in os.environ.items() if "_proxy" not in k.lower()}
    env.update(
        JAX_PLATFORMS="cpu",
        # Unoptimised LLVM code generation compiles the rounds faster; HLO passes, sharding
        # and collectives are unchanged.
        XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
            "--xla_backend_optimization_level=0"
        ),
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")])),
    )
    return env


def _log_tail(path: pathlib.Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no output>"
    return text[-chars:]


class ReplicateTest(parameterized.TestCase):
    """The helpers in one process (whatever its device count)."""

    def test_replicate_pytrees(self):
        mesh = fedjax_dp.distributed.client_mesh()
        self.assertEqual(mesh.axis_names, ("clients",))
        self.assertEqual(mesh.size, jax.device_count())
        data = _testing.small_data()
        tree = {"data": data, "key": jax.random.key(3), "lr": jnp_scalar(0.5), "n": 2}
        rep = fedjax_dp.distributed.replicate(tree, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.assertEqual(rep["n"], 2)
        self.assertEqual(rep["data"].max_count, data.max_count)
        self.assertEqual(rep["data"].num_classes, data.num_classes)
        for leaf in jax.tree.leaves(rep):
            if isinstance(leaf, jax.Array):
                self.assertTrue(leaf.is_fully_replicated)
                self.assertTrue(leaf.sharding.is_equivalent_to(replicated, leaf.ndim))
        np.testing.assert_array_equal(
            jax.random.key_data(rep["key"]), jax.random.key_data(jax.random.key(3))
        )
        host = fedjax_dp.distributed.to_host(rep)
        np.testing.assert_array_equal(host["data"].x, data.x)
        self.assertEqual(float(host["lr"]), 0.5)
        self.assertIsInstance(host["lr"], np.ndarray)
        np.testing.assert_array_equal(
            jax.random.key_data(host["key"]), jax.random.key_data(jax.random.key(3))
        )
        again = fedjax_dp.distributed.replicate(rep, mesh)
        self.assertIs(again["data"].x, rep["data"].x)
        self.assertTrue(fedjax_dp.distributed.is_main_process())


def jnp_scalar(v):
    return jax.numpy.asarray(v, jax.numpy.float32)


class MultiHostTest(parameterized.TestCase):
    def test_two_processes_equal_single_device(self):
        out = pathlib.Path(tempfile.mkdtemp(prefix="fedjax_dp_multihost_"))
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        port = _free_port()
        env = _worker_env(port)
        procs, logs = [], []
        for pid in range(NUM_PROCESSES):
            logs.append(out / f"worker_{pid}.log")
            with open(logs[-1], "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.multihost._worker", str(out)]
                        + [f"127.0.0.1:{port}", str(NUM_PROCESSES), str(pid)],
                        cwd=_REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            # The reference compiles while the workers run.
            reference = _worker.simulate(mesh=None)
            initial = _worker.simulate(mesh=None, rounds=0)
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                    break  # all done, or one failed: the other would wait on it forever
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        codes = [p.returncode for p in procs]
        if codes != [0] * NUM_PROCESSES:
            report = "\n".join(
                f"--- worker {i} (exit code {c}) ---\n{_log_tail(log)}"
                for i, (c, log) in enumerate(zip(codes, logs))
            )
            self.fail(f"workers failed or timed out after {TIMEOUT_S} s:\n{report}")

        results = [dict(np.load(out / f"params_{pid}.npz")) for pid in range(NUM_PROCESSES)]
        self.assertEqual(set(results[0]), set(reference))
        for key, ref in reference.items():
            with self.subTest(key):
                self.assertFalse(np.array_equal(ref, initial[key]), "params did not move")
                np.testing.assert_allclose(results[0][key], ref, rtol=1e-5, atol=1e-6)
                for other in results[1:]:
                    np.testing.assert_array_equal(other[key], results[0][key])


if __name__ == "__main__":
    absltest.main()
