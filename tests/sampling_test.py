"""Cohort sampling on device."""

import jax
import numpy as np
from absl.testing import absltest, parameterized
from scipy import stats

from fedjax_dp import sampling


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
        sample = jax.jit(s.sample)
        sizes, counts = [], np.zeros(n)
        for r in range(300):
            ids, mask, overflow = sample(jax.random.key(r))
            ids, mask = np.asarray(ids), np.asarray(mask)
            self.assertEqual(int(overflow), 0)
            real = ids[mask]
            self.assertLen(set(real.tolist()), len(real))
            sizes.append(len(real))
            counts[real] += 1
        self.assertGreater(s.cohort_size, n * q)
        # cohort size ~ Binomial(n, q)
        self.assertAlmostEqual(np.mean(sizes), n * q, delta=4 * np.sqrt(n * q * (1 - q) / 300))
        self.assertAlmostEqual(np.var(sizes), n * q * (1 - q), delta=0.35 * n * q * (1 - q))
        self.assertAlmostEqual(counts.mean() / 300, q, delta=0.01)

    def test_poisson_overflow_is_reported(self):
        s = sampling.poisson(100, 0.5, max_cohort_size=10)
        _ids, mask, overflow = s.sample(jax.random.key(0))
        self.assertEqual(int(np.sum(np.asarray(mask))), 10)
        self.assertGreater(int(overflow), 20)

    @parameterized.parameters(
        (lambda: sampling.fixed_size(10, 11), "cohort_size"),
        (lambda: sampling.fixed_size(10, 0), "cohort_size"),
        (lambda: sampling.fixed_size(0, 1), "num_clients"),
        (lambda: sampling.poisson(10, 0.0), "sampling_rate"),
        (lambda: sampling.poisson(10, 1.2), "sampling_rate"),
        (lambda: sampling.poisson(10, 0.5, max_cohort_size=11), "max_cohort_size"),
    )
    def test_errors(self, fn, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            fn()


if __name__ == "__main__":
    absltest.main()
