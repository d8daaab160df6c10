"""The one-run canary audit: the bound, the canary clients, and audits of correct and broken runs."""

import dataclasses
import itertools
import json
import math
import os
import pathlib
import shutil
import tempfile

import dp_accounting
import jax
import numpy as np
from absl.testing import absltest, parameterized

import fedjax_dp
from fedjax_dp import accounting, audit, cli, experiment
from tests import _testing


def _tail(r, q, v):
    """P[Binomial(r, q) >= v] by exact summation."""
    return sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1))


def _p_value_reference(m, r, v, eps, delta):
    """The main theorem of Steinke, Nasr, Jagielski (2023) for (eps, delta)-DP, term by term."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(w):
        return 1.0 if w <= 0 else _tail(r, q, w)

    if v == 0:
        return 1.0
    alpha = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(1.0, f(v) + 2 * m * delta * alpha)


class BoundTest(parameterized.TestCase):
    @parameterized.parameters(
        (20, 20, 15, 0.5, 0.0),
        (30, 20, 18, 1.0, 1e-3),
        (50, 40, 30, 0.2, 1e-2),
        (12, 12, 12, 2.0, 1e-4),
        (10, 4, 0, 1.0, 0.1),
    )
    def test_p_value_matches_the_theorem(self, m, r, v, eps, delta):
        got = audit.p_value(m, r, v, eps, delta)
        self.assertAlmostEqual(got, _p_value_reference(m, r, v, eps, delta), places=12)

    def test_perfect_guesses_match_closed_form_and_grow_with_r(self):
        # delta = 0, all r guesses right: the largest eps with p^r < beta, p = e^eps/(1+e^eps).
        bounds = []
        for r in (5, 10, 20, 50, 100, 200, 500):
            eps = audit.epsilon_lower_bound(1000, r, r, delta=0.0, significance=0.05)
            p = 0.05 ** (1 / r)
            self.assertAlmostEqual(eps, math.log(p / (1 - p)), places=6)
            bounds.append(eps)
        self.assertEqual(bounds, sorted(bounds))
        self.assertGreater(bounds[0], 0.0)
        self.assertGreater(bounds[-1], 4.0)

    def test_four_coin_flips_prove_nothing(self):
        self.assertEqual(audit.epsilon_lower_bound(4, 4, 4, delta=0.0), 0.0)  # 2^-4 > 0.05

    def test_random_guesses_give_about_zero(self):
        rng = np.random.default_rng(0)
        bounds = [
            audit.epsilon_lower_bound(1000, 400, int(rng.binomial(400, 0.5)), delta=1e-5)
            for _ in range(20)
        ]
        self.assertLessEqual(sum(b > 0 for b in bounds), 3)  # ~5% false rejections of eps=0
        self.assertLess(max(bounds), 0.15)

    def test_monotone_in_correct_count(self):
        bounds = [audit.epsilon_lower_bound(300, 100, v, delta=1e-5) for v in range(40, 101)]
        self.assertTrue(all(b <= c for b, c in itertools.pairwise(bounds)))
        self.assertEqual(bounds[0], 0.0)
        self.assertGreater(bounds[-1], 2.5)

    def test_delta_and_confidence_make_it_smaller(self):
        base = audit.epsilon_lower_bound(1000, 200, 190, delta=0.0)
        self.assertLess(audit.epsilon_lower_bound(1000, 200, 190, delta=1e-4), base)
        self.assertLess(
            audit.epsilon_lower_bound(1000, 200, 190, delta=0.0, significance=0.001), base
        )

    def test_best_guess_is_bonferroni_corrected_over_the_grid(self):
        rng = np.random.default_rng(1)
        included = rng.random(500) < 0.5
        scores = np.where(included, 10.0, 0.0) + rng.normal(size=500)
        result = audit.best_guess(scores, included, delta=1e-5)
        grid = audit.guess_grid(500)
        self.assertLen(result.grid, len(grid))
        best = max(result.grid, key=lambda row: row["epsilon_lower_bound"])
        self.assertEqual((result.k_plus, result.k_minus), (best["k_plus"], best["k_minus"]))
        self.assertEqual(result.num_correct, result.num_guesses)  # separated: all right
        want = audit.epsilon_lower_bound(
            500, result.num_guesses, result.num_correct, delta=1e-5, significance=0.05 / len(grid)
        )
        self.assertAlmostEqual(result.epsilon_lower_bound, want)
        # the grid is fixed in advance: (k, k) and (k, 0) for 2..50% of m
        self.assertIn((10, 10), grid)
        self.assertIn((250, 250), grid)
        self.assertIn((100, 0), grid)

    def test_best_guess_counts_in_and_out_guesses(self):
        scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
        included = np.array([True, False, True, False, False, True])
        result = audit.best_guess(scores, included, delta=0.0, grid=[(2, 2)])
        # top 2 guessed in: {T, F} -> 1; bottom 2 guessed out: {F, T} -> 1
        self.assertEqual(result.num_correct, 2)

    @parameterized.parameters(
        dict(num_canaries=5, num_guesses=6, num_correct=1),
        dict(num_canaries=5, num_guesses=3, num_correct=4),
        dict(num_canaries=5, num_guesses=3, num_correct=-1),
    )
    def test_bad_counts_raise(self, **kw):
        with self.assertRaisesRegex(ValueError, "num_correct"):
            audit.p_value(**kw, epsilon=1.0, delta=0.0)

    def test_bad_significance_raises(self):
        with self.assertRaisesRegex(ValueError, "significance"):
            audit.epsilon_lower_bound(10, 10, 10, delta=0.0, significance=1.5)


def _data():
    return fedjax_dp.data.synthetic_classification(
        num_clients=10, examples_per_client=4, feature_shape=(64,), num_classes=10, seed=0
    )


def _config(sigma=4.0):
    # Poisson with q = 1: every client, every round (the Gaussian mechanism T times).
    return fedjax_dp.AlgorithmConfig(
        name="dp_fedavg",
        sampling="poisson",
        sampling_rate=1.0,
        local_epochs=1,
        batch_size=4,
        client_lr=0.1,
        clip_norm=1.0,
        noise_multiplier=sigma,
    )


class CanaryTest(absltest.TestCase):
    def test_wrapper_leaves_real_clients_and_emits_canaries(self):
        data = _data()
        model = fedjax_dp.get_model("logistic", data.feature_shape, data.num_classes)
        population = audit.with_canary_clients(data, 6)
        self.assertEqual(population.num_clients, 16)
        np.testing.assert_array_equal(population.counts[:10], data.counts)
        np.testing.assert_array_equal(population.x[: data.num_examples], data.x)
        self.assertEqual(population.max_count, data.max_count)
        key = jax.random.key(3)
        sim = fedjax_dp.build_simulation(_config(), model, population)
        client = sim.client
        wrapped = audit.add_canaries(client, num_real_clients=10, num_canaries=6, key=key)
        params = model.init(jax.random.key(0))
        hp = dict(sim.make_hparams(), canary_norm=np.float32(0.7))
        dev = population.to_device()
        ckey = jax.random.key(9)
        real_update, wrapped_update = jax.jit(client.simple), jax.jit(wrapped.simple)
        real, real_m = real_update(params, dev, 4, ckey, hp)
        got, got_m = wrapped_update(params, dev, 4, ckey, hp)
        jax.tree.map(np.testing.assert_array_equal, got, real)
        self.assertEqual(float(got_m["loss_sum"]), float(real_m["loss_sum"]))
        included = audit.all_included(key, 6)
        self.assertTrue(0 < included.sum() < 6, included)  # this key has both kinds
        for j in range(6):
            delta, m = wrapped_update(params, dev, 10 + j, ckey, hp)
            flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(delta)])
            self.assertEqual(float(m["num_seen"]), 0.0)
            if included[j]:
                u = np.concatenate(
                    [np.ravel(x) for x in jax.tree.leaves(audit.canary_direction(key, j, params))]
                )
                self.assertAlmostEqual(float(np.linalg.norm(u)), 1.0, places=5)
                np.testing.assert_allclose(flat, 0.7 * u, rtol=1e-6, atol=1e-7)
            else:
                self.assertEqual(float(np.abs(flat).max()), 0.0)

    def test_scores_are_inner_products(self):
        key = jax.random.key(5)
        params = {"a": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.float32)}
        change = jax.tree.map(lambda x: x * 0.5 - 1.0, params)
        got = audit.canary_scores(key, change, 7, batch_size=3)
        for j in range(7):
            u = audit.canary_direction(key, j, params)
            want = sum(float(np.vdot(u[k], change[k])) for k in params)
            self.assertAlmostEqual(got[j], want, places=5)

    def test_non_user_level_dp_is_refused(self):
        data = _data()
        model = fedjax_dp.get_model("logistic", data.feature_shape, data.num_classes)
        with self.assertRaisesRegex(ValueError, "user-level"):
            audit.build_canary_auditor(
                fedjax_dp.AlgorithmConfig(name="fedavg"),
                model,
                data,
                num_canaries=10,
                key=jax.random.key(0),
            )


class FixedSizeAuditTest(absltest.TestCase):
    """Fixed size: a zero-delta canary keeps its slot, so the audit accounts replace-one."""

    def test_rounds_are_accounted_under_replace_one(self):
        fixed = accounting.RoundPrivacy(1.5, "fixed", 50, cohort_size=10)
        poisson = accounting.RoundPrivacy(1.5, "poisson", 50, sampling_rate=0.2)
        got = audit.audited_round_privacy([fixed, poisson])
        self.assertEqual(got[0].neighboring_relation, "replace_one_user")
        self.assertEqual(got[1], poisson)
        data = _data()
        model = fedjax_dp.get_model("logistic", data.feature_shape, data.num_classes)
        cfg = dataclasses.replace(_config(), sampling="fixed", sampling_rate=None, cohort_size=5)
        auditor = audit.build_canary_auditor(
            cfg, model, data, num_canaries=20, key=jax.random.key(0)
        )
        result = auditor.run(rounds=2, key=jax.random.key(1), delta=1e-5)
        rdp = dp_accounting.rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        rdp.compose(
            dp_accounting.SampledWithoutReplacementDpEvent(
                30, 5, dp_accounting.GaussianDpEvent(4.0 / 2)
            ),
            2,
        )
        self.assertAlmostEqual(result.accounted_epsilon, rdp.get_epsilon(1e-5), places=6)
        with self.assertRaisesRegex(ValueError, "accountant='rdp'"):
            auditor.run(rounds=2, key=jax.random.key(1), delta=1e-5, accountant="pld")


class AuditTest(absltest.TestCase):
    """One compiled auditor; the runs differ only in traced hparams (no recompilation)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        data = _data()
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=[64])
        cls.auditor = audit.build_canary_auditor(
            _config(), model, data, num_canaries=500, key=jax.random.key(0)
        )
        cls.claimed = {k: float(v) for k, v in cls.auditor.sim.make_hparams().items()}

    def _run(self, fault, seed=1):
        train, norm = audit.fault_hparams(fault, self.claimed)
        return self.auditor.run(
            rounds=4,
            key=jax.random.key(seed),
            delta=1e-5,
            train_hparams=train,
            canary_norm=norm,
        )

    def test_correct_run_stays_below_the_accounted_epsilon(self):
        for seed in (1, 2, 3):
            result = self._run("none", seed)
            # 4 Gaussian rounds at sigma 4 (q = 1), RDP at delta 1e-5, from dp_accounting.
            rdp = dp_accounting.rdp.RdpAccountant()
            rdp.compose(dp_accounting.GaussianDpEvent(4.0), 4)
            self.assertAlmostEqual(result.accounted_epsilon, rdp.get_epsilon(1e-5), places=6)
            self.assertLess(result.epsilon_lower_bound, result.accounted_epsilon)
            self.assertBetween(result.num_included, 200, 300)

    def test_noise_divided_by_ten_is_detected(self):
        result = self._run("noise_div_10")
        self.assertEqual(result.train_hparams["noise_multiplier"], 0.4)
        self.assertEqual(result.claimed_hparams["noise_multiplier"], 4.0)
        self.assertGreater(result.epsilon_lower_bound, result.accounted_epsilon)

    def test_clipping_off_is_detected(self):
        result = self._run("no_clipping")
        self.assertEqual(result.canary_norm, 30.0)
        self.assertGreater(result.epsilon_lower_bound, result.accounted_epsilon)

    def test_canaries_are_scored_by_their_signal(self):
        result = self._run("noise_div_10")
        # 4 rounds x clip norm 1 / public denominator q (K + m) = 510, times the server step
        # rescaling (K + m) / K = 51: as if divided by the 10 real clients.
        self.assertAlmostEqual(result.server_lr_factor, 51.0)
        signal = 4 * 1.0 / 10
        inc = result.included
        self.assertAlmostEqual(np.mean(result.scores[inc]), signal, delta=0.2 * signal)
        self.assertAlmostEqual(np.mean(result.scores[~inc]), 0.0, delta=0.2 * signal)


class AuditCommandTest(absltest.TestCase):
    def test_audit_command_prints_table_and_writes_json(self):
        out = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        path = os.path.join(out, "audit.json")
        argv = [
            "audit",
            os.path.join(os.path.dirname(__file__), "..", "experiments", "audit_sweep.toml"),
            "--run.rounds",
            "3",
            "--run.progress",
            "false",
            "--model.hidden",
            "16",
            "--algorithm.local_epochs",
            "1",
            "--audit.canaries",
            "100",
            "--audit.noise_multipliers",
            "0,2",
            "--audit.output",
            path,
        ]
        logs = []
        orig = audit.run_audit

        def run_audit(cfg, **kw):
            return orig(cfg, log=logs.append, **kw)

        with absltest.mock.patch.object(audit, "run_audit", run_audit):
            self.assertEqual(cli.main(argv), 0)
        doc = json.loads(pathlib.Path(path).read_text())
        row, noisy = doc["rows"]
        self.assertEqual(row["noise_multiplier"], 0.0)
        self.assertEqual(row["accounted_epsilon"], float("inf"))  # no noise: no privacy
        self.assertEqual(row["num_canaries"], 100)
        self.assertGreater(row["epsilon_lower_bound"], 0.0)  # noiseless canaries stand out
        self.assertEqual((row["attack_held_in"], row["attack_held_out"]), (100, 100))
        self.assertEqual(doc["config"]["audit"]["canaries"], 100)
        text = "\n".join(logs)
        self.assertIn("noise multiplier 0: accounted epsilon inf, audited lower bound", text)
        self.assertIn("| noise multiplier | accounted epsilon", text)
        # Releasing every run: 2 canary runs (200 held-in clients + 100 canaries, q = 0.2) and
        # the 2 attack runs (the 100 held-in clients), 3 rounds each, on the same clients.
        canary_run = _testing.poisson_run_privacy(2.0, 200, 0.2)
        attack_run = _testing.poisson_run_privacy(2.0, 100, 0.2)
        self.assertAlmostEqual(
            noisy["accounted_epsilon"],
            accounting.epsilon(canary_run, rounds=3, delta=1e-5),
            places=9,
        )
        want = accounting.epsilon([(canary_run, 3), (attack_run, 3)], delta=1e-5)
        privacy = doc["privacy"]
        self.assertEqual(privacy["runs"], 4)
        self.assertEqual(privacy["epsilon_all_runs"], math.inf)  # noise multiplier 0 is one
        self.assertEqual(privacy["private_runs"], 2)
        self.assertAlmostEqual(privacy["epsilon_private_runs"], want, places=9)
        self.assertGreater(want, noisy["accounted_epsilon"])
        self.assertEqual(privacy["neighboring_relation"], "add_or_remove_one_user")
        self.assertIn("Releasing all 4 runs of this audit together", text)
        self.assertIn(f"the 2 runs with noise: epsilon = {want:.3f}", text)

    def test_table(self):
        rows = [
            dict(
                noise_multiplier=0.0,
                accounted_epsilon=float("inf"),
                epsilon_lower_bound=3.5,
                num_correct=200,
                num_guesses=200,
            ),
            dict(
                noise_multiplier=2.0,
                accounted_epsilon=5.25,
                epsilon_lower_bound=0.5,
                num_correct=60,
                num_guesses=100,
            ),
        ]
        table = audit.format_table(rows, delta=1e-5, significance=0.05).splitlines()
        self.assertLen(table, 4)
        self.assertIn("accounted epsilon (delta=1e-05)", table[0])
        self.assertIn("(95% conf.)", table[0])
        self.assertNotIn("attack", table[0])
        self.assertEqual(table[2], "| 0 | inf | 3.500 | 200 / 200 |")
        self.assertEqual(table[3], "| 2 | 5.250 | 0.500 | 60 / 100 |")

    def test_composition_of_the_runs(self):
        rp = accounting.RoundPrivacy(1.5, "fixed", 50, cohort_size=10)
        other = accounting.RoundPrivacy(3.0, "fixed", 60, cohort_size=10)
        cfg = experiment.load_config(None, {"privacy.delta": 1e-4})
        privacy = audit.composition([(1.5, [(rp, 5)]), (3.0, [(other, 5)])], cfg)
        want = accounting.epsilon([(rp, 5), (other, 5)], delta=1e-4)
        self.assertAlmostEqual(privacy["epsilon_all_runs"], want, places=12)
        self.assertEqual(privacy["neighboring_relation"], rp.neighboring_relation)
        self.assertNotIn("private_runs", privacy)
        footer = audit.composition_footer(privacy)
        self.assertEqual(
            footer,
            "Releasing all 2 runs of this audit together (same clients; delta=0.0001, rdp, "
            f"{rp.neighboring_relation}): epsilon = {want:.3f}. Each row's accounted epsilon "
            "is one canary run alone.",
        )
        table = audit.format_table([], delta=1e-4, significance=0.05, privacy=privacy)
        self.assertTrue(table.endswith(footer))

    def test_bad_noise_multipliers_name_the_option(self):
        code, text = _testing.cli_output(["audit", "--audit.noise_multipliers", "1,two"])
        self.assertEqual(code, 2)
        self.assertIn("audit.noise_multipliers", text)

    def test_bad_audit_option_is_one_clear_line(self):
        proc = _testing.cli_subprocess("audit", "--audit.fault", "typo")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("audit.fault", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_audit_help_lists_audit_options(self):
        code, text = _testing.cli_output(["audit", "--help"], stream="stdout")
        self.assertEqual(code, 0)
        for name in experiment.AuditConfig.__dataclass_fields__:
            self.assertIn(f"--audit.{name}", text)


if __name__ == "__main__":
    absltest.main()
