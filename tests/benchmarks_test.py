"""Smoke test of the R1 benchmark: `python -m benchmarks.r1 --quick` end to end."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

from benchmarks import r1

ROOT = pathlib.Path(__file__).resolve().parents[1]


class FlopCountTest(absltest.TestCase):
    def test_analytic_flops_per_example_step(self):
        # mlp: 2 * (fwd 203264 + weight grad 203264 + input grad of layer 2: 2560).
        self.assertEqual(r1.train_flops_per_example("mlp"), 818176)
        # cnn: 2 * (fwd 1031744 + weight grad 1031744 + input grads of layers 2-3: 918848).
        self.assertEqual(r1.layer_macs("cnn"), [112896, 903168, 15680])
        self.assertEqual(r1.train_flops_per_example("cnn"), 5964672)


class QuickRunTest(absltest.TestCase):
    def test_quick_run_writes_rows_and_engine_equals_loop(self):
        out_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, out_dir, ignore_errors=True)
        out = os.path.join(out_dir, "r1.json")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.r1", "--quick", "--out", out],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("| model | C | method |", proc.stdout)
        with open(out) as f:
            result = json.load(f)
        self.assertEqual(result["machine"]["cpu_count"], os.cpu_count())
        self.assertIn("jax", result["machine"])
        rows = {row["method"]: row for row in result["rows"]}
        self.assertEqual(set(rows), {"engine", "loop"})
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


if __name__ == "__main__":
    absltest.main()
