"""The README's Python tour runs as written and prints what the README says; its new-algorithm
excerpt is the code of experiments/custom_stage.py (which tests/custom_stage_test.py runs)."""

import contextlib
import io
import pathlib
import re

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


class ReadmeTest(absltest.TestCase):
    def test_python_tour_runs(self):
        self.assertLen(BLOCKS, 2)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(BLOCKS[0], "README.md", "exec"), {})  # noqa: S102
        lines = out.getvalue().strip().splitlines()
        accuracy = float(re.search(r"'accuracy': ([0-9.]+)", lines[0]).group(1))
        epsilon = float(lines[1])
        self.assertGreater(accuracy, 0.9)  # README: "about 0.94"
        self.assertAlmostEqual(epsilon, 21.7, delta=0.05)  # README: "epsilon 21.7"

    def test_new_algorithm_excerpt_is_the_example(self):
        example = (ROOT / "experiments" / "custom_stage.py").read_text()
        stage, _, call = BLOCKS[1].strip().partition("\n\n\nsim = ")
        self.assertIn(stage, example)
        self.assertIn("sim = " + call.replace("top_k(0.1)", "top_k(fraction)"), example)
        self.assertLess(len(example.splitlines()), 50)


if __name__ == "__main__":
    absltest.main()
