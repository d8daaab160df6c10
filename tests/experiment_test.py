"""The experiment loop, config files and the command line, end to end."""

import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import warnings
from unittest import mock

import dp_accounting
import numpy as np
from absl.testing import absltest, parameterized

from fedjax_dp import accounting, cli, experiment
from fedjax_dp.core import sampling
from tests import _testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "digits_dp_fedavg.toml"


def _read(*parts) -> str:
    return pathlib.Path(*parts).read_text()


def _tmpdir(test) -> str:
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class DemoTest(absltest.TestCase):
    def test_demo_config_learns_and_accounts(self):
        """The `make demo` config at 60 of its 200 rounds: well above chance (0.1)."""
        out = _tmpdir(self)
        cfg = experiment.load_config(
            DEMO, {"run.rounds": 60, "run.output_dir": out, "run.progress": False}
        )
        result = experiment.run(cfg, log=lambda *_: None)
        self.assertGreater(result.final["test_accuracy"], 0.8)
        rows = [json.loads(line) for line in _read(out, "metrics.jsonl").splitlines()]
        self.assertEqual([r["round"] for r in rows], list(range(1, 61)))  # one line per round
        self.assertEqual([r["round"] for r in rows if "test_accuracy" in r], [20, 40, 60])
        self.assertTrue(all(np.isfinite(r["epsilon_user"]) for r in rows))
        eps = [r["epsilon_user"] for r in rows]
        self.assertEqual(eps, sorted(eps))
        # epsilon equals dp-accounting called directly on the documented event
        a = cfg.algorithm
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                a.sampling_rate, dp_accounting.GaussianDpEvent(a.noise_multiplier)
            ),
            60,
        )
        acct = dp_accounting.rdp.RdpAccountant(accounting.RDP_ORDERS)
        acct.compose(event)
        want = acct.get_epsilon(cfg.privacy.delta)
        self.assertAlmostEqual(rows[-1]["epsilon_user"], want, places=6)
        self.assertTrue(np.isfinite(rows[-1]["epsilon_user"]))
        self.assertLess(rows[0]["epsilon_user"], rows[-1]["epsilon_user"])
        params = experiment.load_params(os.path.join(out, "params.npz"))
        self.assertIn("Dense_0/kernel", params)
        self.assertEqual(params["Dense_0/kernel"].shape, (64, 32))
        summary = json.loads(_read(out, "summary.json"))
        self.assertEqual(summary["round"], 60)

    def test_same_seed_same_result(self):
        runs = []
        for _ in range(2):
            cfg = experiment.load_config(
                DEMO, {"run.rounds": 3, "run.progress": False, "data.num_clients": 120}
            )
            runs.append(experiment.run(cfg, write=False, log=lambda *_: None))
        for a, b in zip(
            *(
                np.concatenate([np.ravel(x) for x in __import__("jax").tree.leaves(r.params)])
                for r in runs
            )
        ):
            self.assertEqual(a, b)


class ConfigTest(parameterized.TestCase):
    def test_yaml_and_overrides(self):
        cfg = experiment.load_config(
            ROOT / "experiments" / "digits_fedavg.yaml",
            {"algorithm.client_lr": "0.05", "model.hidden": "[8, 8]"},
        )
        self.assertEqual(cfg.algorithm.name, "fedavg")
        self.assertEqual(cfg.algorithm.client_lr, 0.05)
        self.assertEqual(cfg.model.hidden, [8, 8])
        self.assertEqual(cfg.data.num_clients, 300)

    @parameterized.parameters(
        ({"algorithm.name": "fedsomething"}, "unknown algorithm name"),
        ({"model.name": "resnet9000"}, "unknown model name"),
        ({"privacy.delta": 1.5}, "privacy.delta"),
        ({"privacy.delta": 0.0}, "privacy.delta"),
        ({"algorithm.noise_multiplier": -1.0}, "noise_multiplier"),
        ({"algorithm.clip_norm": float("nan")}, "clip_norm"),
        ({"data.num_clients": 5000}, "num_clients"),
        ({"data.partition": "zipf"}, "partition|method"),
        ({"algorithm.sampling": "fixed", "algorithm.cohort_size": 1000}, "cohort_size"),
        ({"run.rounds": 0}, "run.rounds"),
    )
    def test_bad_values_name_the_option(self, overrides, pattern):
        cfg = experiment.load_config(DEMO, {"run.progress": False, **overrides})
        with self.assertRaisesRegex(ValueError, pattern):
            experiment.run(cfg, write=False, log=lambda *_: None)

    @parameterized.parameters(
        ({"algorithmm.name": "fedavg"}, "unknown config section"),
        ({"algorithm.nme": "fedavg"}, "unknown option algorithm.nme"),
        ({"run.rounds": "ten"}, "run.rounds"),
        ({"model.hidden": "[a]"}, "model.hidden"),
    )
    def test_bad_keys_and_types(self, overrides, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            experiment.load_config(DEMO, overrides)

    def test_npz_source(self):
        rng = np.random.default_rng(0)
        path = os.path.join(_tmpdir(self), "d.npz")
        x = rng.normal(size=(400, 5)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int32)
        np.savez(path, x=x, y=y, client_ids=np.arange(400) % 20)
        cfg = experiment.load_config(
            None,
            {
                "data.source": "npz",
                "data.path": path,
                "algorithm.cohort_size": 5,
                "run.rounds": 20,
                "run.progress": False,
                "model.name": "logistic",
            },
        )
        result = experiment.run(cfg, write=False, log=lambda *_: None)
        self.assertGreater(result.final["test_accuracy"], 0.8)


class OverflowWarningTest(absltest.TestCase):
    def test_warns_only_when_clients_were_left_out(self):
        with self.assertWarnsRegex(UserWarning, "selected 3 clients more .* over the run"):
            experiment.warn_overflow(3, "the run", "cohort_overflow")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            experiment.warn_overflow(0, "the run", "cohort_overflow")


# Functions of the training data that the accountant does not cover.
_WITHHELD = ("train_loss", "num_clients", "cohort_overflow", "num_uploads")


def _released_run(test, **overrides):
    """A tiny run whose Poisson cohort holds 3 of its 20 clients, so that it overflows:
    ``(result, rows, summary, text of logs, progress-bar lines and warnings)``."""
    out = _tmpdir(test)
    cfg = experiment.load_config(
        None,
        {
            "data.num_clients": 20,
            "model.hidden": [8],
            "run.rounds": 3,
            "run.eval_every": 1,
            "run.output_dir": out,
            "run.checkpoint_every": 0,
            "run.progress": False,
            "algorithm.sampling": "poisson",
            "algorithm.sampling_rate": 0.5,
            "algorithm.batch_size": 8,
            "privacy.delta": 1e-3,
            **overrides,
        },
    )
    poisson = sampling.poisson
    lines, printed = [], io.StringIO()
    with (
        mock.patch.object(sampling, "poisson", lambda n, q: poisson(n, q, max_cohort_size=3)),
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(printed),
        contextlib.redirect_stderr(printed),
    ):
        warnings.simplefilter("always")
        result = experiment.run(cfg, log=lines.append)
    text = "\n".join([*lines, printed.getvalue(), *(str(w.message) for w in caught)])
    rows = [json.loads(line) for line in _read(out, "metrics.jsonl").splitlines()]
    return result, rows, json.loads(_read(out, "summary.json")), text


class ReleasesTest(parameterized.TestCase):
    """A DP run writes nothing next to epsilon that the accountant does not cover."""

    @parameterized.parameters(
        ({"algorithm.name": "dp_fedavg"}, "user", "add_or_remove_one_user"),
        (
            {
                "algorithm.name": "dp_sgd_fedavg",
                "algorithm.sampling": "fixed",
                "algorithm.cohort_size": 3,
                "algorithm.local_epochs": 1,
            },
            "example",
            "zero_out_example",
        ),
    )
    def test_dp_run_releases_only_what_epsilon_covers(self, overrides, unit, relation):
        result, rows, summary, text = _released_run(self, **overrides)
        self.assertEqual(rows, result.history)
        for where in (*rows, summary, result.final):
            for key in _WITHHELD:
                self.assertNotIn(key, where)
        for row in rows:
            self.assertEqual(row["neighboring_relation"], relation)  # what epsilon covers
        self.assertEqual(summary["neighboring_relation"], relation)
        self.assertIn("the model after each round", summary["released"])
        self.assertIn(f"{unit}-level", text)
        self.assertIn(f"neighbouring relation {relation}", text)  # the start-up line
        self.assertIn("accuracy", text)  # the evaluation lines, without the training loss
        self.assertNotIn("train loss", text)
        self.assertNotRegex(text, r"selected \d+ clients")  # no overflow count either
        # The run's own accountant schedule gives its epsilon back (to compose runs).
        self.assertEqual(
            accounting.epsilon(result.schedules[unit], delta=1e-3), summary[f"epsilon_{unit}"]
        )

    def test_non_private_run_keeps_them(self):
        result, rows, summary, text = _released_run(self, **{"algorithm.name": "fedavg"})
        for row in rows:
            for key in ("train_loss", "num_clients", "cohort_overflow"):
                self.assertIn(key, row)
            self.assertNotIn("neighboring_relation", row)
            self.assertEqual(row["num_clients"], 3)
        overflow = sum(r["cohort_overflow"] for r in rows)
        self.assertGreater(overflow, 0)
        self.assertEqual(summary["cohort_overflow"], overflow)
        self.assertNotIn("released", summary)
        self.assertIn("train loss", text)
        self.assertIn(f"selected {overflow} clients more", text)
        self.assertEqual(result.schedules, {})


class CliTest(absltest.TestCase):
    def test_help_lists_every_option(self):
        proc = subprocess.run(
            [sys.executable, "-m", "fedjax_dp", "run", "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        for section in experiment.SECTIONS:
            sub = getattr(experiment.ExperimentConfig(), section)
            for name in sub.__dataclass_fields__:
                self.assertIn(f"--{section}.{name}", proc.stdout)

    def test_run_with_overrides(self):
        out = _tmpdir(self)
        code = cli.main(
            [
                "run",
                str(DEMO),
                "--run.rounds",
                "2",
                "--run.eval_every",
                "1",
                "--run.output_dir",
                out,
                "--run.progress",
                "false",
                "--algorithm.noise_multiplier",
                "2.5",
            ]
        )
        self.assertEqual(code, 0)
        saved = json.loads(_read(out, "config.json"))
        self.assertEqual(saved["algorithm"]["noise_multiplier"], 2.5)
        self.assertEqual(saved["algorithm"]["name"], "dp_fedavg")  # from the file
        self.assertLen(_read(out, "metrics.jsonl").splitlines(), 2)

    def test_interrupt_message_says_whether_the_run_can_resume(self):
        def interrupted(cfg, **_):
            raise KeyboardInterrupt

        for every, want in (("50", "run the same command to resume"), ("0", "starts over")):
            with mock.patch.object(experiment, "run", interrupted):
                code, text = _testing.cli_output(
                    ["run", str(DEMO), "--run.checkpoint_every", every]
                )
            self.assertEqual(code, 130)
            self.assertIn(want, text)

    def test_bad_input_is_one_clear_line(self):
        proc = _testing.cli_subprocess("run", str(DEMO), "--algorithm.name", "fedfoo")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("unknown algorithm name 'fedfoo'", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        # The same error path in this process (the subprocess above covers the entry point).
        code, text = _testing.cli_output(["run", "missing.toml"])
        self.assertEqual(code, 2)
        self.assertIn("not found", text)
        self.assertNotIn("Traceback", text)


if __name__ == "__main__":
    absltest.main()
