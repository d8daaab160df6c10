"""What a DP run writes next to epsilon: nothing the accountant does not cover."""

import contextlib
import io
import json
import pathlib
import tempfile

from absl.testing import absltest

from fedjax_dp import experiment

_HIDDEN = ("train_loss", "num_clients", "cohort_overflow", "num_uploads")


def _run(tmp, **overrides):
    cfg = experiment.load_config(
        None,
        {
            "data.num_clients": 40,
            "run.rounds": 4,
            "run.eval_every": 2,
            "run.progress": False,
            "run.output_dir": tmp,
            "run.checkpoint_every": 0,
            **overrides,
        },
    )
    lines = []
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        result = experiment.run(cfg, log=lines.append)
    lines += out.getvalue().splitlines()  # the evaluation lines go through the progress bar
    rows = [json.loads(x) for x in (pathlib.Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((pathlib.Path(tmp) / "summary.json").read_text())
    return result, rows, summary, lines


class DpRunReleasesTest(absltest.TestCase):
    def test_dp_run_writes_no_data_dependent_counts_or_losses(self):
        with tempfile.TemporaryDirectory() as tmp:
            _, rows, summary, lines = _run(
                tmp,
                **{
                    "algorithm.name": "dp_fedavg",
                    "algorithm.sampling": "poisson",
                    "algorithm.sampling_rate": 0.2,
                    "privacy.delta": 1e-3,
                },
            )
        for row in rows:
            for key in _HIDDEN:
                self.assertNotIn(key, row)
            self.assertEqual(row["neighboring_relation_user"], "add_or_remove_one_user")
        for key in _HIDDEN:
            self.assertNotIn(key, summary)
        self.assertEqual(summary["neighboring_relation_user"], "add_or_remove_one_user")
        text = "\n".join(lines)
        self.assertNotIn("train loss", text)
        self.assertIn("accuracy", text)
        self.assertIn("neighbouring relation add_or_remove_one_user", text)
        self.assertIn("not written: training loss", text)

    def test_non_private_run_keeps_them(self):
        with tempfile.TemporaryDirectory() as tmp:
            _, rows, summary, lines = _run(tmp, **{"algorithm.name": "fedavg"})
        for key in ("train_loss", "num_clients", "cohort_overflow"):
            self.assertIn(key, rows[0])
        self.assertIn("cohort_overflow", summary)
        self.assertNotIn("neighboring_relation_user", rows[0])
        self.assertTrue(any("train loss" in line for line in lines))


if __name__ == "__main__":
    absltest.main()
