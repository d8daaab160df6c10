"""The DP noise samplers: distribution, far tail, purity, dtypes, and their use by the stages.

The tail cannot be sampled directly on a CPU (``P(|z| > 5.5) = 3.8e-8``), so it is checked by
strata: the leading-zero count ``K`` of the radius bits has the exact law
``P(K = k) = 2^-(k+1)`` (checked on sampled bits for small ``k``), and crafted bits with
exactly ``k`` leading zeros give the conditional law in every stratum, so
``P(|z| > t) = sum_k 2^-(k+1) P(|z| > t | K = k)`` is estimated to 1% at ``t`` up to 8.5
sigma. A constant-bits key implementation drives the stages end to end: float32
``jax.random.normal`` never leaves ``[-5.42, 5.22]`` for any bits, the samplers here reach 9.49.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.extend import random as jex_random
from scipy import stats

import fedjax_dp
from fedjax_dp.core import base
from fedjax_dp.mechanisms import noise

_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
_LN2 = math.log(2.0)
_GAUSS_MAX = math.sqrt(130 * _LN2)  # 9.4926: all radius bits zero
_LAPLACE_MAX = 64 * _LN2  # 44.36: all 63 magnitude bits zero


def _constant_bits_impl():
    """A key implementation whose every random word is the key's seed (for crafted bits)."""
    return jex_random.define_prng_impl(
        key_shape=(1,),
        seed=lambda s: jnp.reshape(s.astype(jnp.uint32), (1,)),
        split=lambda k, shape: jnp.broadcast_to(k, (*shape, 1)),
        random_bits=lambda k, width, shape: jnp.full(shape, k[0], jnp.dtype(f"uint{width}")),
        fold_in=lambda k, data: k,
        name="constant_bits",
    )


_CONSTANT = _constant_bits_impl()
# Words that push float32 jax.random.normal / laplace to their extremes, and the new samplers.
_EXTREME_WORDS = (0, 0xFFFFFFFF, 0x80000000, 1)


def _constant_key(word: int) -> jax.Array:
    return jax.random.key(word, impl=_CONSTANT)


def _with_leading_zeros(k: int, n: int, rng: np.random.Generator, width: int = 64):
    """``(hi, lo)`` whose top ``width`` bits have exactly ``k`` leading zeros, the rest uniform.

    ``k = width`` means all ``width`` bits zero. ``width=63`` is the Laplace layout: ``k``
    counts within the 63 magnitude bits, the lowest bit (the sign) stays uniform.
    """
    r = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    low = 64 - width
    if k >= width:
        v = np.zeros(n, np.uint64)
    else:
        top = r >> np.uint64(low)
        tail = top >> np.uint64(k + 1) if k + 1 < 64 else np.zeros(n, np.uint64)
        v = tail | np.uint64(1 << (width - 1 - k))
    v = (v << np.uint64(low)) | (r & np.uint64((1 << low) - 1))
    return (v >> np.uint64(32)).astype(np.uint32), (v & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _truncated_exponential_cdf(x):
    """CDF of Exp(1) conditioned on (0, ln 2]."""
    return (1 - np.exp(-x)) / 0.5


def _quarters(z: np.ndarray) -> list[np.ndarray]:
    """The four quarters of ``noise.gaussian``'s flat output: (x1, y1, x2, y2) of the pairs."""
    q = len(z) // 4
    return [z[i * q : (i + 1) * q] for i in range(4)]


class GaussianDistributionTest(parameterized.TestCase):
    @parameterized.product(impl=_IMPLS, jit=(True, False))
    def test_ks_accepts_sigma_and_rejects_two_thirds_and_three_halves(self, impl, jit):
        sigma, n = 0.7, 200_000
        tree = {"a": jnp.zeros((n,)), "b": jnp.zeros((3, 5))}
        fun = jax.jit(base.gaussian_like) if jit else base.gaussian_like
        z = np.asarray(fun(jax.random.key(0, impl=impl), tree, jnp.float32(sigma))["a"])
        self.assertGreater(stats.kstest(z, stats.norm(scale=sigma).cdf).pvalue, 1e-3)
        for wrong in (sigma * 2 / 3, sigma * 3 / 2):
            self.assertLess(stats.kstest(z, stats.norm(scale=wrong).cdf).pvalue, 1e-6)

    @parameterized.parameters(*_IMPLS)
    def test_mean_variance_kurtosis_of_every_quarter(self, impl):
        n = 4 * 250_000
        z = np.asarray(noise.gaussian(jax.random.key(1, impl=impl), (n,)), np.float64)
        for part in [z, *_quarters(z)]:
            m = len(part)
            self.assertLess(abs(part.mean()), 5 / math.sqrt(m))
            self.assertLess(abs(part.var() - 1.0), 5 * math.sqrt(2 / m))
            self.assertLess(abs(np.mean(part**4) - 3.0), 5 * math.sqrt(96 / m))  # Var z^4 = 96
            self.assertGreater(stats.kstest(part, "norm").pvalue, 1e-4)

    def test_pair_members_are_independent(self):
        """Box-Muller pairs share a radius: their squares must still be uncorrelated."""
        z = np.asarray(noise.gaussian(jax.random.key(2), (4 * 250_000,)), np.float64)
        x1, y1, x2, y2 = _quarters(z)
        bound = 5 / math.sqrt(len(x1))
        for a, b in ((x1, y1), (x2, y2), (x1, x2), (y1, y2)):
            self.assertLess(abs(np.corrcoef(a, b)[0, 1]), bound)
            self.assertLess(abs(np.corrcoef(a**2, b**2)[0, 1]), bound)

    @parameterized.parameters(*_IMPLS)
    def test_leading_zero_count_is_geometric_on_sampled_bits(self, impl):
        """K = floor(E / ln 2), E = r^2 / 2: P(K = k) = 2^-(k+1), through the real key path."""
        z = np.asarray(noise.gaussian(jax.random.key(3, impl=impl), (4 * 2**19,)), np.float64)
        x1, y1, x2, y2 = _quarters(z)
        e = np.concatenate([(x1**2 + y1**2) / 2, (x2**2 + y2**2) / 2])
        k = np.floor(e / _LN2).astype(int)
        top = 14
        observed = np.bincount(np.minimum(k, top), minlength=top + 1)
        expected = len(e) * np.array([2.0 ** -(j + 1) for j in range(top)] + [2.0**-top])
        self.assertGreater(stats.chisquare(observed, expected).pvalue, 1e-4)
        # And the exponential law itself, P(E > t) = exp(-t), in the bulk.
        self.assertGreater(stats.kstest(e, "expon").pvalue, 1e-4)


class GaussianTailTest(parameterized.TestCase):
    def test_all_zero_bits_give_the_largest_value(self):
        z = np.asarray(noise._gaussian_from_bits(jnp.zeros((3, 1), jnp.uint32)))
        self.assertAlmostEqual(float(z[0, 0]), _GAUSS_MAX, delta=1e-5)
        self.assertGreater(float(z[0, 0]), 8.0)

    def test_every_stratum_lands_in_its_radius_band(self):
        """K leading zeros -> E in (K ln 2, (K+1) ln 2], i.e. r in that band, for K = 0..64."""
        rng = np.random.default_rng(0)
        fun = jax.jit(noise._exponential_from_bits)
        for k in range(65):
            hi, lo = _with_leading_zeros(k, 2_000, rng)
            e = np.asarray(fun(hi, lo), np.float64)
            tol = 1e-5 * max(k, 1)
            self.assertTrue(np.all(e > k * _LN2 - tol), msg=f"K={k}: min {e.min()}")
            self.assertTrue(np.all(e <= (k + 1) * _LN2 + tol), msg=f"K={k}: max {e.max()}")
            if k <= 40:  # >= 23 bits after the leading one: R is the truncated exponential
                pvalue = stats.kstest(e - k * _LN2, _truncated_exponential_cdf).pvalue
                self.assertGreater(pvalue, 1e-4, msg=f"K={k}")

    def test_exponential_matches_a_float64_reference(self):
        rng = np.random.default_rng(1)
        hi = rng.integers(0, 2**32, 200_000, dtype=np.uint64)
        hi >>= rng.integers(0, 33, hi.shape).astype(np.uint64)  # many leading zeros too
        lo = rng.integers(0, 2**32, 200_000, dtype=np.uint64)
        e = np.asarray(noise._exponential_from_bits(hi.astype(np.uint32), lo.astype(np.uint32)))
        # The midpoint 0.b_1 ... b_64 1 of the bits' cell, in float64.
        u = hi.astype(np.float64) * 2.0**-32 + lo.astype(np.float64) * 2.0**-64 + 2.0**-65
        ref = -np.log(u)
        # U keeps 24 significant bits of it (|dE| <= 2^-23), then float32 rounding of log.
        np.testing.assert_array_less(np.abs(e - ref), 2.0**-23 + 4 * 2.0**-24 * ref + 1e-12)

    @parameterized.parameters(5.5, 6.5, 7.5, 8.5)
    def test_tail_probability_by_strata(self, t):
        """sum_k 2^-(k+1) P(|z| > t | K = k) = 2 Phi(-t); float32 jax.random.normal gives 0."""
        rng = np.random.default_rng(int(10 * t))
        fun = jax.jit(noise._gaussian_from_bits)
        first = math.ceil(t * t / 2 / _LN2) - 1  # lower strata have r < t
        n = 100_000
        estimate = 0.0
        for k in range(first, 65):
            hi, lo = _with_leading_zeros(k, n, rng)
            w = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
            z = np.asarray(fun(np.stack([hi, lo, w])))
            estimate += 2.0 ** -(k + 1) * np.mean(np.abs(z) > t)  # both rows are N(0, 1)
        exact = 2 * stats.norm.sf(t)
        self.assertAlmostEqual(estimate / exact, 1.0, delta=0.01)

    def test_gaussian_like_reaches_past_8_sigma(self):
        """Fails with float32 jax.random.normal: over every constant word its max is 5.42."""
        tree = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((), jnp.bfloat16)}
        peak = max(
            float(jnp.max(jnp.abs(x.astype(jnp.float32))))
            for w in _EXTREME_WORDS
            for x in jax.tree.leaves(base.gaussian_like(_constant_key(w), tree, 1.0))
        )
        self.assertGreater(peak, 8.0)
        old_peak = max(
            float(jnp.max(jnp.abs(jax.random.normal(_constant_key(w), (4,)))))
            for w in _EXTREME_WORDS
        )
        self.assertLess(old_peak, 5.5)  # what the old sampler could ever reach

    def test_support_bound_over_the_bits_image(self):
        """U grows with the bits, so r is largest at hi = lo = 0: nothing exceeds 9.4926."""
        rng = np.random.default_rng(2)
        top = float(noise._gaussian_from_bits(jnp.zeros((3, 1), jnp.uint32))[0, 0])
        for k in range(56, 64):  # the strata just below the all-zero atom
            hi, lo = _with_leading_zeros(k, 10_000, rng)
            w = rng.integers(0, 2**32, 10_000, dtype=np.uint64).astype(np.uint32)
            z = np.asarray(noise._gaussian_from_bits(np.stack([hi, lo, w])))
            self.assertLess(np.abs(z).max(), top, msg=f"K={k}")
        self.assertGreater(np.abs(z).max(), 9.3)  # K = 63: r = sqrt(2 (64 ln 2 - ln 1.5))


class LaplaceTest(parameterized.TestCase):
    @parameterized.product(impl=_IMPLS, jit=(True, False))
    def test_ks_accepts_scale_and_rejects_two_thirds_and_three_halves(self, impl, jit):
        b, n = 1.3, 200_000
        fun = jax.jit(noise.laplace, static_argnums=1) if jit else noise.laplace
        x = b * np.asarray(fun(jax.random.key(5, impl=impl), (n,)), np.float64)
        self.assertGreater(stats.kstest(x, stats.laplace(scale=b).cdf).pvalue, 1e-3)
        for wrong in (b * 2 / 3, b * 3 / 2):
            self.assertLess(stats.kstest(x, stats.laplace(scale=wrong).cdf).pvalue, 1e-6)
        self.assertLess(abs(x.mean()), 5 * b * math.sqrt(2 / n))

    def test_crafted_bits_reach_past_30_scales(self):
        x = np.asarray(noise._laplace_from_bits(jnp.array([[0, 0], [0, 1]], jnp.uint32)))
        np.testing.assert_allclose(x, [_LAPLACE_MAX, -_LAPLACE_MAX], rtol=1e-6)
        self.assertGreater(x[0], 30.0)

    def test_every_stratum_lands_in_its_band(self):
        rng = np.random.default_rng(3)
        fun = jax.jit(noise._laplace_from_bits)
        for k in range(64):
            hi, lo = _with_leading_zeros(k, 2_000, rng, width=63)
            x = np.asarray(fun(np.stack([hi, lo])), np.float64)
            tol = 1e-5 * max(k, 1)
            self.assertTrue(np.all(np.abs(x) > k * _LN2 - tol), msg=f"K={k}")
            self.assertTrue(np.all(np.abs(x) <= (k + 1) * _LN2 + tol), msg=f"K={k}")
            np.testing.assert_array_equal(np.signbit(x), (lo & 1) == 1)

    @parameterized.parameters(10.0, 20.0, 30.0, 40.0)
    def test_tail_probability_by_strata(self, t):
        """P(|x| > t) = exp(-t): jax.random.laplace in float32 gives 0 beyond 16.6."""
        rng = np.random.default_rng(int(t))
        fun = jax.jit(noise._laplace_from_bits)
        n, estimate = 100_000, 0.0
        for k in range(math.floor(t / _LN2), 64):
            hi, lo = _with_leading_zeros(k, n, rng, width=63)
            x = np.asarray(fun(np.stack([hi, lo])))
            weight = 2.0 ** -(k + 1) if k < 63 else 2.0**-63  # K = 63: all 63 bits zero
            estimate += weight * np.mean(np.abs(x) > t)
        self.assertAlmostEqual(estimate / math.exp(-t), 1.0, delta=0.01)

    def test_laplace_stage_reaches_past_30_scales(self):
        """Fails with jax.random.laplace (max 16.6 scales over every constant word)."""
        stage = fedjax_dp.add_laplace_noise()
        hp = {"clip_norm": jnp.float32(0.5), "noise_multiplier": jnp.float32(2.0)}  # b = 1
        total = {"w": jnp.zeros((3,))}
        peak = max(
            float(
                jnp.max(jnp.abs(stage.update(total, (), key=_constant_key(w), hparams=hp)[0]["w"]))
            )
            for w in _EXTREME_WORDS
        )
        self.assertGreater(peak, 30.0)


class AdaptiveCountNoiseTest(absltest.TestCase):
    def test_count_noise_reaches_past_8_sigma(self):
        """Recovers the clipped-count noise from C_{t+1}; float32 jax.random.normal gives 5.42."""
        m, c0, sigma_b, eta, gamma = 10.0, 0.5, 0.5, 0.2, 0.5
        _, server = fedjax_dp.adaptive_clipping(c0, m)
        hp = {
            "noise_multiplier": jnp.float32(0.5),
            "clipped_count_stddev": jnp.float32(sigma_b),
            "target_quantile": jnp.float32(gamma),
            "clip_lr": jnp.float32(eta),
            "clip_norm:unclipped": jnp.float32(0.0),
        }
        _, st = server.update(
            {"w": jnp.zeros((2,))}, server.init(None), key=_constant_key(0), hparams=hp
        )
        fraction = gamma - math.log(float(st.clip_norm) / c0) / eta
        count_noise = (fraction - 0.5) * m
        self.assertAlmostEqual(count_noise / sigma_b, _GAUSS_MAX, delta=1e-3)


class PropertiesTest(parameterized.TestCase):
    @parameterized.product(sampler=("gaussian", "laplace"), impl=_IMPLS)
    def test_pure_and_distinct_across_keys_and_positions(self, sampler, impl):
        fun = getattr(noise, sampler)
        key = jax.random.key(7, impl=impl)
        a = np.asarray(fun(key, (1001,)))
        np.testing.assert_array_equal(a, np.asarray(fun(key, (1001,))))
        jitted = jax.jit(fun, static_argnums=1)
        np.testing.assert_array_equal(jitted(key, (1001,)), jitted(key, (1001,)))
        # Fused (jit) and op-by-op float32 arithmetic may differ in the last ulp.
        np.testing.assert_allclose(a, jitted(key, (1001,)), rtol=4 * 2.0**-24, atol=1e-30)
        b = np.asarray(fun(jax.random.fold_in(key, 1), (1001,)))
        self.assertLess(np.mean(a == b), 0.01)
        self.assertEqual(len(np.unique(a)), a.size)  # no word reused within a draw

    def test_gaussian_like_one_key_per_leaf_and_vmap_equals_loop(self):
        tree = {"a": jnp.zeros((64,)), "b": jnp.zeros((64,))}
        keys = jax.random.split(jax.random.key(8), 3)
        got = jax.vmap(lambda k: base.gaussian_like(k, tree, jnp.float32(1.0)))(keys)
        self.assertFalse(np.any(np.asarray(got["a"]) == np.asarray(got["b"])))
        for i in range(3):
            ref = base.gaussian_like(keys[i], tree, jnp.float32(1.0))
            for name in tree:
                np.testing.assert_array_equal(got[name][i], ref[name])

    @parameterized.product(
        sampler=("gaussian", "laplace"), dtype=(jnp.float32, jnp.bfloat16, jnp.float16)
    )
    def test_dtype_sweep_is_float32_cast_at_the_end(self, sampler, dtype):
        fun = getattr(noise, sampler)
        spec = jax.ShapeDtypeStruct((5, 7), dtype)
        key = jax.random.key(9)
        got = fun(key, spec.shape, spec.dtype)
        self.assertEqual((got.shape, got.dtype), (spec.shape, spec.dtype))
        np.testing.assert_array_equal(got, fun(key, spec.shape, jnp.float32).astype(dtype))
        leaf = base.gaussian_like(key, {"x": jnp.zeros(spec.shape, spec.dtype)}, 2.0)["x"]
        self.assertEqual(leaf.dtype, spec.dtype)

    @parameterized.parameters(
        dict(shape=()), dict(shape=(0,)), dict(shape=(1,)), dict(shape=(3,)), dict(shape=(2, 3, 7))
    )
    def test_shapes(self, shape):
        for fun in (noise.gaussian, noise.laplace):
            out = fun(jax.random.key(10), shape)
            self.assertEqual(out.shape, shape)
            self.assertTrue(np.all(np.isfinite(np.asarray(out))))

    def test_bad_arguments_raise(self):
        with self.assertRaisesRegex(ValueError, "floating"):
            noise.gaussian(jax.random.key(0), (3,), jnp.int32)
        with self.assertRaisesRegex(ValueError, "single key"):
            noise.laplace(jax.random.split(jax.random.key(0), 2), (3,))

    def test_legacy_uint32_key_matches_the_typed_key(self):
        raw = jax.random.PRNGKey(11)
        np.testing.assert_array_equal(
            noise.gaussian(raw, (9,)), noise.gaussian(jax.random.wrap_key_data(raw), (9,))
        )


if __name__ == "__main__":
    absltest.main()
