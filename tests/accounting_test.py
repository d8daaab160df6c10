"""Tests for fedjax_dp.accounting."""

import collections
import functools
import itertools
import json
import math

import dp_accounting
import numpy as np
from absl.testing import absltest, parameterized
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import integrate, stats

from fedjax_dp import accounting

DELTA = 1e-5


def _poisson(sigma, q, num_clients=60000, **kwargs):
    return accounting.RoundPrivacy(sigma, "poisson", num_clients, sampling_rate=q, **kwargs)


def _fixed(sigma, cohort_size, num_clients=1000, **kwargs):
    return accounting.RoundPrivacy(sigma, "fixed", num_clients, cohort_size=cohort_size, **kwargs)


def _dp_rdp(event, count=1, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    acc = rdp_lib.RdpAccountant(list(accounting.RDP_ORDERS), relation)
    acc.compose(event, count)
    return acc.get_epsilon(DELTA)


def _dp_pld(event, count=1):
    acc = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION_INTERVAL
    )
    acc.compose(event, count)
    return acc.get_epsilon(DELTA)


class PublishedValuesTest(parameterized.TestCase):
    """Reproduces published epsilons (Poisson-sampled Gaussian, delta=1e-5)."""

    @parameterized.named_parameters(
        # TF-Privacy tutorials/README.md: compute_dp_sgd_privacy.py --N=60000 --batch_size=256
        # --noise_multiplier=1.1 --epochs=60 --delta=1e-5 -> "eps = 3.01", plus the other rows of
        # its parameter table (1.3 / 15 epochs -> 1.19, 0.7 / 45 epochs -> 7.10). That script uses
        # steps = ceil(epochs * N / batch_size) and the classic conversion. We get 3.0084, 1.1923,
        # 7.1016.
        ("tf_privacy_mnist_default", 1.1, 60, 3.01),
        ("tf_privacy_mnist_eps_1_19", 1.3, 15, 1.19),
        ("tf_privacy_mnist_eps_7_10", 0.7, 45, 7.10),
    )
    def test_tf_privacy_tutorial_classic(self, sigma, epochs, published):
        steps = int(np.ceil(epochs * 60000 / 256))
        eps = accounting.epsilon(
            _poisson(sigma, 256 / 60000), rounds=steps, delta=DELTA, conversion="classic"
        )
        self.assertAlmostEqual(eps, published, delta=0.005)  # published to 2 decimals

    def test_abadi_et_al_classic(self):
        # Abadi et al. 2016, q=0.01, sigma=4, T=10000: TF-Privacy's rdp_accountant_test asserts
        # 1.258575 (classic conversion). We get 1.2585747 (optimal order 20).
        eps = accounting.epsilon(
            _poisson(4.0, 0.01), rounds=10000, delta=DELTA, conversion="classic"
        )
        self.assertAlmostEqual(eps, 1.258575, delta=1e-4)

    def test_opacus_constant_matches_improved_conversion(self):
        # Opacus accountants_test: sigma=1.5, q=0.04, int(90 / 0.04) = 2250 steps -> 7.32911117143.
        # Opacus uses the improved conversion (Balle et al. 2020, Thm. 21), the same formula as
        # dp_accounting's default, on orders 1.1..10.9 and 12..63; the optimum is the fractional
        # order 3.9. We get 7.3293347: dp_accounting's RDP at fractional orders sums |binomial|
        # terms (an upper bound) where Opacus's series subtracts the negative ones, which is the
        # whole 2.2e-4 gap (re-running Opacus's series on these orders gives 7.32911117143 exactly).
        # The classic conversion gives 8.07 and does not match.
        rp = _poisson(1.5, 0.04)
        improved = accounting.epsilon(rp, rounds=2250, delta=DELTA)
        classic = accounting.epsilon(rp, rounds=2250, delta=DELTA, conversion="classic")
        self.assertAlmostEqual(improved, 7.32911117143, delta=5e-4)
        self.assertGreaterEqual(improved, 7.32911117143)  # dp_accounting's RDP is the upper bound
        self.assertGreater(classic - 7.32911117143, 0.5)


class MatchesDpAccountingTest(parameterized.TestCase):
    @parameterized.parameters((1.0, 0.01, 300), (0.8, 0.1, 50), (2.0, 1.0, 20))
    def test_user_poisson_rdp_equals_dp_accounting(self, sigma, q, rounds):
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        ours = accounting.epsilon(_poisson(sigma, q), rounds=rounds, delta=DELTA)
        self.assertAlmostEqual(ours, _dp_rdp(event, rounds), places=10)
        # dp_accounting's default orders are a subset of ours, so they cannot do better.
        default = rdp_lib.RdpAccountant().compose(event, rounds).get_epsilon(DELTA)
        self.assertLessEqual(ours, default + 1e-12)

    def test_extra_orders_help_in_small_loss_regime(self):
        # With large sigma the optimal order exceeds dp_accounting's defaults' useful range
        # (its best is 512, ours 640): 0.01448 vs 0.01486.
        event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(20.0))
        ours = accounting.epsilon(_poisson(20.0, 0.01), rounds=100, delta=DELTA)
        default = rdp_lib.RdpAccountant().compose(event, 100).get_epsilon(DELTA)
        self.assertLess(ours, default * 0.99)

    def test_user_poisson_pld_equals_dp_accounting(self):
        sigma, q, rounds = 1.0, 0.01, 300
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        ours = accounting.epsilon(_poisson(sigma, q), rounds=rounds, delta=DELTA, accountant="pld")
        self.assertAlmostEqual(ours, _dp_pld(event, rounds), places=6)

    def test_user_fixed_rdp_equals_dp_accounting_replace_one(self):
        # Replace-one sensitivity of a clipped sum is 2C: the Gaussian gets sigma / 2.
        sigma, n, m, rounds = 1.2, 1000, 20, 40
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            n, m, dp_accounting.GaussianDpEvent(sigma / 2)
        )
        rp = _fixed(sigma, m, n, relation="replace_one_user")
        ours = accounting.epsilon(rp, rounds=rounds, delta=DELTA)
        expected = _dp_rdp(event, rounds, dp_accounting.NeighboringRelation.REPLACE_ONE)
        self.assertAlmostEqual(ours, expected, places=10)
        self.assertEqual(rp.dp_event(), event)
        self.assertEqual(rp.neighboring_relation, "replace_one_user")

    def test_user_poisson_dp_event(self):
        self.assertEqual(
            _poisson(1.3, 0.02).dp_event(),
            dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.3)),
        )
        self.assertEqual(_poisson(0.0, 0.02).dp_event(), dp_accounting.NonPrivateDpEvent())

    def test_example_full_participation_is_plain_gaussian(self):
        # With participation probability 1 there is nothing to amplify: E Gaussians per round.
        rp = _poisson(3.0, 1.0, unit="example", compositions=2)
        event = dp_accounting.GaussianDpEvent(3.0 / math.sqrt(2))
        self.assertAlmostEqual(
            accounting.epsilon(rp, rounds=10, delta=DELTA), _dp_rdp(event, 10), places=10
        )
        self.assertAlmostEqual(
            accounting.epsilon(rp, rounds=10, delta=DELTA, accountant="pld"),
            _dp_pld(event, 10),
            places=6,
        )
        self.assertEqual(
            rp.dp_event(),
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 2),
        )


class ConversionAndAccountantTest(absltest.TestCase):
    def test_improved_not_above_classic_and_pld_not_above_rdp(self):
        rp = _poisson(1.0, 0.01)
        improved = accounting.epsilon(rp, rounds=1000, delta=DELTA)
        classic = accounting.epsilon(rp, rounds=1000, delta=DELTA, conversion="classic")
        pld = accounting.epsilon(rp, rounds=1000, delta=DELTA, accountant="pld")
        self.assertLess(improved, classic)
        self.assertLessEqual(pld, improved * 1.02)
        self.assertGreater(pld, 0.5 * improved)  # same ballpark: both are valid, PLD is tighter

    def test_classic_rdp_epsilon_formula(self):
        orders = [2.0, 4.0, 8.0]
        rdp = [0.5, 1.0, 3.0]
        expected = min(r + math.log(1 / DELTA) / (a - 1) for a, r in zip(orders, rdp))
        self.assertAlmostEqual(accounting.classic_rdp_epsilon(orders, rdp, DELTA), expected)
        self.assertEqual(accounting.classic_rdp_epsilon([2.0], [math.inf], DELTA), math.inf)
        with self.assertRaisesRegex(ValueError, "delta"):
            accounting.classic_rdp_epsilon(orders, rdp, 0.0)
        with self.assertRaisesRegex(ValueError, "same length"):
            accounting.classic_rdp_epsilon(orders, rdp[:2], DELTA)


class CompositionsTest(parameterized.TestCase):
    @parameterized.product(unit=["user", "example"], accountant=["rdp", "pld"])
    def test_compositions_equal_reduced_sigma(self, unit, accountant):
        sigma, q, rounds, e = 2.0, 0.05, 30, 4
        kw = {"rounds": rounds, "delta": DELTA, "accountant": accountant}
        with_e = accounting.epsilon(_poisson(sigma, q, unit=unit, compositions=e), **kw)
        reduced = accounting.epsilon(_poisson(sigma / math.sqrt(e), q, unit=unit), **kw)
        single = accounting.epsilon(_poisson(sigma, q, unit=unit), **kw)
        self.assertAlmostEqual(with_e, reduced, places=6)
        self.assertGreater(with_e, single)


class ExampleLevelSoundnessTest(parameterized.TestCase):
    """Client sampling must not be credited as if it were Poisson sampling of examples."""

    @staticmethod
    def _true_delta(eps, q, sigma, k):
        """Hockey-stick divergence of one round for an explicit worst-case dataset.

        Client c holds the target example and k other examples; all their clipped gradients are
        +1 along one axis, every other client's gradient is 0. The round's (1-D) output is
        N(0, sigma^2) if c is not sampled, else N(k + 1, sigma^2) (target present) or
        N(k, sigma^2) (target zeroed out).
        """

        def density(x, target):
            shift = k + (1.0 if target else 0.0)
            return (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, shift, sigma)

        gamma = math.exp(eps)
        deltas = []
        for a, b in ((True, False), (False, True)):

            def f(x, a=a, b=b):
                return max(0.0, density(x, a) - gamma * density(x, b))

            pts = [-12 * sigma, k / 2, k - 12 * sigma, k + 1 + 12 * sigma]
            total = sum(
                integrate.quad(f, lo, hi, limit=200, epsabs=1e-14)[0]
                for lo, hi in itertools.pairwise(pts)
            )
            deltas.append(total)
        return max(deltas)

    @parameterized.parameters("rdp", "pld")
    def test_example_epsilon_is_sound_where_amplified_is_not(self, accountant):
        q, sigma, k = 0.01, 1.0, 60
        rp = _poisson(sigma, q, unit="example")
        eps = accounting.epsilon(rp, rounds=1, delta=DELTA, accountant=accountant)
        self.assertLessEqual(self._true_delta(eps, q, sigma, k), DELTA * 1.001)
        # Crediting client sampling as Poisson sampling of the example (the user-level event)
        # gives a far smaller epsilon that this dataset violates.
        amplified = accounting.epsilon(
            _poisson(sigma, q), rounds=1, delta=DELTA, accountant=accountant
        )
        self.assertLess(amplified, eps)
        self.assertGreater(self._true_delta(amplified, q, sigma, k), 10 * DELTA)

    def test_example_between_amplified_and_unsampled(self):
        sigma, rounds = 1.5, 100
        for q in (0.02, 0.3):
            example = accounting.epsilon(
                _poisson(sigma, q, unit="example"), rounds=rounds, delta=DELTA
            )
            amplified = accounting.epsilon(_poisson(sigma, q), rounds=rounds, delta=DELTA)
            unsampled = accounting.epsilon(_poisson(sigma, 1.0), rounds=rounds, delta=DELTA)
            self.assertLess(amplified, example)
            self.assertLess(example, unsampled)

    def test_example_fixed_uses_participation_probability(self):
        # Under zero-out, fixed-size client sampling is participation probability m / n.
        for accountant in ("rdp", "pld"):
            kw = {"rounds": 20, "delta": DELTA, "accountant": accountant}
            fixed = accounting.epsilon(_fixed(1.0, 50, 1000, unit="example"), **kw)
            poisson = accounting.epsilon(_poisson(1.0, 0.05, 1000, unit="example"), **kw)
            self.assertAlmostEqual(fixed, poisson, places=9)


class HeterogeneousTest(parameterized.TestCase):
    @parameterized.parameters("rdp", "pld")
    def test_heterogeneous_equals_dp_accounting_and_is_between(self, accountant):
        q, (s1, n1), (s2, n2) = 0.02, (0.9, 60), (1.6, 140)
        acc = accounting.Accountant(delta=DELTA, accountant=accountant)
        acc.compose(_poisson(s1, q), n1)
        acc.compose(_poisson(s2, q), n2)
        self.assertEqual(acc.rounds, n1 + n2)

        def ev(s):
            return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s))

        composed = dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(ev(s1), n1),
                dp_accounting.SelfComposedDpEvent(ev(s2), n2),
            ]
        )
        expected = _dp_rdp(composed) if accountant == "rdp" else _dp_pld(composed)
        self.assertAlmostEqual(acc.epsilon(), expected, places=6)

        kw = {"rounds": n1 + n2, "delta": DELTA, "accountant": accountant}
        low = accounting.epsilon(_poisson(s2, q), **kw)
        high = accounting.epsilon(_poisson(s1, q), **kw)
        self.assertLess(low, acc.epsilon())
        self.assertLess(acc.epsilon(), high)

        schedule = [(_poisson(s1, q), n1), (_poisson(s2, q), n2)]
        self.assertEqual(
            accounting.epsilon(schedule, delta=DELTA, accountant=accountant), acc.epsilon()
        )

    @parameterized.parameters("rdp", "pld")
    def test_incremental_equals_one_shot_and_merges(self, accountant):
        a, b = _poisson(1.0, 0.02, unit="example"), _poisson(1.4, 0.02, unit="example")
        acc = accounting.Accountant(delta=DELTA, accountant=accountant)
        history = []
        for rp in [a] * 5 + [b] * 3 + [a] * 2:
            acc.compose(rp)
            history.append(acc.epsilon())  # exercises the caches between composes
        self.assertEqual(acc.schedule, ((a, 5), (b, 3), (a, 2)))
        self.assertEqual(acc.rounds, 10)
        one_shot = accounting.epsilon([(a, 5), (b, 3), (a, 2)], delta=DELTA, accountant=accountant)
        self.assertAlmostEqual(acc.epsilon(), one_shot, places=9)
        self.assertTrue(all(x < y for x, y in itertools.pairwise(history)))


class FixedSizeTest(absltest.TestCase):
    def test_fixed_rdp_finite_and_decreasing_in_cohort_size(self):
        for relation in (None, "replace_one_user"):
            eps = [
                accounting.epsilon(_fixed(1.0, m, 1000, relation=relation), rounds=50, delta=DELTA)
                for m in (100, 30, 10)
            ]
            self.assertTrue(all(math.isfinite(e) for e in eps))
            self.assertGreater(eps[0], eps[1])
            self.assertGreater(eps[1], eps[2])

    def test_fixed_user_pld_supported_and_replace_one_pld_raises(self):
        # Before: accountant='pld' refused every fixed-size user-level round.
        rp = _fixed(1.0, 10)
        pld = accounting.epsilon(rp, rounds=3, delta=DELTA, accountant="pld")
        rdp = accounting.epsilon(rp, rounds=3, delta=DELTA)
        self.assertLessEqual(pld, rdp)
        self.assertGreater(pld, 0.5 * rdp)
        acc = accounting.Accountant(delta=DELTA, accountant="pld")
        with self.assertRaisesRegex(ValueError, "accountant='rdp'"):
            acc.compose(_fixed(1.0, 10, relation="replace_one_user"))
        with self.assertRaisesRegex(ValueError, "accountant='rdp'"):
            accounting.epsilon(
                _fixed(1.0, 10, relation="replace_one_user"),
                rounds=3,
                delta=DELTA,
                accountant="pld",
            )

    def test_relations_compose_only_with_themselves(self):
        acc = accounting.Accountant(delta=DELTA)
        acc.compose(_poisson(1.0, 0.01))
        acc.compose(_fixed(1.0, 10))  # add/remove too: composes
        acc.compose(_poisson(1.0, 0.01, max_cohort_size=2000))
        self.assertEqual(acc.rounds, 3)
        with self.assertRaisesRegex(ValueError, "sampling"):
            acc.compose(_fixed(1.0, 10, relation="replace_one_user"))
        with self.assertRaisesRegex(ValueError, "unit"):
            acc.compose(_poisson(1.0, 0.01, unit="example"))
        self.assertEqual(acc.neighboring_relation, "add_or_remove_one_user")
        self.assertEqual(_fixed(1.0, 10).neighboring_relation, "add_or_remove_one_user")
        self.assertEqual(
            _fixed(1.0, 10, relation="replace_one_user").neighboring_relation, "replace_one_user"
        )
        mixed = accounting.epsilon(
            [(_poisson(1.0, 0.01, 1000), 5), (_fixed(1.0, 10), 5)], delta=DELTA, accountant="pld"
        )
        alone = accounting.epsilon(_fixed(1.0, 10), rounds=5, delta=DELTA, accountant="pld")
        self.assertGreater(mixed, alone)

    def test_relation_validation(self):
        self.assertEqual(_fixed(1.0, 10, relation="add_or_remove_one_user"), _fixed(1.0, 10))
        for kwargs in (
            {"relation": "replace_one_user"},  # Poisson: no replace-one analysis
            {"relation": "zero_out_example"},
            {"relation": "bogus"},
        ):
            with self.assertRaisesRegex(ValueError, "relation"):
                _poisson(1.0, 0.01, **kwargs)
        with self.assertRaisesRegex(ValueError, "relation"):
            _fixed(1.0, 10, unit="example", relation="replace_one_user")
        with self.assertRaisesRegex(ValueError, "relation"):
            _fixed(1.0, 10, mechanism="local_gaussian", relation="replace_one_user")
        self.assertEqual(_fixed(1.0, 10, unit="example").neighboring_relation, "zero_out_example")


class MonotonicityTest(parameterized.TestCase):
    @parameterized.product(
        accountant=["rdp", "pld"],
        make=[
            lambda s: _poisson(s, 0.01),
            lambda s: _fixed(s, 10),
            lambda s: _poisson(s, 0.01, unit="example"),
        ],
    )
    def test_zero_noise_is_infinite(self, accountant, make):
        rp0 = make(0.0)  # accepted by every accountant, including pld with fixed-size rounds
        self.assertEqual(
            accounting.epsilon(rp0, rounds=1, delta=DELTA, accountant=accountant), math.inf
        )
        acc = accounting.Accountant(delta=DELTA, accountant=accountant)
        if rp0.sampling == "poisson":
            acc.compose(make(1.0), 5)
            self.assertTrue(math.isfinite(acc.epsilon()))
        acc.compose(rp0)
        self.assertEqual(acc.epsilon(), math.inf)

    def test_empty_accountant_is_zero(self):
        self.assertEqual(accounting.Accountant(delta=DELTA).epsilon(), 0.0)
        self.assertEqual(accounting.epsilon(_poisson(1.0, 0.1), rounds=0, delta=DELTA), 0.0)

    @parameterized.parameters("rdp", "pld")
    def test_monotone_in_sigma_and_rounds(self, accountant):
        kw = {"delta": DELTA, "accountant": accountant}
        by_sigma = [
            accounting.epsilon(_poisson(s, 0.05), rounds=50, **kw) for s in (0.7, 1.0, 1.5, 3.0)
        ]
        self.assertTrue(all(x > y for x, y in itertools.pairwise(by_sigma)), by_sigma)
        by_rounds = [
            accounting.epsilon(_poisson(1.0, 0.05), rounds=t, **kw) for t in (1, 10, 100, 200)
        ]
        self.assertTrue(all(x < y for x, y in itertools.pairwise(by_rounds)), by_rounds)


class StateDictTest(parameterized.TestCase):
    @parameterized.parameters(("rdp", "improved"), ("rdp", "classic"), ("pld", "improved"))
    def test_round_trip(self, accountant, conversion):
        acc = accounting.Accountant(delta=DELTA, accountant=accountant, conversion=conversion)
        acc.compose(_poisson(1.0, 0.02, compositions=1), 7)
        acc.compose(_poisson(np.float64(1.3), np.float32(0.02)), 5)  # numpy scalars are normalised
        state = json.loads(json.dumps(acc.state_dict()))
        restored = accounting.Accountant.from_state_dict(state)
        self.assertEqual(restored.rounds, 12)
        self.assertEqual(restored.schedule, acc.schedule)
        self.assertEqual(restored.epsilon(), acc.epsilon())
        self.assertEqual(restored.state_dict(), acc.state_dict())
        restored.compose(_poisson(1.3, float(np.float32(0.02))), 1)
        self.assertEqual(len(restored.schedule), 2)  # merged into the last entry
        self.assertGreater(restored.epsilon(), acc.epsilon())

    def test_round_privacy_dict_round_trip(self):
        rp = _fixed(0.8, 12, 500, unit="example", compositions=3)
        self.assertEqual(
            accounting.RoundPrivacy.from_dict(json.loads(json.dumps(rp.to_dict()))), rp
        )
        with self.assertRaisesRegex(ValueError, "round_privacy"):
            accounting.RoundPrivacy.from_dict({**rp.to_dict(), "bogus": 1})
        with self.assertRaisesRegex(ValueError, "state_dict"):
            accounting.Accountant.from_state_dict({"version": 99})


class ValidationTest(parameterized.TestCase):
    @parameterized.parameters(0.0, 1.0, -1.0, float("nan"), 1.5, "1e-5", None, True)
    def test_bad_delta(self, delta):
        with self.assertRaisesRegex(ValueError, "delta"):
            accounting.Accountant(delta=delta)
        with self.assertRaisesRegex(ValueError, "delta"):
            accounting.epsilon(_poisson(1.0, 0.1), rounds=1, delta=delta)

    def test_delta_message_says_fix(self):
        with self.assertRaisesRegex(ValueError, r"delta=1\.5 must be in \(0, 1\)"):
            accounting.Accountant(delta=1.5)

    @parameterized.named_parameters(
        ("negative_sigma", {"noise_multiplier": -0.1}, "noise_multiplier"),
        ("nan_sigma", {"noise_multiplier": float("nan")}, "noise_multiplier"),
        ("inf_sigma", {"noise_multiplier": float("inf")}, "noise_multiplier"),
        ("q_zero", {"sampling_rate": 0.0}, "sampling_rate"),
        ("q_above_one", {"sampling_rate": 1.5}, "sampling_rate"),
        ("q_nan", {"sampling_rate": float("nan")}, "sampling_rate"),
        ("q_missing", {"sampling_rate": None}, "sampling_rate"),
        ("cohort_with_poisson", {"cohort_size": 5}, "cohort_size"),
        ("bad_sampling", {"sampling": "uniform"}, "sampling"),
        ("bad_unit", {"unit": "client"}, "unit"),
        ("zero_compositions", {"compositions": 0}, "compositions"),
        ("float_compositions", {"compositions": 2.0}, "compositions"),
        ("zero_clients", {"num_clients": 0}, "num_clients"),
    )
    def test_bad_round_privacy_poisson(self, override, name):
        kwargs = {
            "noise_multiplier": 1.0,
            "sampling": "poisson",
            "num_clients": 100,
            "sampling_rate": 0.1,
        }
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, name):
            accounting.RoundPrivacy(**kwargs)

    @parameterized.named_parameters(
        ("cohort_above_population", {"cohort_size": 101}, "cohort_size"),
        ("cohort_zero", {"cohort_size": 0}, "cohort_size"),
        ("cohort_missing", {"cohort_size": None}, "cohort_size"),
        ("inconsistent_rate", {"sampling_rate": 0.5}, "sampling_rate"),
    )
    def test_bad_round_privacy_fixed(self, override, name):
        kwargs = {
            "noise_multiplier": 1.0,
            "sampling": "fixed",
            "num_clients": 100,
            "cohort_size": 10,
        }
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, name):
            accounting.RoundPrivacy(**kwargs)

    def test_fixed_accepts_consistent_rate(self):
        rp = accounting.RoundPrivacy(1.0, "fixed", 100, sampling_rate=0.1, cohort_size=10)
        self.assertEqual(rp.participation_probability, 0.1)

    def test_bad_accountant_and_conversion(self):
        with self.assertRaisesRegex(ValueError, "accountant"):
            accounting.Accountant(delta=DELTA, accountant="moments")
        with self.assertRaisesRegex(ValueError, "conversion"):
            accounting.Accountant(delta=DELTA, conversion="tight")
        with self.assertRaisesRegex(ValueError, "conversion='classic'.*accountant='rdp'"):
            accounting.Accountant(delta=DELTA, accountant="pld", conversion="classic")

    def test_bad_compose_and_one_shot_arguments(self):
        acc = accounting.Accountant(delta=DELTA)
        with self.assertRaisesRegex(ValueError, "count"):
            acc.compose(_poisson(1.0, 0.1), -1)
        with self.assertRaisesRegex(ValueError, "round_privacy"):
            acc.compose(dp_accounting.GaussianDpEvent(1.0))
        with self.assertRaisesRegex(ValueError, "rounds"):
            accounting.epsilon(_poisson(1.0, 0.1), delta=DELTA)
        with self.assertRaisesRegex(ValueError, "rounds"):
            accounting.epsilon([(_poisson(1.0, 0.1), 3)], rounds=3, delta=DELTA)


# ----------------------------------------------------------------------------- tight analyses:
# fixed-size rounds under add/remove, amplified Laplace, capped (truncated) Poisson cohorts.


def _fixed_outputs(values, m):
    """Exact output of a fixed-size round before noise: {sum of a uniform m-subset: prob}."""
    out = collections.Counter()
    subsets = list(itertools.combinations(range(len(values)), m))
    for s in subsets:
        out[round(sum(values[i] for i in s), 12)] += 1.0 / len(subsets)
    return out


def _capped_poisson_outputs(values, q, cap, upload=1.0):
    """Exact output of a capped Poisson round before noise: each user selected with probability
    q; if more than ``cap`` are selected a uniformly random subset of ``cap`` is kept; every
    kept user then uploads independently with probability ``upload``."""
    out = collections.Counter()
    n = len(values)
    for selected in itertools.product((0, 1), repeat=n):
        ids = [i for i in range(n) if selected[i]]
        weight = q ** len(ids) * (1 - q) ** (n - len(ids))
        kept = [ids] if len(ids) <= cap else list(itertools.combinations(ids, cap))
        for s in kept:
            for up in itertools.product((0, 1), repeat=len(s)):
                w = upload ** sum(up) * (1 - upload) ** (len(s) - sum(up))
                if w == 0.0:
                    continue
                total = sum(values[i] for i, u in zip(s, up, strict=True) if u)
                out[round(total, 12)] += weight / len(kept) * w
    return out


def _mixture_delta(p, q, eps, scale, noise="gaussian", points=100001):
    """max of the two hockey-stick divergences at exp(eps) between two 1-D noise mixtures."""
    means = list(p) + list(q)
    x = np.linspace(min(means) - 40 * scale, max(means) + 40 * scale, points)
    dist = stats.norm if noise == "gaussian" else stats.laplace

    def density(mix):
        return sum(w * dist.pdf(x, mu, scale) for mu, w in mix.items())

    dp, dq, g = density(p), density(q), math.exp(eps)
    return max(
        integrate.trapezoid(np.maximum(dp - g * dq, 0.0), x),
        integrate.trapezoid(np.maximum(dq - g * dp, 0.0), x),
    )


def _mixture_renyi(p, q, alphas, scale):
    """max of the two Renyi divergences of each order between two 1-D Gaussian mixtures."""
    means = list(p) + list(q)
    x = np.linspace(min(means) - 40 * scale, max(means) + 40 * scale, 40001)
    dp = sum(w * stats.norm.pdf(x, mu, scale) for mu, w in p.items())
    dq = sum(w * stats.norm.pdf(x, mu, scale) for mu, w in q.items())
    keep = (dp > 0) & (dq > 0)
    x, lp, lq = x[keep], np.log(dp[keep]), np.log(dq[keep])
    out = []
    for a in alphas:
        fwd = integrate.trapezoid(np.exp(a * lp + (1 - a) * lq), x)
        rev = integrate.trapezoid(np.exp(a * lq + (1 - a) * lp), x)
        out.append(max(math.log(fwd), math.log(rev)) / (a - 1))
    return out


def _round_delta(rp, eps, side="remove"):
    """delta(eps) of one round from the accountant's own (pessimistic) PLD."""
    return _round_pld(rp, side).get_delta_for_epsilon(eps)


@functools.cache
def _round_pld(rp, side):
    return accounting._round_pld(rp, side)


class FixedSizeAddRemoveTest(parameterized.TestCase):
    """Fixed-size rounds under add/remove one user: the subsampled Gaussian of sensitivity 2C
    at rate m / N is a tight dominating pair (module docstring)."""

    @parameterized.parameters(
        (1.0, 1000, 50, 100), (1.2, 1000, 20, 40), (0.8, 10000, 100, 1000), (2.0, 1000, 100, 200)
    )
    def test_not_above_replace_one_and_equals_the_dominating_pair_event(self, sigma, n, m, rounds):
        rp = _fixed(sigma, m, n)
        replace_one = accounting.epsilon(
            _fixed(sigma, m, n, relation="replace_one_user"), rounds=rounds, delta=DELTA
        )
        rdp = accounting.epsilon(rp, rounds=rounds, delta=DELTA)
        pld = accounting.epsilon(rp, rounds=rounds, delta=DELTA, accountant="pld")
        event = dp_accounting.PoissonSampledDpEvent(m / n, dp_accounting.GaussianDpEvent(sigma / 2))
        self.assertEqual(rp.dp_event(), event)
        self.assertAlmostEqual(rdp, _dp_rdp(event, rounds), places=10)
        self.assertAlmostEqual(pld, _dp_pld(event, rounds), places=6)
        self.assertLess(rdp, replace_one)  # the old (replace-one RDP) bound: 1.2-3.4x this
        self.assertLessEqual(pld, rdp)

    @parameterized.parameters("gaussian", "laplace")
    def test_dominating_pair_is_the_mechanism_worst_case(self, noise):
        # The exact output distributions of a 6-user population (1-D deltas clipped to C = 1),
        # m = 2: removing u (N vs N - 1) and adding u (N + 1 vs N). The dataset "u at +C,
        # everyone else at -C" attains the dominating pair's delta(eps) (tightness); other
        # datasets stay below it (soundness).
        n, m, sigma = 6, 2, 1.0
        rp = _fixed(sigma, m, n, **({} if noise == "gaussian" else {"mechanism": "laplace"}))
        scale = sigma  # noise scale / clip norm, Gaussian std or Laplace b
        rng = np.random.default_rng(0)
        others = [[-1.0] * n] + [list(rng.uniform(-1, 1, n)) for _ in range(2)]
        for eps in (0.25, 1.0, 2.0):
            for side, size in (("remove", n - 1), ("add", n)):
                bound = _round_delta(rp, eps, side)
                for k, rest in enumerate(others):
                    got = _mixture_delta(
                        _fixed_outputs([1.0, *rest[:size]], m),
                        _fixed_outputs(rest[:size], m),
                        eps,
                        scale,
                        noise,
                    )
                    self.assertLessEqual(got, bound + 1e-7)
                    if k == 0:
                        self.assertAlmostEqual(got, bound, delta=1e-4 * bound + 1e-7)

    def test_single_round_hockey_stick_and_published_amplification(self):
        # (b) delta(eps) of the dominating pair P = (1-g) N(0, s^2) + g N(2, s^2), Q = N(0, s^2),
        # by scipy integration, in both directions. (c) The same from published formulas:
        # amplification by subsampling, delta'(log(1 + g (e^e - 1))) = g delta_G(e) (Balle,
        # Barthe, Gaboardi 2018, Thm. 10; remove direction, which dominates), with the exact
        # Gaussian delta_G(e) = Phi(D/2s - e s/D) - e^e Phi(-D/2s - e s/D), D = 2 (Balle and Wang
        # 2018, Thm. 8).
        sigma, n, m = 1.5, 100, 10
        g = m / n
        rp = _fixed(sigma, m, n)
        eps = accounting.epsilon(rp, rounds=1, delta=DELTA, accountant="pld")

        def p(x):
            return (1 - g) * stats.norm.pdf(x, 0, sigma) + g * stats.norm.pdf(x, 2, sigma)

        def q(x):
            return stats.norm.pdf(x, 0, sigma)

        def hockey(a, b, e):
            return sum(
                integrate.quad(
                    lambda x: max(0.0, a(x) - math.exp(e) * b(x)), lo, hi, epsabs=1e-15, limit=200
                )[0]
                for lo, hi in itertools.pairwise([-30.0, 1.0, 4.0, 8.0, 40.0])
            )

        for e in (0.5, 1.0, eps):
            exact = max(hockey(p, q, e), hockey(q, p, e))
            self.assertLessEqual(exact, _round_delta(rp, e) * (1 + 1e-9))
            self.assertAlmostEqual(exact, _round_delta(rp, e), delta=1e-4 * exact)
            e0 = math.log1p(math.expm1(e) / g)  # the base epsilon that g amplifies to e
            sens = 2.0
            delta_g = stats.norm.cdf(sens / (2 * sigma) - e0 * sigma / sens) - math.exp(
                e0
            ) * stats.norm.cdf(-sens / (2 * sigma) - e0 * sigma / sens)
            self.assertAlmostEqual(exact, g * delta_g, delta=1e-6 * exact)
        self.assertAlmostEqual(max(hockey(p, q, eps), hockey(q, p, eps)), DELTA, delta=1e-8)


class LaplaceAmplificationTest(parameterized.TestCase):
    """Laplace rounds get the subsampled-Laplace analysis with both accountants."""

    @parameterized.parameters((0.05, 2.0), (0.05, 1.0), (0.3, 0.5), (0.01, 0.25), (1.0, 1.0))
    def test_rdp_bound_against_numerical_renyi_divergence(self, q, scale):
        rdp = accounting._subsampled_laplace_rdp(q, scale)
        orders = list(accounting.RDP_ORDERS)

        def renyi(alpha, forward):
            def mix(x):
                a = np.exp(-abs(x) / scale) / (2 * scale)
                return (1 - q) * a + q * np.exp(-abs(x - 1) / scale) / (2 * scale)

            def lap0(x):
                return np.exp(-abs(x) / scale) / (2 * scale)

            top, bottom = (mix, lap0) if forward else (lap0, mix)
            total = sum(
                integrate.quad(
                    lambda x: math.exp(
                        alpha * math.log(top(x)) + (1 - alpha) * math.log(bottom(x))
                    ),
                    lo,
                    hi,
                    limit=200,
                    epsabs=0,
                    epsrel=1e-12,
                )[0]
                for lo, hi in itertools.pairwise([-60 * scale, 0.0, 1.0, 1 + 60 * scale])
            )
            return math.log(total) / (alpha - 1)

        for alpha in (1.5, 2.0, 8.0, 32.0):
            exact = max(renyi(alpha, True), renyi(alpha, False))
            got = rdp[orders.index(alpha)]
            self.assertGreaterEqual(got, exact * (1 - 1e-12))  # an upper bound
            self.assertLess(got, exact * (1 + 1e-4))  # and a tight one
        if q == 1.0:  # the unsampled Laplace: Mironov's exact formula, as in dp_accounting
            ref = rdp_lib.RdpAccountant(orders)
            ref.compose(dp_accounting.LaplaceDpEvent(scale))
            np.testing.assert_allclose(rdp, ref._rdp, rtol=1e-12)

    def test_poisson_rdp_audit_example(self):
        # sigma 2, q 0.05, 100 rounds: the RDP accountant used the unsampled Laplace (3.19)
        # where PLD gives 0.884; now 0.967.
        rp = _poisson(2.0, 0.05, 1000, mechanism="laplace")
        rdp = accounting.epsilon(rp, rounds=100, delta=DELTA)
        pld = accounting.epsilon(rp, rounds=100, delta=DELTA, accountant="pld")
        self.assertAlmostEqual(pld, 0.8841, delta=1e-3)
        self.assertLess(rdp, 1.0)
        self.assertGreater(rdp, pld)
        unsampled = _dp_rdp(dp_accounting.LaplaceDpEvent(2.0), 100)
        self.assertGreater(unsampled, 3.19)

    def test_fixed_audit_example(self):
        # sigma 2, 50 of 1000 clients, 100 rounds: 70.8 (replace-one, no amplification) before;
        # pure-DP amplification gives 8.24, the subsampled-Laplace analysis 2.10 (RDP) and
        # 1.92 (PLD).
        rp = _fixed(2.0, 50, 1000, mechanism="laplace")
        event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.LaplaceDpEvent(1.0))
        self.assertEqual(rp.dp_event(), event)
        self.assertAlmostEqual(100 * rp.pure_epsilon, 8.2422, delta=1e-4)
        rdp = accounting.epsilon(rp, rounds=100, delta=DELTA)
        pld = accounting.epsilon(rp, rounds=100, delta=DELTA, accountant="pld")
        self.assertAlmostEqual(pld, _dp_pld(event, 100), places=6)
        self.assertLess(rdp, 2.2)
        self.assertLess(pld, rdp)
        old = accounting.epsilon(
            _fixed(2.0, 50, 1000, mechanism="laplace", relation="replace_one_user"),
            rounds=100,
            delta=DELTA,
        )
        self.assertAlmostEqual(old, 70.78, delta=0.01)  # replace-one, still available


class CappedPoissonTest(parameterized.TestCase):
    """``max_cohort_size``: a Poisson cohort truncated to a uniformly random subset."""

    def test_validation_and_dict_round_trip(self):
        with self.assertRaisesRegex(ValueError, "max_cohort_size"):
            _fixed(1.0, 10, max_cohort_size=5)
        for bad in (0, -1, 2.0, True):
            with self.assertRaisesRegex(ValueError, "max_cohort_size"):
                _poisson(1.0, 0.1, 100, max_cohort_size=bad)
        rp = _poisson(1.0, 0.1, 100, max_cohort_size=np.int64(20))
        self.assertEqual(rp.max_cohort_size, 20)
        self.assertEqual(
            accounting.RoundPrivacy.from_dict(json.loads(json.dumps(rp.to_dict()))), rp
        )
        plain = _poisson(1.0, 0.1, 100)
        self.assertNotIn("max_cohort_size", plain.to_dict())  # old dicts read as before
        self.assertNotIn("relation", plain.to_dict())
        old = {k: v for k, v in plain.to_dict().items()}
        self.assertEqual(accounting.RoundPrivacy.from_dict(old), plain)
        replace = _fixed(1.0, 10, relation="replace_one_user")
        self.assertEqual(replace.to_dict()["relation"], "replace_one_user")
        self.assertEqual(accounting.RoundPrivacy.from_dict(replace.to_dict()), replace)

    @parameterized.parameters("rdp", "pld")
    def test_state_dict_round_trip(self, accountant):
        acc = accounting.Accountant(delta=DELTA, accountant=accountant)
        acc.compose(_poisson(3.0, 0.1, 100, max_cohort_size=14), 3)
        acc.compose(_poisson(3.0, 0.1, 100), 2)
        acc.compose(_fixed(3.0, 10, 100), 2)
        state = json.loads(json.dumps(acc.state_dict()))
        restored = accounting.Accountant.from_state_dict(state)
        self.assertEqual(restored.schedule, acc.schedule)
        self.assertEqual(restored.epsilon(), acc.epsilon())
        # A state dict written before max_cohort_size and relation existed still loads.
        legacy = {
            "version": 1,
            "delta": DELTA,
            "accountant": accountant,
            "conversion": "improved",
            "schedule": [
                {
                    "round_privacy": {
                        "noise_multiplier": 1.0,
                        "sampling": "poisson",
                        "num_clients": 100,
                        "sampling_rate": 0.1,
                        "cohort_size": None,
                        "compositions": 1,
                        "unit": "user",
                        "mechanism": "gaussian",
                    },
                    "count": 4,
                }
            ],
        }
        loaded = accounting.Accountant.from_state_dict(legacy)
        self.assertEqual(loaded.schedule, ((_poisson(1.0, 0.1, 100), 4),))
        self.assertEqual(loaded.state_dict(), legacy)

    def test_dp_event_and_against_dp_accounting(self):
        # Semantics of TruncatedSubsampledGaussianDpEvent are the sampler's; dp_accounting bounds
        # its truncated branch by a replace-one pair, the accountant by the exact add/remove
        # pair of sensitivity 2C (and covers N + 1 vs N too), so it is lower but above the
        # untruncated epsilon.
        sigma, n, q, cap, rounds = 2.0, 100, 0.1, 12, 20
        rp = _poisson(sigma, q, n, max_cohort_size=cap)
        event = dp_accounting.TruncatedSubsampledGaussianDpEvent(n, q, cap, sigma)
        self.assertEqual(rp.dp_event(), event)
        ours = accounting.epsilon(rp, rounds=rounds, delta=DELTA, accountant="pld")
        self.assertLess(ours, _dp_pld(event, rounds))
        untruncated = accounting.epsilon(_poisson(sigma, q, n), rounds=rounds, delta=DELTA)
        self.assertGreater(ours, 1.5 * untruncated)
        rdp = accounting.epsilon(rp, rounds=rounds, delta=DELTA)
        self.assertGreater(rdp, ours)
        self.assertLess(rdp, 1.3 * ours)

    @parameterized.parameters("gaussian", "laplace")
    def test_bound_holds_for_the_exact_mechanism(self, noise):
        # Exact output distributions of a capped Poisson round over 6 (and 7) users, 1-D deltas
        # clipped to C = 1, cap 2 at q = 0.5 (truncation is frequent): delta(eps) of the real
        # mechanism never exceeds the accountant's, for both neighbouring pairs.
        n, q, cap, sigma = 6, 0.5, 2, 1.0
        kw = {} if noise == "gaussian" else {"mechanism": "laplace"}
        rp = _poisson(sigma, q, n, max_cohort_size=cap, **kw)
        rng = np.random.default_rng(1)
        others = [[-1.0] * n] + [list(rng.uniform(-1, 1, n)) for _ in range(2)]
        for eps in (0.25, 1.0, 2.0):
            for side, size in (("remove", n - 1), ("add", n)):
                bound = _round_delta(rp, eps, side)
                worst = 0.0
                for rest in others:
                    got = _mixture_delta(
                        _capped_poisson_outputs([1.0, *rest[:size]], q, cap),
                        _capped_poisson_outputs(rest[:size], q, cap),
                        eps,
                        sigma,
                        noise,
                    )
                    worst = max(worst, got)
                self.assertLessEqual(worst, bound + 1e-7)
                if eps == 0.25:
                    self.assertGreater(worst, 0.5 * bound)  # not vacuous
        if noise == "gaussian":  # RDP of the exact mechanism, same datasets
            rdp = accounting._central_user_rdp(rp)
            orders = list(accounting.RDP_ORDERS)
            alphas = (2.0, 4.0, 8.0)
            for size in (n - 1, n):
                for rest in others:
                    got = _mixture_renyi(
                        _capped_poisson_outputs([1.0, *rest[:size]], q, cap),
                        _capped_poisson_outputs(rest[:size], q, cap),
                        alphas,
                        sigma,
                    )
                    for alpha, value in zip(alphas, got, strict=True):
                        self.assertLessEqual(value, rdp[orders.index(alpha)] * (1 + 1e-6))
        else:  # pure DP: no mass beyond the pure epsilon, in the exact mechanism either
            for size in (n - 1, n):
                got = _mixture_delta(
                    _capped_poisson_outputs([1.0] + [-1.0] * size, q, cap),
                    _capped_poisson_outputs([-1.0] * size, q, cap),
                    rp.pure_epsilon,
                    sigma,
                    noise,
                )
                self.assertLessEqual(got, 1e-9)

    @parameterized.parameters("rdp", "pld")
    def test_default_cap_costs_almost_nothing(self, accountant):
        # The sampler's default cap, mean + 8 standard deviations: truncation probability
        # 3e-13 per round, so the epsilon is the untruncated one up to 1e-4 (and never below).
        n, q, sigma, rounds = 1000, 0.05, 1.0, 1000
        cap = math.ceil(n * q + 8 * math.sqrt(n * q * (1 - q)) + 1)
        kw = {"rounds": rounds, "delta": DELTA, "accountant": accountant}
        capped = accounting.epsilon(_poisson(sigma, q, n, max_cohort_size=cap), **kw)
        plain = accounting.epsilon(_poisson(sigma, q, n), **kw)
        self.assertGreaterEqual(capped, plain)
        self.assertLess(capped - plain, 1e-4)
        # A cap that can never truncate either neighbouring population changes nothing.
        never = accounting.epsilon(_poisson(sigma, q, n, max_cohort_size=n + 1), **kw)
        self.assertEqual(never, plain)

    def test_laplace_pure_epsilon_with_a_cap(self):
        rp = _poisson(2.0, 0.1, 100, mechanism="laplace", max_cohort_size=12)
        p_t, q_trunc = max(accounting._truncation_sides(rp))
        self.assertGreater(p_t, 0.1)
        self.assertAlmostEqual(
            rp.pure_epsilon,
            max(
                math.log1p(0.1 * math.expm1(0.5)),
                max(math.log1p(qt * math.expm1(1.0)) for _, qt in accounting._truncation_sides(rp)),
            ),
        )
        self.assertEqual(
            rp.dp_event(),
            dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.LaplaceDpEvent(1.0)),
        )
        self.assertLess(q_trunc, 0.1)
        for accountant in ("rdp", "pld"):
            kw = {"rounds": 10, "delta": DELTA, "accountant": accountant}
            capped = accounting.epsilon(rp, **kw)
            self.assertGreater(
                capped, accounting.epsilon(_poisson(2.0, 0.1, 100, mechanism="laplace"), **kw)
            )
            self.assertLessEqual(capped, 10 * rp.pure_epsilon)

    def test_example_level_uses_the_kept_probability(self):
        # Zero-out: the population is fixed; a cap only lowers the client's probability of being
        # in the kept cohort, to q P(B <= K-1) + K P(Binomial(N, q) >= K+1) / N.
        n, q, cap = 6, 0.5, 2
        rp = _poisson(1.0, q, n, unit="example", max_cohort_size=cap)
        kept = _capped_poisson_outputs([1.0] + [0.0] * (n - 1), q, cap)  # sum = 1 iff kept
        got = accounting._inclusion_probability(rp)
        self.assertAlmostEqual(got, kept[1.0], places=12)
        plain = _poisson(1.0, got, n, unit="example")
        for accountant in ("rdp", "pld"):
            kw = {"rounds": 5, "delta": DELTA, "accountant": accountant}
            self.assertAlmostEqual(accounting.epsilon(rp, **kw), accounting.epsilon(plain, **kw))
            self.assertLess(
                accounting.epsilon(rp, **kw),
                accounting.epsilon(_poisson(1.0, q, n, unit="example"), **kw),
            )
        self.assertEqual(rp.participation_probability, q)  # the sampler's rate, before the cap


class UploadProbabilityTest(parameterized.TestCase):
    """``upload_probability``: kept clients upload independently with probability ``p``."""

    @parameterized.parameters("rdp", "pld")
    def test_uncapped_is_poisson_at_the_upload_rate(self, accountant):
        kw = {"rounds": 50, "delta": DELTA, "accountant": accountant}
        thinned = accounting.epsilon(_poisson(1.0, 0.2, 1000, upload_probability=0.5), **kw)
        self.assertEqual(thinned, accounting.epsilon(_poisson(1.0, 0.1, 1000), **kw))
        rp = _poisson(1.0, 0.2, 1000, upload_probability=0.5)
        self.assertEqual(rp.dp_event(), _poisson(1.0, 0.1, 1000).dp_event())
        laplace = _poisson(2.0, 0.2, 1000, mechanism="laplace", upload_probability=0.5)
        self.assertAlmostEqual(
            laplace.pure_epsilon, _poisson(2.0, 0.1, 1000, mechanism="laplace").pure_epsilon
        )

    @parameterized.parameters("rdp", "pld")
    def test_capped_lies_between_no_credit_and_the_upload_rate(self, accountant):
        # A cap that binds often: thinning is credited only where it does not bind.
        n, q, cap, p = 100, 0.1, 12, 0.5
        kw = {"rounds": 20, "delta": DELTA, "accountant": accountant}
        thinned = accounting.epsilon(
            _poisson(2.0, q, n, max_cohort_size=cap, upload_probability=p), **kw
        )
        no_credit = accounting.epsilon(_poisson(2.0, q, n, max_cohort_size=cap), **kw)
        at_rate = accounting.epsilon(_poisson(2.0, q * p, n, max_cohort_size=cap), **kw)
        self.assertLess(thinned, no_credit)
        self.assertGreater(thinned, at_rate)

    def test_bound_holds_for_the_exact_mechanism(self):
        # Exact outputs over 5 (and 6) users, cap 2 at q = 0.5, uploads thinned at p = 0.5.
        n, q, cap, p, sigma = 5, 0.5, 2, 0.5, 1.0
        rp = _poisson(sigma, q, n, max_cohort_size=cap, upload_probability=p)
        rng = np.random.default_rng(2)
        others = [[-1.0] * n, list(rng.uniform(-1, 1, n))]
        for eps in (0.25, 1.0):
            for side, size in (("remove", n - 1), ("add", n)):
                bound = _round_delta(rp, eps, side)
                worst = max(
                    _mixture_delta(
                        _capped_poisson_outputs([1.0, *rest[:size]], q, cap, p),
                        _capped_poisson_outputs(rest[:size], q, cap, p),
                        eps,
                        sigma,
                    )
                    for rest in others
                )
                self.assertLessEqual(worst, bound + 1e-7)
        rdp = accounting._central_user_rdp(rp)
        orders = list(accounting.RDP_ORDERS)
        for size in (n - 1, n):
            for rest in others:
                got = _mixture_renyi(
                    _capped_poisson_outputs([1.0, *rest[:size]], q, cap, p),
                    _capped_poisson_outputs(rest[:size], q, cap, p),
                    (2.0, 4.0),
                    sigma,
                )
                for alpha, value in zip((2.0, 4.0), got, strict=True):
                    self.assertLessEqual(value, rdp[orders.index(alpha)] * (1 + 1e-6))

    @parameterized.parameters(
        (dict(upload_probability=0.0), "upload_probability"),
        (dict(upload_probability=1.5), "upload_probability"),
        (dict(upload_probability=float("nan")), "upload_probability"),
        (dict(upload_probability=0.5, unit="example"), "central user-level"),
        (dict(upload_probability=0.5, mechanism="local_gaussian"), "central user-level"),
    )
    def test_validation(self, kw, message):
        with self.assertRaisesRegex(ValueError, message):
            _poisson(1.0, 0.1, 100, **kw)
        with self.assertRaisesRegex(ValueError, "upload_probability"):
            _fixed(1.0, 10, upload_probability=0.5)

    def test_state_dict_round_trip(self):
        acc = accounting.Accountant(delta=DELTA)
        acc.compose(_poisson(1.0, 0.2, 100, upload_probability=0.5), 3)
        loaded = accounting.Accountant.from_state_dict(json.loads(json.dumps(acc.state_dict())))
        self.assertEqual(loaded.schedule, acc.schedule)
        self.assertNotIn("upload_probability", _poisson(1.0, 0.2, 100).to_dict())


if __name__ == "__main__":
    absltest.main()
