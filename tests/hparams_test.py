"""Declared hyper-parameters: stages declare (name, default, domain); make_hparams, checks,
``fedjax-dp hparams`` and ``sweep.grid`` derive from the declarations."""

from __future__ import annotations

import contextlib
import io
import math
import pathlib

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fedjax_dp
from fedjax_dp import cli, experiment
from fedjax_dp import sweep as sweep_lib
from fedjax_dp.core import base
from fedjax_dp.core import hparams as hparams_lib
from fedjax_dp.mechanisms import aggregation
from tests import _testing, contract_test

ROOT = pathlib.Path(__file__).resolve().parents[1]


class HParamTest(parameterized.TestCase):
    @parameterized.parameters(
        (hparams_lib.POSITIVE, [1e-9, 3.0], [0.0, -1.0, math.inf]),
        (hparams_lib.NONNEGATIVE, [0.0, 2.0], [-1e-9, math.inf]),
        (hparams_lib.UNIT_INTERVAL, [0.0, 0.5, 1.0], [-0.1, 1.1]),
        (hparams_lib.REAL, [-5.0, 0.0], [math.inf, -math.inf]),
    )
    def test_domain_accepts_and_refuses(self, domain, good, bad):
        h = hparams_lib.HParam("x", 1.0, domain, "a test value")
        for v in good:
            self.assertEqual(h.check(v), v)
        for v in (*bad, math.nan):
            with self.assertRaisesRegex(ValueError, r"^x=.* (must be|is not a number)"):
                h.check(v)
        with self.assertRaisesRegex(ValueError, "x='a' is not a number"):
            h.check("a")

    def test_resolve_order_unknown_and_missing(self):
        specs = (
            hparams_lib.HParam("a", 1.0, hparams_lib.POSITIVE),
            hparams_lib.HParam("b", None, hparams_lib.NONNEGATIVE, "must be set"),
            hparams_lib.HParam("c", 0.5, hparams_lib.UNIT_INTERVAL, from_state=True),
        )
        # override > configured > default; from_state names are not the caller's.
        self.assertEqual(
            hparams_lib.resolve(specs, {"a": 2.0, "b": 3.0}, {"a": 4.0}), {"a": 4.0, "b": 3.0}
        )
        with self.assertRaisesRegex(ValueError, r"hparam 'b' \(must be set\) has no default"):
            hparams_lib.resolve(specs, {})
        with self.assertRaisesRegex(ValueError, r"unknown hparams \['c'\]; this run declares"):
            hparams_lib.resolve(specs, {"b": 1.0}, {"c": 0.1})
        with self.assertRaisesRegex(ValueError, r"a=0 must be finite and > 0"):
            hparams_lib.resolve(specs, {"b": 1.0}, {"a": 0.0})

    def test_collect_merges_and_refuses_conflicting_domains(self):
        a = hparams_lib.HParam("v", 1.0, hparams_lib.POSITIVE, "first")
        b = hparams_lib.HParam("v", 2.0, hparams_lib.POSITIVE, "second", from_state=True)
        (merged,) = hparams_lib.collect([a, b])
        self.assertEqual((merged.default, merged.help, merged.from_state), (1.0, "first", True))
        c = hparams_lib.HParam("v", 1.0, hparams_lib.REAL)
        with self.assertRaisesRegex(ValueError, "'v' is declared twice with different domains"):
            hparams_lib.collect([a, c])

    def test_dp_stage_fields_imply_declarations(self):
        # A user's DP stage that declares nothing is still checked: its sensitivity names are
        # clip norms (> 0) and its noise multiplier is >= 0.
        clip = aggregation.clip_per_client("my_clip")
        noise = aggregation.add_gaussian_noise(("g_a", "g_b"), "my_sigma")
        specs = {h.name: h for h in hparams_lib.collect([clip, noise])}
        self.assertEqual(set(specs), {"my_clip", "g_a", "g_b", "my_sigma"})
        self.assertIs(specs["my_clip"].domain, hparams_lib.POSITIVE)
        self.assertIs(specs["my_sigma"].domain, hparams_lib.NONNEGATIVE)
        # A stage without DP fields declares only what it lists.
        plain = base.RoundTransform(lambda p: (), lambda x, s, **kw: (x, s))
        self.assertEqual(hparams_lib.of_stage(plain), ())

    def test_adaptive_clip_norm_is_declared_from_state(self):
        client, server = aggregation.adaptive_clipping(1.0, 10.0)
        specs = {h.name: h for h in hparams_lib.collect([client, server])}
        self.assertTrue(specs["clip_norm"].from_state)
        self.assertEqual(
            {n for n, h in specs.items() if not h.from_state},
            {"noise_multiplier", "target_quantile", "clip_lr", "clipped_count_stddev"},
        )


def _reads(sim, data, hp, name) -> bool:
    """Whether tracing the round without ``hparams[name]`` fails (so the round reads it)."""
    state = jax.eval_shape(sim.init, jax.random.key(0))
    rest = {k: v for k, v in hp.items() if k != name}
    try:
        jax.eval_shape(sim.round_fn, state, data, rest, jax.random.key(1))
    except KeyError:
        return True
    return False


class DeclaredIsReadTest(parameterized.TestCase):
    """For every contract case: make_hparams gives exactly the declared names, the round
    runs on them (so every name it reads is declared), and it reads every one of them."""

    @parameterized.parameters(*contract_test.CASES)
    def test_declared_names(self, name):
        data = contract_test._data()
        sim = contract_test.build(name, data)
        hp = sim.make_hparams()
        declared = [h.name for h in sim.hparams if not h.from_state]
        self.assertEqual(sorted(hp), sorted(declared))
        self.assertIn(contract_test.CASES[name][2], hp)  # the case's vmapped hparam
        if name in contract_test.REPRESENTATIVE:
            for h in declared:
                self.assertTrue(_reads(sim, data, hp, h), f"{name}: {h} is declared, not read")

    def test_out_of_domain_and_unknown_name_the_hparam(self):
        sim = contract_test.build("fedprox_stragglers", contract_test._data())
        with self.assertRaisesRegex(ValueError, r"mu=-1 must be finite and >= 0 \(FedProx"):
            sim.make_hparams(mu=-1.0)
        with self.assertRaisesRegex(ValueError, r"unknown hparams \['clip_norm'\].*'mu'"):
            sim.make_hparams(clip_norm=1.0)
        table = sim.hparams_table(mu=0.25)
        self.assertRegex(table, r"\nmu +0.25 +finite and >= 0 +FedProx proximal weight")

    def test_a_new_stage_is_one_declaration(self):
        """A user's stage with its own hparam: make_hparams, checks and the table know it."""
        data = _testing.small_data(num_clients=8, seed=1)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(4,))
        damp = hparams_lib.HParam("damping", 0.5, hparams_lib.UNIT_INTERVAL, "server damping")

        def update(total, state, *, key, mask=None, hparams):
            del key, mask
            return jax.tree.map(lambda x: x * hparams["damping"], total), state

        stage = base.RoundTransform(lambda p: base.EmptyState(), update, hparams=(damp,))
        sim = fedjax_dp.build_simulation(
            fedjax_dp.AlgorithmConfig(cohort_size=4, batch_size=4),
            model,
            data,
            server_stages=[stage],
        )
        self.assertEqual(float(sim.make_hparams()["damping"]), 0.5)
        with self.assertRaisesRegex(ValueError, r"damping=2 must be in \[0, 1\] \(server"):
            sim.make_hparams(damping=2.0)
        state = sim.init(jax.random.key(0))
        p0 = jax.device_get(state.params)
        state, _ = sim.round_fn(state, data, sim.make_hparams(damping=0.0), jax.random.key(1))
        for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(jax.device_get(state.params))):
            np.testing.assert_array_equal(a, b)  # damping 0: the server step is zero


class CommandTest(absltest.TestCase):
    def test_hparams_command_lists_the_rounds_declarations(self):
        out, err = io.StringIO(), io.StringIO()
        args = ["hparams", "--algorithm.name", "fedprox", "--algorithm.mu", "0.3"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*args, "--data.num_clients", "20"])
        self.assertEqual(code, 0, err.getvalue())
        text = out.getvalue()
        self.assertRegex(text, r"\nmu +0.3 +finite and >= 0")
        self.assertRegex(text, r"\nclient_lr +0.1 ")
        self.assertNotIn("noise_multiplier", text)  # not private: no noise stage
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["hparams", "--algorithm.name", "nope"])
        self.assertEqual(code, 2)
        self.assertIn("unknown algorithm name 'nope'", err.getvalue())


class SweepGridTest(parameterized.TestCase):
    def test_parse_grid(self):
        self.assertEqual(
            sweep_lib.parse_grid(" mu=0, 0.5 ;clip_lr=0.1;"),
            [("mu", [0.0, 0.5]), ("clip_lr", [0.1])],
        )
        for text, pattern in (
            ("mu", "is not 'name=v1,v2"),
            ("mu=a", "must be numbers"),
            ("mu=1,1", "repeats"),
            ("mu=1;mu=2", "twice"),
            ("mu=inf", "not a finite number"),
        ):
            with self.assertRaisesRegex(ValueError, f"sweep.grid: .*{pattern}"):
                sweep_lib.parse_grid(text)

    def _cfg(self, **overrides):
        return experiment.load_config(
            None,
            {
                "run.rounds": 2,
                "run.progress": False,
                "data.num_clients": 20,
                "model.hidden": [4],
                "algorithm.name": "fedprox",
                "sweep.seeds": [0],
                **overrides,
            },
        )

    def test_grid_axis_reaches_every_settings_hparams(self):
        sw = sweep_lib.Sweep(
            self._cfg(**{"sweep.grid": "mu=0,1", "sweep.client_lrs": [0.1, 0.2]}),
            log=lambda *_: None,
        )
        self.assertEqual(sw.grid_names, ["mu"])
        got = sorted((st.client_lr, dict(st.grid)["mu"]) for st in sw.settings)
        self.assertEqual(got, [(0.1, 0.0), (0.1, 1.0), (0.2, 0.0), (0.2, 1.0)])
        j = sw._names.index("mu")
        for i, st in enumerate(sw.settings):
            self.assertEqual(float(sw._table[0, i, j]), dict(st.grid)["mu"])
        rows = [
            {**r, "accuracy_mean": 0.5, "accuracy_std": 0.0, "test_loss_mean": 1.0}
            for r in (
                {
                    "baseline": False,
                    "unit": None,
                    "noise_multiplier": None,
                    "clip_norm": None,
                    "client_lr": 0.1,
                    "server_lr": 1.0,
                    "mu": 1.0,
                    "n_seeds": 1,
                },
            )
        ]
        table = sweep_lib.format_table(rows, delta=None, grid=sw.grid_names)
        self.assertIn("| server lr | mu |", table)
        self.assertIn("| 0.1 | 1 | 1 |", table)

    @parameterized.parameters(
        (
            {"sweep.grid": "target_quantile=0.5"},
            r"'target_quantile' is not an hparam of this run; the others it declares are \['mu'\]",
        ),
        ({"sweep.grid": "client_lr=0.1"}, "sweep client_lr with sweep.client_lrs"),
        ({"sweep.grid": "mu=-1"}, r"sweep.grid: mu=-1 must be finite and >= 0"),
        (
            {
                "algorithm.name": "scaffold",
                "algorithm.clip_norm": 1.0,
                "sweep.grid": "control_noise_multiplier=1,2",
            },
            "sets the noise of a DP release",
        ),
        (
            {
                "algorithm.name": "dp_fedavg",
                "algorithm.adaptive_clipping": True,
                "algorithm.clipped_count_stddev": 5.0,
                "sweep.baseline": False,
                "sweep.grid": "clip_norm=1",
            },
            "'clip_norm' is set from round state",
        ),
    )
    def test_bad_grid_names_the_fix(self, overrides, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            sweep_lib.Sweep(self._cfg(**overrides), log=lambda *_: None)


if __name__ == "__main__":
    absltest.main()
