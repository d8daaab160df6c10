"""The privacy plan: every release of every round, combined per round, composed per unit."""

import dataclasses
import json
import math
import tempfile

import dp_accounting
from absl.testing import absltest, parameterized

import fedjax_dp
from fedjax_dp import accounting, experiment, privacy
from tests import _testing


def _sim(**kw):
    data = _testing.small_data(num_clients=20)
    model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(4,))
    defaults = dict(cohort_size=5, batch_size=3, local_epochs=1, chunk_size=5)
    defaults.update(kw)
    return fedjax_dp.build_simulation(fedjax_dp.AlgorithmConfig(**defaults), model, data)


def _host(hp):
    return {k: float(v) for k, v in hp.items()}


_FIXED = privacy.Sampling("fixed", num_clients=100, sampling_rate=None, cohort_size=10)
_POISSON = privacy.Sampling("poisson", num_clients=100, sampling_rate=0.1, cohort_size=20)


def _release(upload="delta", sigma=1.0, unit="user", mechanism="gaussian", hparam=None):
    return privacy.Release(
        upload=upload,
        unit=unit,
        mechanism=mechanism,
        noise_hparam=hparam or f"{upload}_noise_multiplier",
        noise_multiplier=sigma,
    )


class CombineTest(parameterized.TestCase):
    def test_gaussian_releases_on_one_sample_are_one_gaussian(self):
        # Without sampling, two Gaussian releases with sensitivity 1 in their own noise units
        # compose to exactly the Gaussian of the combined multiplier: same PLD epsilon.
        s1, s2 = 1.3, 2.1
        composed = dp_accounting.pld.PLDAccountant()
        composed.compose(
            dp_accounting.ComposedDpEvent(
                [dp_accounting.GaussianDpEvent(s1), dp_accounting.GaussianDpEvent(s2)]
            )
        )
        single = dp_accounting.pld.PLDAccountant()
        single.compose(dp_accounting.GaussianDpEvent(privacy.combined_gaussian([s1, s2])))
        self.assertAlmostEqual(composed.get_epsilon(1e-5), single.get_epsilon(1e-5), delta=2e-3)
        # Accounting only one of the two under-reports.
        alone = dp_accounting.pld.PLDAccountant()
        alone.compose(dp_accounting.GaussianDpEvent(s1))
        self.assertLess(alone.get_epsilon(1e-5), single.get_epsilon(1e-5) - 0.1)

    def test_combined_gaussian_values(self):
        self.assertAlmostEqual(privacy.combined_gaussian([1.0, 2.0]), 1.25**-0.5, places=14)
        self.assertEqual(privacy.combined_gaussian([3.0]), 3.0)
        self.assertEqual(privacy.combined_gaussian([1.0, 0.0]), 0.0)

    @parameterized.parameters(_FIXED, _POISSON)
    def test_two_user_releases_do_not_collapse(self, sampling):
        one = privacy.round_privacy([_release("delta", 1.0)], sampling)
        two = privacy.round_privacy([_release("delta", 1.0), _release("control", 2.0)], sampling)
        self.assertLen(two, 1)
        self.assertAlmostEqual(two[0].noise_multiplier, 1.25**-0.5, places=12)
        eps = [accounting.epsilon(rp, rounds=10, delta=1e-5) for rp in (one[0], two[0])]
        self.assertGreater(eps[1], eps[0])

    def test_poisson_facts_reach_the_round(self):
        (rp,) = privacy.round_privacy(
            [_release()], dataclasses.replace(_POISSON, upload_probability=0.5)
        )
        self.assertEqual(
            (rp.sampling, rp.sampling_rate, rp.max_cohort_size, rp.upload_probability),
            ("poisson", 0.1, 20, 0.5),
        )
        (fixed,) = privacy.round_privacy([_release()], _FIXED)
        self.assertEqual((fixed.cohort_size, fixed.max_cohort_size), (10, None))

    def test_example_release_is_its_own_label(self):
        example = dataclasses.replace(_release("delta", 0.8, unit="example"), compositions=3)
        rps = privacy.round_privacy([_release("delta", 1.0), example], _FIXED)
        self.assertEqual([rp.unit for rp in rps], ["user", "example"])
        self.assertEqual(rps[1].compositions, 3)
        self.assertEqual(rps[1].noise_multiplier, 0.8)

    @parameterized.parameters("laplace", "local_gaussian")
    def test_mixed_user_mechanisms_are_refused(self, mechanism):
        with self.assertRaisesRegex(ValueError, "several user-level releases.*one mechanism"):
            privacy.round_privacy(
                [_release("delta", 1.0), _release("control", 1.0, mechanism=mechanism)], _FIXED
            )
        with self.assertRaisesRegex(ValueError, "several user-level releases"):
            privacy.round_privacy(
                [_release("a", 1.0, mechanism=mechanism), _release("b", 1.0, mechanism=mechanism)],
                _FIXED,
            )


class SimulationReleasesTest(absltest.TestCase):
    def test_scaffold_declares_both_releases(self):
        sim = _sim(
            name="scaffold", clip_norm=0.5, noise_multiplier=1.0, control_noise_multiplier=2.0
        )
        hp = _host(sim.make_hparams())
        self.assertCountEqual(
            [(r.upload, r.noise_hparam, r.noise_multiplier) for r in sim.releases(hp)],
            [("delta", "noise_multiplier", 1.0), ("control", "control_noise_multiplier", 2.0)],
        )
        (rp,) = sim.round_privacy(hp)
        self.assertAlmostEqual(rp.noise_multiplier, 1.25**-0.5, places=12)

    def test_dp_sgd_declares_an_example_release(self):
        sim = _sim(name="dp_sgd_fedavg", local_epochs=2)
        (release,) = sim.releases(_host(sim.make_hparams()))
        self.assertEqual(
            (release.unit, release.noise_hparam, release.compositions),
            ("example", "example_noise_multiplier", 2),
        )

    def test_non_private_run_releases_nothing_accounted(self):
        sim = _sim(name="fedavg")
        self.assertEqual(sim.releases(_host(sim.make_hparams())), ())
        self.assertEqual(sim.round_privacy(_host(sim.make_hparams())), [])


class PlanTest(absltest.TestCase):
    def _cfg(self, **privacy_overrides):
        overrides = {"data.num_clients": 20, "run.rounds": 6}
        overrides.update({f"privacy.{k}": v for k, v in privacy_overrides.items()})
        return experiment.load_config(None, overrides)

    def _plan(self, sim, cfg):
        lines = []
        plan = privacy.build_plan(
            cfg.privacy, sim, sim.make_hparams(), cfg.run.rounds, lines.append
        )
        return plan, lines

    def test_rows_are_the_accountants(self):
        sim = _sim(name="dp_fedavg", noise_multiplier=1.1, clip_norm=0.5)
        cfg = self._cfg()
        plan, _ = self._plan(sim, cfg)
        reference = accounting.Accountant(delta=cfg.privacy.delta)
        (rp,) = sim.round_privacy(_host(sim.make_hparams()))
        for r in range(cfg.run.rounds):
            row = plan.compose(r)
            reference.compose(rp, 1)
            self.assertEqual(row["epsilon_user"], reference.epsilon())
            self.assertEqual(row["neighboring_relation"], "add_or_remove_one_user")
            self.assertEqual(row["neighboring_relation_user"], "add_or_remove_one_user")
            self.assertEqual(row["delta"], cfg.privacy.delta)
        # Fresh accountants give the same epsilon; the plan's own are left alone.
        self.assertEqual(plan.epsilons(cfg.run.rounds), {"user": reference.epsilon()})
        self.assertEqual(plan.accountants["user"].epsilon(), reference.epsilon())
        # A second release of the same rounds (another seed) costs more.
        schedule = plan.schedule(cfg.run.rounds, count=2)["user"]
        self.assertGreater(privacy.composed_epsilon(schedule, cfg.privacy), reference.epsilon())

    def test_replay_is_bit_identical(self):
        sim = _sim(name="dp_fedavg", noise_multiplier=1.1, clip_norm=0.5)
        cfg = self._cfg(noise_schedule="linear", noise_end_ratio=0.5, noise_schedule_stages=3)
        plan, lines = self._plan(sim, cfg)
        rows = [plan.compose(r) for r in range(cfg.run.rounds)]
        again, _ = self._plan(sim, cfg)
        again.replay(cfg.run.rounds)
        self.assertEqual(
            again.accountants["user"].state_dict(), plan.accountants["user"].state_dict()
        )
        self.assertEqual(again.accountants["user"].epsilon(), rows[-1]["epsilon_user"])
        self.assertIn("noise schedule: linear", "\n".join(lines))

    def test_schedule_releases_match_what_the_round_adds(self):
        sim = _sim(name="dp_fedavg", noise_multiplier=1.0, clip_norm=0.5)
        cfg = self._cfg(noise_schedule="geometric", noise_end_ratio=0.25, noise_schedule_stages=0)
        plan, _ = self._plan(sim, cfg)
        for r in range(cfg.run.rounds):
            (release,) = plan.releases_at(r)
            added = float(plan.hparams_at(r)["noise_multiplier"])
            self.assertEqual(release.noise_multiplier, added)
            # The round adds at least what is accounted.
            self.assertGreaterEqual(added, plan.round_privacy(r)["user"].noise_multiplier)
        self.assertLess(
            plan.releases_at(5)[0].noise_multiplier, plan.releases_at(0)[0].noise_multiplier
        )

    def test_schedules_need_one_release(self):
        sim = _sim(
            name="scaffold", clip_norm=0.5, noise_multiplier=1.0, control_noise_multiplier=2.0
        )
        with self.assertRaisesRegex(ValueError, "exactly one DP mechanism.*2 releases"):
            self._plan(sim, self._cfg(target_epsilon=3.0))

    def test_run_summary_lists_the_releases(self):
        with tempfile.TemporaryDirectory() as d:
            cfg = experiment.load_config(
                None,
                {
                    "data.num_clients": 20,
                    "run.rounds": 2,
                    "run.progress": False,
                    "run.output_dir": d,
                    "run.checkpoint_every": 0,
                    "algorithm.name": "scaffold",
                    "algorithm.cohort_size": 5,
                    "algorithm.batch_size": 4,
                    "algorithm.clip_norm": 0.5,
                    "algorithm.noise_multiplier": 1.0,
                    "algorithm.control_noise_multiplier": 2.0,
                },
            )
            result = experiment.run(cfg, log=lambda *_: None)
            summary = json.loads((result.output_dir / "summary.json").read_text())
        self.assertCountEqual(
            [(r["upload"], r["noise_multiplier"]) for r in summary["releases"]],
            [("delta", 1.0), ("control", 2.0)],
        )
        self.assertTrue(math.isfinite(summary["epsilon_user"]))


if __name__ == "__main__":
    absltest.main()
