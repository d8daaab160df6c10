"""Tests for fedjax_dp.accounting."""

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
        ours = accounting.epsilon(_fixed(sigma, m, n), rounds=rounds, delta=DELTA)
        expected = _dp_rdp(event, rounds, dp_accounting.NeighboringRelation.REPLACE_ONE)
        self.assertAlmostEqual(ours, expected, places=10)
        self.assertEqual(_fixed(sigma, m, n).dp_event(), event)

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
        eps = [
            accounting.epsilon(_fixed(1.0, m, 1000), rounds=50, delta=DELTA) for m in (100, 30, 10)
        ]
        self.assertTrue(all(math.isfinite(e) for e in eps))
        self.assertGreater(eps[0], eps[1])
        self.assertGreater(eps[1], eps[2])

    def test_fixed_user_pld_raises(self):
        acc = accounting.Accountant(delta=DELTA, accountant="pld")
        with self.assertRaisesRegex(ValueError, "accountant='rdp'"):
            acc.compose(_fixed(1.0, 10))
        with self.assertRaisesRegex(ValueError, "accountant='rdp'"):
            accounting.epsilon(_fixed(1.0, 10), rounds=3, delta=DELTA, accountant="pld")

    def test_cannot_mix_relations_or_units(self):
        acc = accounting.Accountant(delta=DELTA)
        acc.compose(_poisson(1.0, 0.01))
        with self.assertRaisesRegex(ValueError, "sampling"):
            acc.compose(_fixed(1.0, 10))
        with self.assertRaisesRegex(ValueError, "unit"):
            acc.compose(_poisson(1.0, 0.01, unit="example"))
        self.assertEqual(acc.neighboring_relation, "add_or_remove_one_user")
        self.assertEqual(_fixed(1.0, 10).neighboring_relation, "replace_one_user")


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


if __name__ == "__main__":
    absltest.main()
