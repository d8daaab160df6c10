"""Tests for noise calibration, noise schedules and the noise-cohort trick.

``fedjax_dp.accounting.calibrate``, ``noise_schedule``, ``privacy_schedule``, ``noise_cohort``
and their use by the experiment runner (``privacy.target_epsilon``, ``privacy.noise_schedule``,
``privacy.noise_cohort_size``).
"""

import dataclasses
import itertools
import json
import math
import pathlib
import shutil
import tempfile
from unittest import mock

import dp_accounting
import numpy as np
from absl.testing import absltest, parameterized
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from fedjax_dp import accounting, experiment, privacy
from tests import _testing

DELTA = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "digits_dp_fedavg.toml"


def _poisson(sigma, q, num_clients=60000, **kwargs):
    return accounting.RoundPrivacy(sigma, "poisson", num_clients, sampling_rate=q, **kwargs)


def _epsilon_of(sigma, rounds, **kw):
    """Epsilon of ``rounds`` rounds described by calibrate-style keyword arguments."""
    acct = {k: kw.pop(k) for k in ("delta", "accountant", "conversion") if k in kw}
    rp = accounting.RoundPrivacy(sigma, **kw)
    return accounting.epsilon(rp, rounds=rounds, **{"delta": DELTA, **acct})


# Small settings (calibration evaluates the accountant about ten times).
CASES = {
    "user_poisson_rdp": dict(sampling="poisson", num_clients=1000, sampling_rate=0.05),
    "user_fixed_rdp": dict(sampling="fixed", num_clients=1000, cohort_size=50),
    "example_poisson_rdp": dict(
        sampling="poisson", num_clients=1000, sampling_rate=0.05, unit="example", compositions=2
    ),
    "user_poisson_pld": dict(
        sampling="poisson", num_clients=1000, sampling_rate=0.05, accountant="pld"
    ),
    "example_fixed_pld": dict(
        sampling="fixed", num_clients=100, cohort_size=10, unit="example", accountant="pld"
    ),
    "user_poisson_classic": dict(
        sampling="poisson", num_clients=1000, sampling_rate=0.05, conversion="classic"
    ),
    # Fixed-size rounds under add/remove, now with PLD too; and a cap on a Poisson cohort that
    # truncates it in a quarter of the rounds.
    "user_fixed_pld": dict(sampling="fixed", num_clients=1000, cohort_size=50, accountant="pld"),
    "user_fixed_replace_one_rdp": dict(
        sampling="fixed", num_clients=1000, cohort_size=50, relation="replace_one_user"
    ),
    "user_poisson_capped_rdp": dict(
        sampling="poisson", num_clients=1000, sampling_rate=0.05, max_cohort_size=55
    ),
    "laplace_fixed_rdp": dict(
        sampling="fixed", num_clients=1000, cohort_size=50, mechanism="laplace"
    ),
}


class CalibrateTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(name, case) for name, case in CASES.items()])
    def test_round_trip(self, case):
        rounds, target, tol = 30, 2.0, 1e-3
        sigma = accounting.calibrate(target, delta=DELTA, rounds=rounds, tolerance=tol, **case)
        eps = _epsilon_of(sigma, rounds, **case)
        self.assertLessEqual(eps, target)  # never above the target
        self.assertGreater(eps, target * 0.99)  # and close to it
        # A slightly smaller sigma (below the smallest feasible one) exceeds the target.
        self.assertGreater(_epsilon_of(sigma * (1 - 2 * tol), rounds, **case), target)

    def test_tight_tolerance(self):
        case, tol = CASES["user_poisson_rdp"], 1e-6
        sigma = accounting.calibrate(3.0, delta=DELTA, rounds=50, tolerance=tol, **case)
        self.assertLessEqual(_epsilon_of(sigma, 50, **case), 3.0)
        self.assertGreater(_epsilon_of(sigma * (1 - 2 * tol), 50, **case), 3.0)

    @parameterized.named_parameters(
        # The published settings of accounting_test.PublishedValuesTest, inverted: calibrating to
        # the epsilon of the published sigma gives that sigma back.
        ("tf_privacy_mnist", 1.1, 256 / 60000, math.ceil(60 * 60000 / 256), "classic"),
        ("abadi_et_al", 4.0, 0.01, 10000, "classic"),
        ("opacus", 1.5, 0.04, 2250, "improved"),
    )
    def test_inverts_published_settings(self, sigma, q, steps, conversion):
        target = accounting.epsilon(
            _poisson(sigma, q), rounds=steps, delta=DELTA, conversion=conversion
        )
        got = accounting.calibrate(
            target,
            delta=DELTA,
            rounds=steps,
            sampling="poisson",
            num_clients=60000,
            sampling_rate=q,
            conversion=conversion,
        )
        self.assertAlmostEqual(got, sigma, delta=2e-3 * sigma)

    def test_published_targets(self):
        # TF-Privacy MNIST: eps 3.01 (classic) at sigma 1.1, so 3.01 needs sigma just below 1.1.
        sigma = accounting.calibrate(
            3.01,
            tolerance=1e-5,
            delta=DELTA,
            rounds=math.ceil(60 * 60000 / 256),
            sampling="poisson",
            num_clients=60000,
            sampling_rate=256 / 60000,
            conversion="classic",
        )
        self.assertLess(sigma, 1.1)
        self.assertGreater(sigma, 1.09)

    def test_monotone(self):
        case = CASES["user_poisson_rdp"]
        kw = {"delta": DELTA, "tolerance": 1e-2, **case}
        by_target = [accounting.calibrate(t, rounds=40, **kw) for t in (0.5, 2.0, 8.0)]
        self.assertTrue(all(a > b for a, b in itertools.pairwise(by_target)), by_target)
        by_rounds = [accounting.calibrate(2.0, rounds=r, **kw) for r in (5, 50)]
        self.assertTrue(all(a < b for a, b in itertools.pairwise(by_rounds)), by_rounds)
        by_rate = [
            accounting.calibrate(2.0, rounds=40, **{**kw, "sampling_rate": q}) for q in (0.02, 0.2)
        ]
        self.assertTrue(all(a < b for a, b in itertools.pairwise(by_rate)), by_rate)

    def test_tighter_accounting_needs_less_noise(self):
        kw = {"delta": DELTA, "rounds": 30, **CASES["user_poisson_rdp"]}
        improved = accounting.calibrate(2.0, **kw)
        classic = accounting.calibrate(2.0, conversion="classic", **kw)
        pld = accounting.calibrate(2.0, accountant="pld", **kw)
        self.assertLess(improved, classic)
        self.assertLess(pld, improved)

    def test_constant_profile_equals_homogeneous(self):
        kw = {"delta": DELTA, "rounds": 20, **CASES["user_poisson_rdp"]}
        self.assertEqual(
            accounting.calibrate(2.0, noise_profile=[1.0] * 20, **kw),
            accounting.calibrate(2.0, **kw),
        )

    def test_profile_round_trip(self):
        # (PLD composes a schedule the same way: ScheduleTest checks it against dp_accounting.)
        accountant, target, rounds, tol = "rdp", 2.0, 8, 1e-3
        profile = accounting.noise_schedule("linear", start=1.0, end=0.5, rounds=rounds, stages=2)
        case = {**CASES["user_poisson_rdp"], "accountant": accountant}
        sigma = accounting.calibrate(
            target, delta=DELTA, rounds=rounds, noise_profile=profile, **case
        )

        def eps(scale):
            rp = _poisson(1.0, 0.05, 1000)
            schedule = accounting.privacy_schedule(rp, [scale * f for f in profile])
            return accounting.epsilon(schedule, delta=DELTA, accountant=accountant)

        self.assertLessEqual(eps(sigma), target)
        self.assertGreater(eps(sigma), 0.99 * target)
        self.assertGreater(eps(sigma * (1 - 2 * tol)), target)

    @parameterized.parameters("laplace", "local_gaussian")
    def test_other_mechanisms(self, mechanism):
        case = {**CASES["user_poisson_rdp"], "mechanism": mechanism}
        sigma = accounting.calibrate(5.0, delta=DELTA, rounds=20, **case)
        self.assertLessEqual(_epsilon_of(sigma, 20, **case), 5.0)
        self.assertGreater(_epsilon_of(sigma * 0.99, 20, **case), 5.0)

    def test_huge_target_returns_the_floor(self):
        sigma = accounting.calibrate(
            1e12, delta=DELTA, rounds=1, sampling="poisson", num_clients=10, sampling_rate=1.0
        )
        self.assertEqual(sigma, accounting.MIN_CALIBRATED_NOISE_MULTIPLIER)

    @parameterized.named_parameters(
        ("zero_target", {"target_epsilon": 0.0}, "target_epsilon"),
        ("negative_target", {"target_epsilon": -1.0}, "target_epsilon"),
        ("nan_target", {"target_epsilon": float("nan")}, "target_epsilon"),
        ("inf_target", {"target_epsilon": float("inf")}, "target_epsilon"),
        ("string_target", {"target_epsilon": "2"}, "target_epsilon"),
        ("bad_delta", {"delta": 0.0}, "delta"),
        ("zero_rounds", {"rounds": 0}, "rounds"),
        ("float_rounds", {"rounds": 10.0}, "rounds"),
        ("zero_tolerance", {"tolerance": 0.0}, "tolerance"),
        ("big_tolerance", {"tolerance": 1.0}, "tolerance"),
        ("bad_max", {"max_noise_multiplier": -1.0}, "max_noise_multiplier"),
        ("bad_sampling", {"sampling": "uniform"}, "sampling"),
        ("missing_rate", {"sampling_rate": None}, "sampling_rate"),
        ("bad_unit", {"unit": "client"}, "unit"),
        ("bad_accountant", {"accountant": "moments"}, "accountant"),
        ("classic_pld", {"accountant": "pld", "conversion": "classic"}, "conversion"),
        ("short_profile", {"noise_profile": [1.0] * 3}, "noise_profile"),
        ("zero_in_profile", {"noise_profile": [1.0] * 9 + [0.0]}, "noise_profile"),
        ("nan_in_profile", {"noise_profile": [float("nan")] * 10}, "noise_profile"),
        (
            "fixed_user_replace_one_pld",
            {
                "sampling": "fixed",
                "sampling_rate": None,
                "cohort_size": 5,
                "accountant": "pld",
                "relation": "replace_one_user",
            },
            "accountant='rdp'",
        ),
        (
            "cap_with_fixed",
            {"max_cohort_size": 5, "sampling": "fixed", "sampling_rate": None, "cohort_size": 5},
            "max_cohort_size",
        ),
        ("bad_relation", {"relation": "replace_one_user"}, "relation"),
        (
            "unreachable",
            {"target_epsilon": 0.01, "max_noise_multiplier": 2.0},
            "target_epsilon=0.01 is not reachable.*max_noise_multiplier=2.0",
        ),
    )
    def test_errors_name_the_argument(self, override, pattern):
        kwargs = {
            "target_epsilon": 2.0,
            "delta": DELTA,
            "rounds": 10,
            "sampling": "poisson",
            "num_clients": 100,
            "sampling_rate": 0.1,
        }
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, pattern):
            accounting.calibrate(kwargs.pop("target_epsilon"), **kwargs)

    def test_unreachable_below_what_rdp_can_certify(self):
        # Whatever the noise, RDP over finite orders cannot certify an arbitrarily small epsilon.
        with self.assertRaisesRegex(ValueError, "not reachable"):
            accounting.calibrate(
                1e-4, delta=DELTA, rounds=1, sampling="poisson", num_clients=100, sampling_rate=1.0
            )


class ScheduleTest(parameterized.TestCase):
    def test_values(self):
        s = accounting.noise_schedule
        self.assertEqual(s("constant", start=1.5, rounds=3), (1.5, 1.5, 1.5))
        self.assertEqual(s("linear", start=2.0, end=1.0, rounds=3), (2.0, 1.5, 1.0))
        self.assertEqual(
            s("linear", start=2.0, end=1.0, rounds=6, stages=3),
            (2.0,) * 2 + (1.5,) * 2 + (1.0,) * 2,
        )
        geo = s("geometric", start=4.0, end=1.0, rounds=3)
        self.assertEqual(geo, (4.0, 2.0, 1.0))
        self.assertEqual(s("linear", start=2.0, end=1.0, rounds=1), (2.0,))
        self.assertEqual(s("linear", start=2.0, end=1.0, rounds=5, stages=1), (2.0,) * 5)
        # More stages than rounds: one value per round. Uneven blocks cover every round.
        self.assertEqual(s("linear", start=1.0, end=3.0, rounds=3, stages=50), (1.0, 2.0, 3.0))
        uneven = s("geometric", start=1.0, end=0.1, rounds=10, stages=3)
        self.assertLen(uneven, 10)
        self.assertEqual([len(list(g)) for _, g in itertools.groupby(uneven)], [4, 3, 3])
        self.assertEqual((uneven[0], uneven[-1]), (1.0, 0.1))
        growing = s("geometric", start=0.5, end=2.0, rounds=100)
        self.assertTrue(all(a < b for a, b in itertools.pairwise(growing)))
        self.assertEqual(growing[-1], 2.0)

    @parameterized.named_parameters(
        ("kind", {"kind": "cosine"}, "kind"),
        ("start", {"start": 0.0}, "start"),
        ("start_nan", {"start": float("nan")}, "start"),
        ("end", {"end": -1.0}, "end"),
        ("end_inf", {"end": float("inf")}, "end"),
        ("rounds", {"rounds": 0}, "rounds"),
        ("stages", {"stages": 0}, "stages"),
        ("constant_end", {"kind": "constant", "end": 2.0}, "end"),
    )
    def test_errors(self, override, pattern):
        kwargs = {"kind": "linear", "start": 1.0, "end": 0.5, "rounds": 10}
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, pattern):
            accounting.noise_schedule(kwargs.pop("kind"), **kwargs)

    def test_privacy_schedule_merges_runs(self):
        rp = _poisson(1.0, 0.01, unit="example", compositions=2)
        got = accounting.privacy_schedule(rp, [2.0, 2.0, 1.0, 2.0])
        self.assertEqual(
            got,
            [
                (dataclasses.replace(rp, noise_multiplier=2.0), 2),
                (dataclasses.replace(rp, noise_multiplier=1.0), 1),
                (dataclasses.replace(rp, noise_multiplier=2.0), 1),
            ],
        )
        self.assertEqual(accounting.privacy_schedule(rp, []), [])
        with self.assertRaisesRegex(ValueError, "round_privacy"):
            accounting.privacy_schedule(dp_accounting.GaussianDpEvent(1.0), [1.0])

    @parameterized.parameters("rdp", "pld")
    def test_schedule_equals_explicit_heterogeneous_composition(self, accountant):
        q, rounds = 0.02, 20
        sigmas = accounting.noise_schedule("geometric", start=2.0, end=1.0, rounds=rounds, stages=4)
        schedule = accounting.privacy_schedule(_poisson(1.0, q), sigmas)
        self.assertEqual(sum(n for _, n in schedule), rounds)
        self.assertLen(schedule, 4)
        got = accounting.epsilon(schedule, delta=DELTA, accountant=accountant)
        # Round by round into an Accountant ...
        acc = accounting.Accountant(delta=DELTA, accountant=accountant)
        for s in sigmas:
            acc.compose(_poisson(s, q))
        self.assertEqual(acc.epsilon(), got)
        # ... and dp_accounting on the composed event.
        event = dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n
                )
                for s, n in ((rp.noise_multiplier, n) for rp, n in schedule)
            ]
        )
        if accountant == "rdp":
            ref = rdp_lib.RdpAccountant(list(accounting.RDP_ORDERS))
        else:
            ref = dp_accounting.pld.PLDAccountant(
                value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION_INTERVAL
            )
        self.assertAlmostEqual(got, ref.compose(event).get_epsilon(DELTA), places=6)

    @parameterized.product(accountant=["rdp", "pld"], unit=["user", "example"])
    def test_decaying_schedule_between_constant_start_and_end(self, accountant, unit):
        rounds, start, end = 30, 2.0, 1.0
        rp = _poisson(1.0, 0.05, 1000, unit=unit)
        kw = {"delta": DELTA, "accountant": accountant}
        sigmas = accounting.noise_schedule("linear", start=start, end=end, rounds=rounds, stages=3)
        decaying = accounting.epsilon(accounting.privacy_schedule(rp, sigmas), **kw)
        low = accounting.epsilon(
            dataclasses.replace(rp, noise_multiplier=start), rounds=rounds, **kw
        )
        high = accounting.epsilon(
            dataclasses.replace(rp, noise_multiplier=end), rounds=rounds, **kw
        )
        self.assertLess(low, decaying)
        self.assertLess(decaying, high)


class NoiseCohortTest(parameterized.TestCase):
    def test_poisson_keeps_rate_and_matches_noise_on_mean(self):
        simulated = _poisson(1.2, 0.1, 300)  # expected cohort 30
        sigma_sim, deployment = accounting.noise_cohort(simulated, noise_cohort_size=3000)
        self.assertAlmostEqual(sigma_sim, 1.2 * 30 / 3000)
        self.assertEqual(deployment.noise_multiplier, 1.2)
        self.assertEqual(deployment.num_clients, 30000)
        self.assertAlmostEqual(deployment.sampling_rate, 0.1)
        self.assertEqual((deployment.sampling, deployment.unit), ("poisson", "user"))
        # Noise std on the mean, per unit of clip norm: simulated sum / m, deployment sum / M.
        self.assertAlmostEqual(sigma_sim / 30, deployment.noise_multiplier / 3000)
        sim_eps = accounting.epsilon(
            dataclasses.replace(simulated, noise_multiplier=sigma_sim), rounds=10, delta=DELTA
        )
        dep_eps = accounting.epsilon(deployment, rounds=10, delta=DELTA)
        self.assertGreater(sim_eps, 100 * dep_eps)  # the simulated run is far less protected

    def test_fixed_with_population(self):
        simulated = accounting.RoundPrivacy(1.0, "fixed", 200, cohort_size=20)
        sigma_sim, deployment = accounting.noise_cohort(
            simulated, noise_cohort_size=500, population=10**6
        )
        self.assertAlmostEqual(sigma_sim, 20 / 500)
        self.assertEqual(deployment, accounting.RoundPrivacy(1.0, "fixed", 10**6, cohort_size=500))
        _, default = accounting.noise_cohort(simulated, noise_cohort_size=500)
        self.assertEqual(default.num_clients, 5000)  # keeps the participation rate 0.1

    @parameterized.named_parameters(
        ("example_level", {"unit": "example"}, {}, "example-level"),
        ("local_dp", {"mechanism": "local_gaussian"}, {}, "mechanism"),
        ("smaller_cohort", {}, {"noise_cohort_size": 5}, "noise_cohort_size"),
        ("zero_cohort", {}, {"noise_cohort_size": 0}, "noise_cohort_size"),
        ("small_population", {}, {"population": 100}, "population"),
    )
    def test_errors(self, rp_kw, kw, pattern):
        simulated = _poisson(1.0, 0.1, 300, **rp_kw)
        with self.assertRaisesRegex(ValueError, pattern):
            accounting.noise_cohort(simulated, **{"noise_cohort_size": 3000, **kw})
        with self.assertRaisesRegex(ValueError, "simulated"):
            accounting.noise_cohort(dp_accounting.GaussianDpEvent(1.0), noise_cohort_size=10)


def _tiny(**overrides):
    """The demo config shrunk to a few seconds: 60 clients, 4 rounds."""
    base = {
        "run.rounds": 4,
        "run.eval_every": 2,
        "run.progress": False,
        "data.num_clients": 60,
        "model.hidden": [8],
        "algorithm.local_epochs": 1,
    }
    return experiment.load_config(DEMO, {**base, **overrides})


def _spy_run(test, cfg, *, write=False):
    """Runs ``cfg``, recording the noise multiplier every round received and the jitted round."""
    seen, jitted, lines = [], [], []
    real = experiment.build_simulation

    def spy(*args, **kwargs):
        sim = real(*args, **kwargs)
        fn = sim.round.round_fn
        jitted.append(fn)
        key = "noise_multiplier" if sim.config.user_dp else "example_noise_multiplier"

        def round_fn(state, data, hparams, round_key, *rest):
            seen.append(np.asarray(hparams[key]))  # a host sync, fine in a test
            return fn(state, data, hparams, round_key, *rest)

        return dataclasses.replace(sim, round=sim.round._replace(round_fn=round_fn))

    with mock.patch.object(experiment, "build_simulation", spy):
        result = experiment.run(cfg, write=write, log=lines.append)
    test.assertLen(jitted, 1)
    return result, seen, jitted[0], "\n".join(map(str, lines))


class ExperimentTest(parameterized.TestCase):
    def test_run_calibrates_a_schedule_with_the_noise_cohort_trick(self):
        """One user-level run with all three options (one compilation)."""
        out = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        cfg = _tiny(
            **{
                "run.output_dir": out,
                "privacy.target_epsilon": 4.0,
                "privacy.noise_schedule": "linear",
                "privacy.noise_end_ratio": 0.5,
                "privacy.noise_schedule_stages": 2,
                "privacy.noise_cohort_size": 600,  # simulated: expected cohort 6 of 60
            }
        )
        result, seen, jitted, log = _spy_run(self, cfg, write=True)
        sigma = result.final["calibrated_noise_multiplier"]
        self.assertIn(f"calibrated user-level noise multiplier {sigma:.4f} (first round)", log)
        self.assertIn("noise schedule: linear", log)
        self.assertIn("CAVEAT", log)
        self.assertIn("NOT of this simulated run", log)
        # Accounted: the deployment's schedule (600 of 6000 clients, rate 0.1), within the target.
        accounted = [sigma, sigma, sigma / 2, sigma / 2]
        self.assertEqual([h["noise_multiplier"] for h in result.history], accounted)
        deployment = accounting.privacy_schedule(_poisson(1.0, 0.1, 6000), accounted)
        eps = [h["epsilon_user"] for h in result.history]
        self.assertAlmostEqual(
            eps[-1], accounting.epsilon(deployment, delta=cfg.privacy.delta), places=12
        )
        self.assertLessEqual(eps[-1], 4.0)
        self.assertGreater(eps[-1], 0.99 * 4.0)
        # Added: sigma_t * m / M as float32, never below it; one trace for all rounds.
        added = [float(x) for x in seen]
        self.assertEqual([x.dtype for x in seen], [np.float32] * 4)
        for a, s in zip(added, accounted):
            self.assertGreaterEqual(a, s * 6 / 600)
            self.assertLess(a, s * 6 / 600 * (1 + 1e-6))
        self.assertEqual(jitted._cache_size(), 1)
        # The simulated run's own, much weaker, guarantee is reported too.
        simulated = accounting.privacy_schedule(_testing.poisson_run_privacy(1.0, 60, 0.1), added)
        final = result.final
        self.assertAlmostEqual(
            final["epsilon_user_simulated"],
            accounting.epsilon(simulated, delta=cfg.privacy.delta),
            places=12,
        )
        self.assertGreater(final["epsilon_user_simulated"], 100 * final["epsilon_user"])
        summary = json.loads((pathlib.Path(out) / "summary.json").read_text())
        self.assertEqual(summary["calibrated_noise_multiplier"], sigma)
        self.assertEqual((summary["noise_cohort_size"], summary["noise_population"]), (600, 6000))

    @parameterized.named_parameters(
        ("user_level", "user", "noise_multiplier", {}),
        (
            "example_level",
            "example",
            "example_noise_multiplier",
            {
                "algorithm.name": "dp_sgd_fedavg",
                "algorithm.clip_norm": None,
                "algorithm.noise_multiplier": None,
            },
        ),
    )
    def test_plan_calibrates_and_schedules(self, unit, key, algorithm):
        """The run's privacy plan, without training: what each round gets and accounts."""
        cfg = _tiny(
            **{
                **algorithm,
                "run.rounds": 6,
                "privacy.target_epsilon": 3.0,
                "privacy.noise_schedule": "geometric",
                "privacy.noise_end_ratio": 0.25,
                "privacy.noise_schedule_stages": 3,
            }
        )
        train, _ = experiment.load_data(cfg)
        model = experiment.make_model(cfg, train.feature_shape, train.num_classes)
        sim = experiment.build_simulation(experiment.algorithm_config(cfg), model, train)
        lines = []
        plan = privacy.build_plan(
            cfg.privacy, sim, sim.make_hparams(), cfg.run.rounds, lines.append
        )
        sigma = plan.summary["calibrated_noise_multiplier"]
        self.assertIn(f"calibrated {unit}-level noise multiplier {sigma:.4f}", lines[0])
        self.assertEqual(list(plan.accountants), [unit])
        want = [sigma] * 2 + [sigma / 2] * 2 + [sigma / 4] * 2
        schedule = []
        for r, w in enumerate(want):
            value = plan.hparams_at(r)[key]
            self.assertEqual((value.shape, value.dtype), ((), np.float32))
            self.assertGreaterEqual(float(value), w)  # never below the calibrated value
            self.assertLess(float(value), w * (1 + 1e-6))
            rp = plan.round_privacy(r)[unit]
            self.assertEqual(rp.noise_multiplier, float(value))  # accounts what is added
            self.assertEqual(plan.row_at(r), {"noise_multiplier": float(value)})
            schedule.append((rp, 1))
        self.assertEqual((rp.unit, rp.sampling, rp.sampling_rate), (unit, "poisson", 0.1))
        eps = accounting.epsilon(schedule, delta=cfg.privacy.delta)
        self.assertLessEqual(eps, 3.0)
        self.assertGreater(eps, 0.99 * 3.0)

    @parameterized.parameters(
        ({"privacy.target_epsilon": -1.0}, "privacy.target_epsilon"),
        ({"privacy.target_epsilon": float("nan")}, "privacy.target_epsilon"),
        ({"privacy.noise_schedule": "cosine"}, "privacy.noise_schedule"),
        ({"privacy.noise_end_ratio": 0.5}, "privacy.noise_end_ratio.*noise_schedule"),
        (
            {"privacy.noise_schedule": "linear", "privacy.noise_end_ratio": 0.0},
            "privacy.noise_end_ratio",
        ),
        ({"privacy.noise_schedule_stages": -1}, "privacy.noise_schedule_stages"),
        ({"privacy.noise_cohort_size": 3}, "noise_cohort_size"),
        ({"privacy.noise_population": 10}, "privacy.noise_population"),
        (
            {"privacy.noise_cohort_size": 600, "privacy.noise_population": 100},
            "population",
        ),
        (
            {
                "algorithm.name": "fedavg",
                "algorithm.clip_norm": None,
                "algorithm.noise_multiplier": None,
                "privacy.target_epsilon": 2.0,
            },
            "privacy.target_epsilon needs a run with exactly one DP mechanism",
        ),
        (
            {
                "algorithm.name": "dp_sgd_fedavg",
                "algorithm.clip_norm": None,
                "algorithm.noise_multiplier": None,
                "privacy.noise_cohort_size": 600,
            },
            "example-level",
        ),
    )
    def test_bad_options_name_the_option(self, overrides, pattern):
        cfg = _tiny(**overrides)
        with self.assertRaisesRegex(ValueError, pattern):
            experiment.run(cfg, write=False, log=lambda *_: None)


if __name__ == "__main__":
    absltest.main()
