"""Privacy-utility sweeps (``fedjax-dp sweep``): a sweep point is the single run with the same
seed, data and hyper-parameters; vectorised equals sequential; outputs, epsilon, spread,
errors and the command line."""

import csv
import json
import math
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

from fedjax_dp import accounting, cli, experiment
from fedjax_dp import sweep as sweep_lib
from tests import _testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "digits_sweep.toml"
PARTITION_SEED = 7
# A tiny version of the digits sweep: 30 clients, one local step, 3 rounds; 2 noise
# multipliers x 2 seeds + the baseline = 6 points, vmapped 4 at a time (the second group is
# padded), on the data of partition seed 7 while run.seed stays 0.
TINY = {
    "run.rounds": 3,
    "run.eval_every": 2,
    "run.progress": False,
    "data.num_clients": 30,
    "data.partition_seed": PARTITION_SEED,
    "model.hidden": [8],
    "algorithm.local_epochs": 1,
    "algorithm.batch_size": 0,
    "algorithm.sampling_rate": 0.2,
    "sweep.noise_multipliers": [0.5, 2.0],
    "sweep.seeds": [3, 5],
    "sweep.parallel": 4,
}


def _tmpdir(test) -> str:
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _flat(params, i=None):
    leaves = jax.tree.leaves(params)
    return np.concatenate([np.ravel(x if i is None else x[i]) for x in leaves])


def _quiet(*_):
    return None


class SweepTest(absltest.TestCase):
    """One vectorised sweep (written to disk) and the same grid run sequentially.

    A single test method (each check a subTest): compiling the vmapped round is the
    expensive part, and pytest-xdist would otherwise compile it once per worker.
    """

    def test_sweep(self):
        self.out = _tmpdir(self)
        cfg = experiment.load_config(CONFIG, {**TINY, "sweep.output": self.out})
        self.cfg = cfg
        self.logs = []
        self.result = sweep_lib.run_sweep(cfg, log=self.logs.append)
        sequential = sweep_lib.Sweep(cfg, log=_quiet)
        self.seq_points, self.seq_params, self.seq_timing = sequential.train(vectorize=False)
        self.sweep = sequential
        for name in (
            "grid",
            "point_equals_single_run",
            "baseline_equals_single_run_without_clipping_or_noise",
            "vectorized_equals_sequential",
            "seeds_vmapped_equals_seeds_in_sequence",
            "outputs",
            "epsilon_per_setting_is_the_accountants",
            "releasing_all_points_composes_them",
            "dp_sweep_releases_no_training_loss_or_counts",
            "spread_over_seeds",
        ):
            with self.subTest(name):
                getattr(self, f"_check_{name}")()

    def _single_run(self, seed, **algorithm):
        cfg = experiment.load_config(
            CONFIG,
            {
                **TINY,
                "run.seed": seed,
                **{f"algorithm.{k}": v for k, v in algorithm.items()},
            },
        )
        return experiment.run(cfg, write=False, log=_quiet)

    def _index(self, **match):
        for i, p in enumerate(self.result.points):
            if all(p[k] == v for k, v in match.items()):
                return i
        raise AssertionError(f"no point {match}")

    def _check_grid(self):
        pts = self.result.points
        self.assertLen(pts, 6)
        self.assertEqual(
            [(p["noise_multiplier"], p["seed"], p["baseline"]) for p in pts],
            [(0.5, 3, False), (0.5, 5, False), (2.0, 3, False), (2.0, 5, False)]
            + [(0.0, 3, True), (0.0, 5, True)],
        )
        self.assertEqual(self.result.timing["points_per_group"], 4)
        self.assertEqual(self.result.timing["group_shape"], [2, 2])  # seeds x settings
        self.assertEqual(jax.tree.leaves(self.result.params)[0].shape[0], 6)

    def _check_point_equals_single_run(self):
        i = self._index(noise_multiplier=2.0, seed=5)
        run = self._single_run(5, noise_multiplier=2.0)
        np.testing.assert_allclose(
            _flat(self.result.params, i), _flat(run.params), rtol=1e-5, atol=1e-6
        )
        point = self.result.points[i]
        self.assertAlmostEqual(point["test_loss"], run.final["test_loss"], places=5)
        self.assertAlmostEqual(point["test_accuracy"], run.final["test_accuracy"], places=5)
        # Epsilon: the single run's accountant, once per setting.
        self.assertEqual(point["epsilon_user"], run.final["epsilon_user"])
        row = self.result.rows[1]
        self.assertEqual(
            (row["noise_multiplier"], row["epsilon"]), (2.0, run.final["epsilon_user"])
        )

    def _check_baseline_equals_single_run_without_clipping_or_noise(self):
        i = self._index(baseline=True, seed=3)
        run = self._single_run(3, noise_multiplier=0.0, clip_norm=sweep_lib.BASELINE_CLIP_NORM)
        np.testing.assert_allclose(
            _flat(self.result.params, i), _flat(run.params), rtol=1e-5, atol=1e-6
        )
        self.assertTrue(np.all(np.isfinite(_flat(self.result.params, i))))
        self.assertEqual(self.result.rows[-1]["epsilon"], math.inf)
        # Clipping at 1e15 never acts: the deltas are unclipped and the noise is exactly 0, so
        # the baseline differs from the DP points.
        j = self._index(noise_multiplier=0.5, seed=3)
        self.assertGreater(
            np.max(np.abs(_flat(self.result.params, i) - _flat(self.result.params, j))), 1e-3
        )

    def _check_vectorized_equals_sequential(self):
        self.assertFalse(self.seq_timing["vectorize"])
        np.testing.assert_allclose(
            _flat(self.result.params), _flat(self.seq_params), rtol=1e-5, atol=1e-6
        )
        for v, s in zip(self.result.points, self.seq_points, strict=True):
            self.assertAlmostEqual(v["test_loss"], s["test_loss"], places=5)
            self.assertAlmostEqual(v["test_accuracy"], s["test_accuracy"], places=5)
            self.assertEqual([c["round"] for c in v["curve"]], [2, 3])
            self.assertEqual(set(s), {"test_loss", "test_accuracy", "curve"})  # DP: no more

    def _check_seeds_vmapped_equals_seeds_in_sequence(self):
        # On CPU run_sweep maps over the seeds; the vmap over seeds (accelerators) agrees.
        self.assertEqual(self.result.timing["seeds_in_sequence"], jax.default_backend() == "cpu")
        other = sweep_lib.Sweep(
            self.cfg, log=_quiet, seeds_in_sequence=not self.result.timing["seeds_in_sequence"]
        )
        points, params, timing = other.train(vectorize=True)
        self.assertNotEqual(timing["seeds_in_sequence"], self.result.timing["seeds_in_sequence"])
        np.testing.assert_allclose(_flat(self.result.params), _flat(params), rtol=1e-5, atol=1e-6)
        for a, b in zip(self.result.points, points, strict=True):
            self.assertAlmostEqual(a["test_accuracy"], b["test_accuracy"], places=5)

    def _check_outputs(self):
        out = pathlib.Path(self.out)
        self.assertEqual(self.result.output_dir, out)
        with open(out / "sweep.csv") as f:
            rows = list(csv.DictReader(f))
        self.assertLen(rows, 3)  # 2 noise multipliers + the baseline
        for column in (
            "noise_multiplier",
            "clip_norm",
            "client_lr",
            "server_lr",
            "epsilon",
            "delta",
            "rounds",
            "accuracy_mean",
            "accuracy_std",
            "accuracy_seed3",
            "accuracy_seed5",
            "test_loss_mean",
            "n_seeds",
            "baseline",
        ):
            self.assertIn(column, rows[0])
        self.assertEqual([r["baseline"] for r in rows], ["False", "False", "True"])
        self.assertEqual(rows[2]["epsilon"], "inf")
        self.assertEqual(rows[0]["rounds"], "3")
        doc = json.loads((out / "sweep.json").read_text())
        self.assertLen(doc["rows"], 3)
        self.assertEqual(doc["partition_seed"], PARTITION_SEED)
        self.assertEqual(doc["seeds"], [3, 5])
        self.assertIn("1e+15", doc["baseline"])
        points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
        self.assertLen(points, 6)
        for i, point in enumerate(points):  # the hparams the round is called with
            want = self.sweep._round_hparams(self.sweep.point(i)[0], 0)
            self.assertEqual(set(point["hparams"]), set(want))
            for k, v in want.items():
                self.assertAlmostEqual(point["hparams"][k], v, places=6, msg=k)
        with open(out / "accuracy_vs_epsilon.png", "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def _check_epsilon_per_setting_is_the_accountants(self):
        sim = self.sweep.sim
        for row in self.result.rows[:2]:
            hp = {
                k: float(v)
                for k, v in sim.make_hparams(noise_multiplier=row["noise_multiplier"]).items()
            }
            (rp,) = sim.round_privacy(hp)
            want = accounting.epsilon(rp, rounds=3, delta=self.cfg.privacy.delta)
            self.assertAlmostEqual(row["epsilon"], want, places=9)
            self.assertEqual(row["delta"], self.cfg.privacy.delta)
        self.assertGreater(self.result.rows[0]["epsilon"], self.result.rows[1]["epsilon"])

    def _check_releasing_all_points_composes_them(self):
        # Independently: every DP point's rounds (2 noise multipliers x 2 seeds x 3 rounds)
        # concatenated into one schedule for accounting.epsilon.
        sim, delta = self.sweep.sim, self.cfg.privacy.delta
        schedule = []
        for p in self.result.points:
            if not p["baseline"]:
                hp = sim.make_hparams(noise_multiplier=p["noise_multiplier"])
                (rp,) = sim.round_privacy({k: float(v) for k, v in hp.items()})
                schedule += [(rp, 1)] * 3
        self.assertLen(schedule, 12)
        want = accounting.epsilon(schedule, delta=delta)
        privacy = self.result.privacy
        self.assertAlmostEqual(privacy["epsilon_without_baseline"], want, places=9)
        self.assertEqual(privacy["points_without_baseline"], 4)
        self.assertGreater(want, max(r["epsilon"] for r in self.result.rows[:2]))
        # The non-private baseline is released too: together, no privacy.
        self.assertEqual(privacy["epsilon_all_points"], math.inf)
        self.assertEqual(privacy["points"], 6)
        self.assertEqual(privacy["neighboring_relation"], "add_or_remove_one_user")
        doc = json.loads((pathlib.Path(self.out) / "sweep.json").read_text())
        self.assertEqual(doc["privacy"], json.loads(json.dumps(privacy)))
        text = "\n".join(self.logs)  # the table's footer, in the log
        self.assertIn("Releasing all 6 points together", text)
        self.assertIn("epsilon = inf (the non-private baseline is among them)", text)
        self.assertIn(f"the 4 points without the baseline: epsilon = {want:.3f}", text)

    def _check_dp_sweep_releases_no_training_loss_or_counts(self):
        out = pathlib.Path(self.out)
        for point in self.result.points:
            self.assertNotIn("train_loss", point)
            self.assertNotIn("cohort_overflow", point)
            for c in point["curve"]:
                self.assertEqual(set(c), {"round", "test_loss", "test_accuracy"})
        for row in self.result.rows:
            self.assertNotIn("train_loss_mean", row)
        for name in ("sweep.csv", "sweep.json", "points.jsonl"):
            text = (out / name).read_text()
            for key in ("train_loss", "cohort_overflow"):
                self.assertNotIn(key, text, name)
        self.assertNotIn("train loss", "\n".join(self.logs))

    def _check_spread_over_seeds(self):
        for s, row in enumerate(self.result.rows):
            acc = [p["test_accuracy"] for p in self.result.points[2 * s : 2 * s + 2]]
            self.assertEqual([row["accuracy_seed3"], row["accuracy_seed5"]], acc)
            self.assertAlmostEqual(row["accuracy_mean"], np.mean(acc), places=12)
            self.assertAlmostEqual(row["accuracy_std"], np.std(acc, ddof=1), places=12)
            self.assertEqual(row["n_seeds"], 2)


class SummaryTest(absltest.TestCase):
    def test_sample_std_and_single_seed(self):
        settings = [sweep_lib.Setting(1.0, 0.5, 0.1, 1.0)]
        points = [
            {"test_accuracy": a, "test_loss": 1.0, "train_loss": 1.0} for a in (0.5, 0.7, 0.9)
        ]
        (row,) = sweep_lib.summarize(
            settings, [0, 1, 2], points, [{"user": 2.0}], unit="user", delta=1e-5, rounds=10
        )
        self.assertAlmostEqual(row["accuracy_mean"], 0.7)
        self.assertAlmostEqual(row["accuracy_std"], 0.2)  # sample std (ddof=1)
        self.assertEqual(row["accuracy_seed1"], 0.7)
        (row,) = sweep_lib.summarize(
            settings, [4], points[:1], [{"user": 2.0}], unit="user", delta=1e-5, rounds=10
        )
        self.assertEqual(row["accuracy_std"], 0.0)
        table = sweep_lib.format_table([row], delta=1e-5)
        self.assertIn("| 1 | 0.5 | 0.1 | 1 | 2.000 | 0.5000 ± 0.0000 |", table)


class TrackerTest(absltest.TestCase):
    def test_non_private_points_keep_training_loss_and_overflow(self):
        metrics = [
            {"train_loss": np.array([1.0, 2.0]), "cohort_overflow": np.array([0, 3])},
            {"train_loss": np.array([0.5, 1.5]), "cohort_overflow": np.array([1, 0])},
        ]
        for private in (False, True):
            track = sweep_lib._Tracker(2, private=private)
            track.pending += metrics
            track.evaluated(2, np.array([0.3, 0.4]), np.array([0.9, 0.8]))
            result = track.result(1)
            self.assertEqual((result["test_loss"], result["test_accuracy"]), (0.4, 0.8))
            if private:
                self.assertNotIn("train_loss", result)
                self.assertNotIn("cohort_overflow", result)
                self.assertNotIn("train_loss", result["curve"][0])
            else:
                self.assertEqual(result["train_loss"], 1.5)  # the last round's
                self.assertEqual(result["cohort_overflow"], 3)  # summed over rounds
                self.assertEqual(result["curve"][0]["train_loss"], 1.5)
            self.assertEqual(track.pending, [])

    def test_composition_footer(self):
        privacy = {
            "points": 3,
            "delta": 1e-5,
            "accountant": "rdp",
            "neighboring_relation": "replace_one_user",
            "epsilon_all_points": 4.5,
        }
        self.assertEqual(
            sweep_lib.composition_footer(privacy),
            "Releasing all 3 points together (same data; delta=1e-05, rdp, replace_one_user): "
            "epsilon = 4.500. Each row's epsilon is one point alone.",
        )


class ConfigTest(parameterized.TestCase):
    def test_list_options_parse(self):
        cfg = experiment.load_config(
            None, {"sweep.noise_multipliers": "0.5, 1,2.5", "sweep.seeds": "[0, 1, 2]"}
        )
        self.assertEqual(cfg.sweep.noise_multipliers, [0.5, 1.0, 2.5])
        self.assertEqual(cfg.sweep.seeds, [0, 1, 2])
        with self.assertRaisesRegex(ValueError, "sweep.seeds.*integers"):
            experiment.load_config(None, {"sweep.seeds": [0.5]})
        with self.assertRaisesRegex(ValueError, "sweep.noise_multipliers.*numbers"):
            experiment.load_config(None, {"sweep.noise_multipliers": "1,x"})

    def test_partition_seed_fixes_the_data(self):
        def data(seed, partition_seed=None):
            o = {"run.seed": seed, "data.num_clients": 20}
            if partition_seed is not None:
                o["data.partition_seed"] = partition_seed
            train, (x_test, _) = experiment.load_data(experiment.load_config(None, o))
            return np.asarray(train.counts), x_test

        a, b = data(1, 7), data(2, 7)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        c, d = data(1), data(1, 1)  # unset: run.seed
        np.testing.assert_array_equal(c[0], d[0])
        self.assertFalse(np.array_equal(data(2)[0], c[0]))

    @parameterized.parameters(
        ({"sweep.noise_multipliers": [], "sweep.seeds": []}, "grid is empty"),
        ({"sweep.noise_multipliers": [-1.0]}, r"sweep.noise_multipliers.*>= 0"),
        ({"sweep.noise_multipliers": [1.0, 1.0]}, "sweep.noise_multipliers.*repeats"),
        ({"sweep.clip_norms": [0.0]}, r"sweep.clip_norms.*> 0"),
        ({"sweep.client_lrs": [-0.1]}, "sweep.client_lrs"),
        ({"sweep.seeds": [-1]}, "sweep.seeds"),
        ({"sweep.parallel": -2}, "sweep.parallel"),
        ({"privacy.target_epsilon": 3.0}, "privacy.target_epsilon.*sweep.noise_multipliers"),
        ({"privacy.attack": True}, "privacy.attack"),
        (
            {"algorithm.name": "fedavg"},
            "sweep.noise_multipliers needs a DP algorithm",
        ),
        (
            {"sweep.noise_multipliers": [], "sweep.clip_norms": [1.0], "algorithm.name": "fedavg"},
            "sweep.clip_norms needs a DP algorithm",
        ),
        (
            {"sweep.noise_multipliers": [], "algorithm.name": "fedsgd", "sweep.client_lrs": [1.0]},
            "fedsgd fixes client_lr",
        ),
        (
            {
                "algorithm.adaptive_clipping": True,
                "algorithm.clip_norm": 0.1,
                "algorithm.clipped_count_stddev": 5.0,
                "sweep.clip_norms": [0.1, 1.0],
            },
            "sweep.clip_norms.*adapted",
        ),
        (
            {
                "algorithm.adaptive_clipping": True,
                "algorithm.clip_norm": 0.1,
                "algorithm.clipped_count_stddev": 5.0,
            },
            "sweep.baseline.*adaptive_clipping",
        ),
    )
    def test_bad_inputs_name_the_option(self, overrides, pattern):
        if overrides.get("algorithm.name") in ("fedavg", "fedsgd"):  # unset the DP options
            overrides = {**overrides, "algorithm.clip_norm": None}
            overrides["algorithm.noise_multiplier"] = None
        cfg = experiment.load_config(CONFIG, {**TINY, **overrides})
        with self.assertRaisesRegex(ValueError, pattern):
            sweep_lib.Sweep(cfg, log=_quiet)

    def test_noise_schedule_reaches_every_round_of_every_setting(self):
        cfg = experiment.load_config(
            CONFIG,
            {
                **TINY,
                "run.rounds": 6,
                "privacy.noise_schedule": "linear",
                "privacy.noise_end_ratio": 0.5,
                "privacy.noise_schedule_stages": 3,
            },
        )
        sw = sweep_lib.Sweep(cfg, log=_quiet)
        j = sw._names.index("noise_multiplier")
        self.assertEqual(sw._table.shape[0], 6)
        for i, st in enumerate(sw.settings):
            want = [
                sw._round_hparams(i, r)["noise_multiplier"] if not st.baseline else 0.0
                for r in range(6)
            ]
            np.testing.assert_array_equal(sw._table[:, i, j], np.float32(want))
            if not st.baseline:  # three stages from sigma down to sigma / 2
                self.assertLen(set(want), 3)
                self.assertAlmostEqual(want[0], st.noise_multiplier, places=6)
                self.assertAlmostEqual(want[-1], st.noise_multiplier / 2, places=6)

    def test_target_epsilon_calibrates_once(self):
        cfg = experiment.load_config(
            CONFIG,
            {
                **TINY,
                "sweep.noise_multipliers": [],
                "privacy.target_epsilon": 4.0,
                "sweep.baseline": False,
            },
        )
        s = sweep_lib.Sweep(cfg, log=_quiet)
        (sigma,) = {st.noise_multiplier for st in s.settings}
        self.assertNotEqual(sigma, 1.0)  # not the config's
        for eps in s.epsilons():
            self.assertLessEqual(eps["user"], 4.0)
            self.assertGreater(eps["user"], 3.5)


class CliTest(absltest.TestCase):
    def test_sweep_command_writes_table_and_plot(self):
        out = _tmpdir(self)
        code = cli.main(
            ["sweep", str(CONFIG)]
            + [
                arg
                for k, v in {
                    **TINY,
                    "sweep.noise_multipliers": "1,4",
                    "sweep.seeds": "0,1,2",
                    "sweep.parallel": "2",  # groups of 2 seeds x 1 setting: seeds padded
                    "sweep.output": out,
                    "model.hidden": "8",
                }.items()
                for arg in (f"--{k}", ",".join(map(str, v)) if isinstance(v, list) else str(v))
            ]
        )
        self.assertEqual(code, 0)
        for name in ("sweep.csv", "sweep.json", "points.jsonl", "accuracy_vs_epsilon.png"):
            self.assertTrue(os.path.getsize(os.path.join(out, name)) > 0, name)
        doc = json.loads(pathlib.Path(out, "sweep.json").read_text())
        self.assertEqual([r["noise_multiplier"] for r in doc["rows"]], [1.0, 4.0, 0.0])
        self.assertTrue(doc["timing"]["vectorize"])
        self.assertEqual(doc["timing"]["group_shape"], [2, 1])
        points = [
            json.loads(line) for line in pathlib.Path(out, "points.jsonl").read_text().splitlines()
        ]
        self.assertEqual([p["seed"] for p in points], [0, 1, 2] * 3)
        for row in doc["rows"]:
            mine = [p for p in points if p["noise_multiplier"] == row["noise_multiplier"]]
            self.assertEqual(
                [row[f"accuracy_seed{s}"] for s in (0, 1, 2)],
                [p["test_accuracy"] for p in mine],
            )

    def test_error_is_one_clear_line(self):
        code, text = _testing.cli_output(["sweep", str(CONFIG), "--privacy.target_epsilon", "2"])
        self.assertEqual(code, 2)
        self.assertIn("privacy.target_epsilon", text)
        self.assertIn("sweep.noise_multipliers", text)

    def test_help_lists_sweep_options(self):
        code, text = _testing.cli_output(["sweep", "--help"], stream="stdout")
        self.assertEqual(code, 0)
        for name in experiment.SweepConfig.__dataclass_fields__:
            self.assertIn(f"--sweep.{name}", text)
        self.assertIn("--data.partition_seed", text)


if __name__ == "__main__":
    absltest.main()
