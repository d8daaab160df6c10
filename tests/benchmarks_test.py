"""Smoke tests of the benchmarks: `python -m benchmarks.r1 --quick`, `python -m
benchmarks.scaling --quick`, `python -m benchmarks.sweep --quick`, and the Opacus baseline
against the engine (if torch and opacus, the `bench` extra, are installed)."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import pytest
from absl.testing import absltest

from benchmarks import r1, scaling

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAVE_OPACUS = all(importlib.util.find_spec(m) is not None for m in ("torch", "opacus"))


def _tmpdir(test) -> str:
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _run_module(args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class FlopCountTest(absltest.TestCase):
    def test_analytic_flops_per_example_step(self):
        # mlp: 2 * (fwd 203264 + weight grad 203264 + input grad of layer 2: 2560).
        self.assertEqual(r1.train_flops_per_example("mlp"), 818176)
        # cnn: 2 * (fwd 1031744 + weight grad 1031744 + input grads of layers 2-3: 918848).
        self.assertEqual(r1.layer_macs("cnn"), [112896, 903168, 15680])
        self.assertEqual(r1.train_flops_per_example("cnn"), 5964672)


class QuickRunTest(absltest.TestCase):
    @pytest.mark.slow  # a benchmark smoke run of minutes: `make test-slow`
    def test_quick_run_writes_rows_and_engine_equals_loop(self):
        out_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, out_dir, ignore_errors=True)
        out = os.path.join(out_dir, "r1.json")
        proc = _run_module(["benchmarks.r1", "--quick", "--out", out])
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("| model | C | method |", proc.stdout)
        with open(out) as f:
            result = json.load(f)
        self.assertEqual(result["machine"]["cpu_count"], os.cpu_count())
        self.assertIn("jax", result["machine"])
        rows = {row["method"]: row for row in result["rows"]}
        self.assertEqual(set(rows), {"engine", "loop", "loop_fast"})
        for row in rows.values():
            self.assertEqual(row["model"], "mlp")
            self.assertEqual(row["cohort"], 16)
            self.assertGreater(row["updates_per_s"], 0)
            self.assertGreater(row["gflops"], 0)
            self.assertGreater(row["peak_rss_mib"], 0)
            self.assertGreaterEqual(row["rounds_timed"], 2)
        self.assertEqual(rows["engine"]["flops_per_example_step"], 818176)
        # Same round, same key: the engine and the loop compute the same model.
        self.assertLess(result["max_abs_diff_engine_vs_loop"], 1e-4)
        (check,) = result["checks"]
        self.assertGreater(check["max_abs_param_change"], 1e-3)  # the round did move params


class ScalingTest(absltest.TestCase):
    def test_scaling_ratio_and_prediction(self):
        rows = [
            {"model": "mlp", "cohort": 128, "median_round_s": 3.0},
            {"model": "mlp", "cohort": 64, "median_round_s": 2.0},
            {"model": "cnn", "cohort": 64, "median_round_s": 5.0},
        ]
        scaling.add_scaling(rows)
        self.assertEqual([r["scaling_vs_base"] for r in rows], [0.75, 1.0, 1.0])
        self.assertEqual(rows[0]["base_cohort"], 64)
        prev = {
            "cohort": 64,
            "median_round_s": 2.0,
            "first_round_s": 3.0,
            "round_times_s": [2.0, 2.0],
            "wall_s": 17.0,  # 10 s fixed cost + 7 s of rounds
        }
        # 10 s fixed + 3 rounds (rounds=2 plus the warm-up) of 2 s x 256 / 64.
        self.assertAlmostEqual(scaling.predicted_s(prev, 256, rounds=2), 10.0 + 3 * 8.0)

    @pytest.mark.slow  # a benchmark smoke run of minutes: `make test-slow`
    def test_quick_run_writes_table_json_and_plot(self):
        out_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, out_dir, ignore_errors=True)
        out, png = os.path.join(out_dir, "s.json"), os.path.join(out_dir, "s.png")
        proc = _run_module(["benchmarks.scaling", "--quick", "--out", out, "--plot", png])
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("| model | C | chunk | median round s |", proc.stdout)
        with open(out) as f:
            result = json.load(f)
        rows = result["rows"]
        self.assertEqual([(r["model"], r["cohort"]) for r in rows], [("mlp", 8), ("mlp", 16)])
        self.assertEqual(rows[0]["scaling_vs_base"], 1.0)
        for r in rows:
            self.assertGreater(r["median_round_s"], 0)
            self.assertGreater(r["peak_rss_mib"], 0)
            self.assertGreater(r["compile_s"], 0)
            self.assertAlmostEqual(r["ms_per_client"], 1e3 * r["median_round_s"] / r["cohort"])
            self.assertAlmostEqual(r["updates_per_s"], r["cohort"] / r["median_round_s"])
        self.assertEqual(result["machine"]["cpu_count"], os.cpu_count())
        with open(png, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


class SweepBenchmarkTest(absltest.TestCase):
    @pytest.mark.slow  # a benchmark smoke run of minutes: `make test-slow`
    def test_quick_run_times_both_modes_and_they_agree(self):
        out = os.path.join(_tmpdir(self), "sweep.json")
        proc = _run_module(["benchmarks.sweep", "--quick", "--cli", "--out", out])
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("| mode | points | rounds | points per call |", proc.stdout)
        self.assertIn("end to end: fedjax-dp sweep", proc.stdout)
        with open(out) as f:
            result = json.load(f)
        rows = {r["mode"]: r for r in result["rows"]}
        self.assertEqual(set(rows), {"vectorized", "sequential"})
        self.assertEqual(rows["vectorized"]["points_per_call"], 4)  # 2 noise x 2 seeds
        self.assertEqual(rows["sequential"]["points_per_call"], 1)
        for r in rows.values():
            self.assertEqual((r["points"], r["rounds"]), (4, 3))
            self.assertGreater(r["train_s_median"], 0)
            self.assertGreater(r["compile_s"], 0)
        self.assertAlmostEqual(
            result["speedup_train"],
            rows["sequential"]["train_s_median"] / rows["vectorized"]["train_s_median"],
        )
        # The same points in both modes: same final accuracies and parameters, to rounding.
        self.assertLess(result["max_abs_accuracy_diff"], 1e-5)
        self.assertLess(result["max_abs_param_diff"], 1e-5)
        self.assertEqual(result["machine"]["cpu_count"], os.cpu_count())
        # End to end: each `fedjax-dp run` process reproduces its point of `fedjax-dp sweep`.
        cli = result["cli"]
        self.assertEqual(cli["points"], 4)
        self.assertLen(cli["run_command_s_each"], 4)
        self.assertLess(cli["max_abs_accuracy_diff"], 1e-5)
        self.assertAlmostEqual(cli["speedup"], cli["run_commands_s"] / cli["sweep_command_s"])


class OpacusTest(absltest.TestCase):
    def test_param_layout_round_trip(self):
        rng = np.random.default_rng(0)
        for model_name in ("mlp", "cnn"):
            params = {}
            if model_name == "mlp":
                shapes = {"Dense_0": (784, 256), "Dense_1": (256, 10)}
            else:
                # In jax.tree's sorted key order, not forward order; conv names vary.
                shapes = {
                    "Dense_0": (1568, 10),
                    "PatchConv_0": (3, 3, 1, 16),
                    "PatchConv_1": (3, 3, 16, 32),
                }
            for name, shape in shapes.items():
                params[name] = {
                    "kernel": rng.normal(size=shape).astype(np.float32),
                    "bias": rng.normal(size=shape[-1]).astype(np.float32),
                }
            arrays = r1.flax_to_torch(model_name, params)
            back = r1.torch_to_flax(model_name, arrays, params)
            for name in shapes:
                np.testing.assert_array_equal(back[name]["kernel"], params[name]["kernel"])
                np.testing.assert_array_equal(back[name]["bias"], params[name]["bias"])
            if model_name == "cnn":
                self.assertEqual(arrays[2].shape, (32, 16, 3, 3))  # OIHW
                # flax flattens (h, w, c), torch (c, h, w): input (h=1, w=2, c=3) of the dense.
                k = params["Dense_0"]["kernel"]
                self.assertEqual(arrays[4][5, 3 * 49 + 1 * 7 + 2], k[(1 * 7 + 2) * 32 + 3, 5])

    @unittest.skipUnless(HAVE_OPACUS, "torch/opacus not installed (pip install -e .[bench])")
    def test_opacus_cnn_per_sample_grads_are_autograd(self):
        # Guards against the channels_last input layout under which Opacus' unfold2d silently
        # returned zero per-sample gradients for the second convolution.
        import torch

        import fedjax_dp

        data = fedjax_dp.data.synthetic_classification(
            num_clients=2, examples_per_client=32, feature_shape=(28, 28, 1), num_classes=10
        )
        rnd = r1.OpacusRound("cnn", data, noise_multiplier=0.0)
        batch = torch.arange(8)
        rnd.optimizer.zero_grad(set_to_none=True)
        rnd.loss_fn(rnd.module(rnd.x[batch]), rnd.y[batch]).backward()
        plain = r1._torch_model("cnn")
        plain.load_state_dict(rnd.module._module.state_dict())
        for i in range(8):
            plain.zero_grad()
            rnd.loss_fn(plain(rnd.x[i : i + 1]), rnd.y[i : i + 1]).backward()
            for p, q in zip(rnd.params, plain.parameters(), strict=True):
                self.assertGreater(float(q.grad.abs().max()), 0)
                np.testing.assert_allclose(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-5)

    def _check(self, model_name):
        proc = _run_module(
            ["benchmarks.r1", "--check-opacus", f"--models={model_name}", "--cohorts=8"]
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        # Without noise the Opacus round is the engine's round, to float rounding.
        self.assertLess(res["max_abs_diff_engine_vs_opacus_no_noise"], 1e-6)
        self.assertGreater(res["max_abs_param_change"], 1e-4)
        self.assertAlmostEqual(res["train_loss_opacus"], res["train_loss_engine"], places=5)
        # With noise: the same noise scale (about 200k parameters, so within a few %).
        self.assertAlmostEqual(res["noise_std_ratio_opacus_over_engine"], 1.0, delta=0.03)

    @unittest.skipUnless(HAVE_OPACUS, "torch/opacus not installed (pip install -e .[bench])")
    def test_opacus_round_equals_engine_round_mlp(self):
        self._check("mlp")

    @pytest.mark.slow
    @unittest.skipUnless(HAVE_OPACUS, "torch/opacus not installed (pip install -e .[bench])")
    def test_opacus_round_equals_engine_round_cnn(self):
        self._check("cnn")


class PrngTest(absltest.TestCase):
    def test_measure_times_every_implementation(self):
        from benchmarks import prng

        rows = prng.measure(sizes=(1000,), reps=2)
        self.assertEqual({r["impl"] for r in rows}, set(prng.IMPLS))
        for r in rows:
            self.assertEqual(r["n"], 1000)
            self.assertGreater(r["normals_per_s"], 0)

    def test_tails_compares_old_and_new_samplers(self):
        from benchmarks import prng

        samplers = [s for pair in prng.TAIL_SAMPLERS for s in pair]
        rows = prng.measure(sizes=(1000,), reps=2, samplers=samplers, impls=("threefry2x32",))
        self.assertEqual({r["sampler"] for r in rows}, set(samplers))
        lines = prng._tails_table(rows)
        self.assertLen(lines, 2 + len(samplers))


if __name__ == "__main__":
    absltest.main()
