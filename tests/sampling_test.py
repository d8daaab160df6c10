"""Cohort sampling on device."""

import fractions
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from scipy import stats

from fedjax_dp import sampling


def _draws(sampler, num_draws, seed=0, batch=100, compiler_options=None):
    """``(ids, mask, overflow)`` of ``num_draws`` rounds as host arrays (vmapped in batches).

    ``compiler_options``: XLA options of this one program (the test session compiles at LLVM
    -O0, see tests/conftest.py; a draw over millions of clients runs faster optimised).
    """
    sample = jax.jit(jax.vmap(sampler.sample), compiler_options=compiler_options)
    out = []
    for start in range(0, num_draws, batch):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
            jnp.arange(start, min(start + batch, num_draws))
        )
        out.append(jax.device_get(sample(keys)))
    return tuple(np.concatenate(parts) for parts in zip(*out))


def _float32_uniform_rate(q):
    """P[u < q] for ``jax.random.uniform``'s float32 draws, which lie on a 2**-23 grid."""
    return math.ceil(q * 2**23) / 2**23


class SamplingTest(parameterized.TestCase):
    def test_fixed_size_distinct_and_uniform(self):
        s = sampling.fixed_size(50, 10)
        sample = jax.jit(s.sample)
        counts = np.zeros(50)
        for r in range(400):
            ids, mask, overflow = sample(jax.random.key(r))
            ids = np.asarray(ids)
            self.assertLen(set(ids.tolist()), 10)
            self.assertTrue(np.all(np.asarray(mask)))
            self.assertEqual(int(overflow), 0)
            counts[ids] += 1
        # each client is picked with probability 10/50: chi-square against uniform
        self.assertGreater(stats.chisquare(counts).pvalue, 1e-4)
        self.assertEqual(s.expected_cohort_size, 10.0)

    def test_poisson_inclusion_rate_and_padding(self):
        q, n = 0.1, 400
        s = sampling.poisson(n, q)
        ids, mask, overflow = _draws(s, 300)
        np.testing.assert_array_equal(overflow, 0)
        sizes, counts = mask.sum(axis=1), np.zeros(n)
        for row, m in zip(ids, mask):
            real = row[m]
            self.assertLen(set(real.tolist()), len(real))
            counts[real] += 1
        self.assertGreater(s.cohort_size, n * q)
        # cohort size ~ Binomial(n, q)
        self.assertAlmostEqual(np.mean(sizes), n * q, delta=4 * np.sqrt(n * q * (1 - q) / 300))
        self.assertAlmostEqual(np.var(sizes), n * q * (1 - q), delta=0.35 * n * q * (1 - q))
        self.assertAlmostEqual(counts.mean() / 300, q, delta=0.01)

    @parameterized.parameters(1e-6, 1e-3, 0.1, 1 / 3, 0.5, 0.999999, 2.0**-32, 1.0)
    def test_inclusion_threshold_is_exact(self, q):
        t = sampling.inclusion_threshold(q)
        self.assertIsInstance(t, int)
        self.assertEqual(t, math.floor(fractions.Fraction(q) * 2**32))
        # The true rate t / 2**32 never exceeds the accounted q, and is within 2**-32 of it.
        self.assertLessEqual(fractions.Fraction(t, 2**32), fractions.Fraction(q))
        self.assertLess(fractions.Fraction(q) - fractions.Fraction(t, 2**32), 2.0**-32)

    def test_tiny_rate_threshold_is_exact_where_a_float_grid_is_not(self):
        q = 1e-6
        t = sampling.inclusion_threshold(q)
        self.assertEqual(t, 4294)
        self.assertLess(abs(t / 2**32 - q) / q, 1e-3)  # 0.02 % below q, never above
        # A float32 `uniform < q` includes with probability ceil(q 2**23) / 2**23: 7 % too often.
        self.assertGreater(_float32_uniform_rate(q) / q, 1.05)
        self.assertEqual(sampling.inclusion_threshold(1.0), 2**32)  # q = 1: everyone

    def test_tiny_rate_is_not_over_sampled(self):
        # q = 2**-32 (threshold 1) on 2**20 clients x 128 rounds: 1/32 inclusion expected. A
        # float32 `uniform < q` includes whenever u = 0, with probability 2**-23: 16 expected.
        q, n, draws = 2.0**-32, 2**20, 128
        self.assertEqual(_float32_uniform_rate(q) * n * draws, 16.0)
        _, mask, overflow = _draws(
            sampling.poisson(n, q),
            draws,
            batch=16,
            compiler_options={"xla_backend_optimization_level": 3},
        )
        included = int(mask.sum() + overflow.sum())
        # Poisson(1/32): P[> 2] < 1e-5 (and Poisson(16): P[<= 2] < 1e-4).
        self.assertLessEqual(included, 2)

    def test_inclusion_rate_near_1e_3(self):
        q, n, draws = 1e-3, 20_000, 1000
        _, mask, overflow = _draws(sampling.poisson(n, q), draws)
        np.testing.assert_array_equal(overflow, 0)
        total = int(mask.sum())
        rate = sampling.inclusion_threshold(q) / 2**32
        # Binomial(n * draws, rate): two-sided test at 1e-4.
        self.assertGreater(stats.binomtest(total, n * draws, rate).pvalue, 1e-4)
        self.assertAlmostEqual(total / (n * draws), q, delta=5 * math.sqrt(q / (n * draws)))

    @parameterized.parameters((400, 0.1, None), (60, 0.5, 12), (30, 1.0, 7), (30, 1.0, None))
    def test_real_clients_come_first(self, n, q, max_cohort_size):
        s = sampling.poisson(n, q, max_cohort_size=max_cohort_size)
        ids, mask, overflow = _draws(s, 200)
        for row, m, over in zip(ids, mask, overflow):
            k = int(m.sum())
            np.testing.assert_array_equal(m, np.arange(s.cohort_size) < k)  # then padding
            self.assertLen(set(row[:k].tolist()), k)
            self.assertTrue(np.all((0 <= row) & (row < n)))
            if over:
                self.assertEqual(k, s.cohort_size)  # a full cohort before anyone is left out

    def test_poisson_overflow_is_reported(self):
        s = sampling.poisson(100, 0.5, max_cohort_size=10)
        _ids, mask, overflow = s.sample(jax.random.key(0))
        self.assertEqual(int(np.sum(np.asarray(mask))), 10)
        self.assertGreater(int(overflow), 20)

    def test_overflow_keeps_a_uniform_subset(self):
        # 0.9 of 20 clients included, 5 kept: every round overflows; who is kept is uniform.
        n, size, draws = 20, 5, 3000
        ids, mask, overflow = _draws(sampling.poisson(n, 0.9, max_cohort_size=size), draws)
        self.assertTrue(np.all(mask))
        self.assertTrue(np.all(overflow > 0))
        counts = np.bincount(ids.ravel(), minlength=n)
        self.assertGreater(stats.chisquare(counts).pvalue, 1e-4)
        # Pairs too (a subset, not just its marginals): kept together 5/20 * 4/19 of rounds.
        pairs = np.zeros((n, n))
        for row in ids:
            for a, b in itertools.combinations(row, 2):
                pairs[min(a, b), max(a, b)] += 1
        upper = pairs[np.triu_indices(n, 1)]
        self.assertGreater(stats.chisquare(upper).pvalue, 1e-4)

    def test_ties_at_the_cut_cannot_bias_who_is_kept(self):
        # Every included client has the same priority: top_k alone would keep the lowest ids.
        n, size, draws = 8, 3, 4000
        included = jnp.asarray([True, True, False, True, True, True, False, True])
        priority = jnp.zeros((n,), jnp.float32)

        @jax.jit
        @jax.vmap
        def keep(key):
            return sampling._keep_uniform_subset(included, priority, size, key)

        ids, mask = jax.device_get(keep(jax.random.split(jax.random.key(0), draws)))
        self.assertTrue(np.all(mask))
        for row in ids:
            self.assertLen(set(row.tolist()), size)
        counts = np.bincount(ids.ravel(), minlength=n)
        self.assertEqual(counts[2] + counts[6], 0)  # never a client that was not included
        real = np.flatnonzero(np.asarray(included))
        self.assertGreater(stats.chisquare(counts[real]).pvalue, 1e-4)
        # A tie below the cut does not matter; one straddling it is re-drawn among the tied.
        priority = jnp.asarray([9, 5, 5, 5, 1, 1, 1, 1], jnp.float32)
        ids, mask = jax.device_get(
            jax.jit(
                jax.vmap(
                    lambda k: sampling._keep_uniform_subset(jnp.ones((n,), bool), priority, size, k)
                )
            )(jax.random.split(jax.random.key(1), draws))
        )
        counts = np.bincount(ids.ravel(), minlength=n)
        self.assertEqual(counts[0], draws)
        self.assertEqual(counts[4:].sum(), 0)
        self.assertGreater(stats.chisquare(counts[1:4]).pvalue, 1e-4)

    def test_fewer_included_than_the_cohort_pads(self):
        included = jnp.asarray([False, True, False, False, True])
        ids, mask = sampling._keep_uniform_subset(
            included, jnp.zeros((5,), jnp.float32), 4, jax.random.key(0)
        )
        np.testing.assert_array_equal(mask, [True, True, False, False])
        self.assertEqual(sorted(np.asarray(ids)[:2].tolist()), [1, 4])

    @parameterized.parameters(
        (lambda: sampling.fixed_size(10, 11), "cohort_size"),
        (lambda: sampling.fixed_size(10, 0), "cohort_size"),
        (lambda: sampling.fixed_size(0, 1), "num_clients"),
        (lambda: sampling.poisson(10, 0.0), "sampling_rate"),
        (lambda: sampling.poisson(10, 1.2), "sampling_rate"),
        (lambda: sampling.poisson(10, 1e-10), "sampling_rate=1e-10 is below 2\\*\\*-32"),
        (lambda: sampling.poisson(10, 0.5, max_cohort_size=12), "max_cohort_size"),
    )
    def test_errors(self, fn, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            fn()


if __name__ == "__main__":
    absltest.main()
