"""The package layout: the engine does not depend on the host runner, and old paths still work."""

import ast
import pathlib
import tempfile

from absl.testing import absltest, parameterized

import fedjax_dp

_ROOT = pathlib.Path(fedjax_dp.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    """Every ``fedjax_dp`` module that ``path`` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fedjax_dp"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedjax_dp"):
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


class LayoutTest(parameterized.TestCase):
    @parameterized.parameters("core", "mechanisms", "data", "models")
    def test_engine_never_imports_the_runner(self, package):
        files = sorted((_ROOT / package).rglob("*.py"))
        self.assertNotEmpty(files)
        for f in files:
            bad = {
                m
                for m in _imports(f)
                if m.startswith("fedjax_dp.runner")
                or m in ("fedjax_dp.experiment", "fedjax_dp.cli", "fedjax_dp.sweep")
            }
            self.assertEmpty(bad, f"{f.relative_to(_ROOT)} imports the runner: {sorted(bad)}")

    def test_checker_sees_an_import_of_the_runner(self):
        # The check above must be able to fail: a lazy import inside a function counts.
        src = "def f():\n    from fedjax_dp.runner import experiment\n"
        with tempfile.TemporaryDirectory() as d:
            tmp = pathlib.Path(d) / "m.py"
            tmp.write_text(src)
            self.assertIn("fedjax_dp.runner.experiment", _imports(tmp))

    def test_earlier_public_paths_are_the_new_modules(self):
        import fedjax_dp.accounting
        import fedjax_dp.experiment

        self.assertIs(fedjax_dp.accounting, fedjax_dp.privacy.accounting)
        self.assertIs(fedjax_dp.experiment, fedjax_dp.runner.experiment)
        self.assertIs(fedjax_dp.attacks, fedjax_dp.privacy.membership)
        self.assertIs(fedjax_dp.sampling, fedjax_dp.core.sampling)


if __name__ == "__main__":
    absltest.main()
