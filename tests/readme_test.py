"""The README's Python tour runs as written and prints what the README says."""

import contextlib
import io
import pathlib
import re

from absl.testing import absltest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class ReadmeTest(absltest.TestCase):
    def test_python_tour_runs(self):
        blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
        self.assertLen(blocks, 1)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102
        lines = out.getvalue().strip().splitlines()
        accuracy = float(re.search(r"'accuracy': ([0-9.]+)", lines[0]).group(1))
        epsilon = float(lines[1])
        self.assertGreater(accuracy, 0.9)  # README: "about 0.94"
        self.assertAlmostEqual(epsilon, 21.7, delta=0.05)  # README: "epsilon 21.7"


if __name__ == "__main__":
    absltest.main()
