"""Gaussian and Laplace samplers whose support reaches the far tail, in float32.

Why: float32 ``jax.random.normal`` is ``sqrt(2) erfinv(u)`` with ``u`` on a grid of
``2^-22`` in ``(-1, 1)``, so no key ever gives a value outside ``[-5.42, 5.22]``;
``jax.random.laplace`` (``-log`` of such a uniform) stays inside about ``[-15.5, 16.6]``.
Noise with a bounded support gives an unbounded privacy loss on the missing tail: where the
sensitivity moves an output past the bound, one neighbour's output law has mass there and
the other's has none, and that mass adds straight to ``delta``. For ``q = 0.01``,
``T = 1000`` and noise multiplier 1 the result is ``delta >= 1.2e-4`` where ``1e-5`` is
claimed, and the Laplace mechanism loses pure DP outright. The samplers here reach far
enough that the mass they leave out is below ``2^-63``.

Construction (float32 arithmetic only; ``jax_enable_x64`` is not needed):

1. **A uniform with 64-bit resolution near 0.** Two words ``(hi, lo)`` are the binary
   fraction ``0.b_1 b_2 ... b_64``, completed by a marker bit to ``0.b_1 ... b_64 1``, the
   midpoint of its ``2^-64`` cell. ``K`` = the number of leading zero bits (``lax.clz``),
   so ``P(K = k) = 2^-(k+1)`` EXACTLY for ``k <= 63`` (``P(K = 64) = 2^-64``: all zero,
   where the marker is the leading one). The 23 bits after the leading one are the mantissa
   ``m``: all random for ``K <= 40``; for ``K > 40`` the ``63 - K`` random bits, then the
   marker (the midpoint of the coarser cell), then zeros. ``U = 2^-(K+1) (1 + m 2^-23)`` is
   assembled exactly by a bitcast, in ``[2^-65, 1 - 2^-24]`` (never 0, never 1).
2. **Exponential(1):** ``E = -log(U) = K ln 2 + R`` with ``R = -log((1 + m 2^-23) / 2)`` in
   ``(0, ln 2]``. ``K`` has the exact geometric law, which is what makes the tail right:
   ``P(E > k ln 2) = 2^-k = exp(-k ln 2)`` holds exactly for every ``k <= 64``; between
   those points ``R`` is the exponential law truncated to ``(0, ln 2]``, quantised to
   ``2^min(23, 63 - K)`` cells of equal probability (exactly). The only rounding is
   float32's ``log`` (a few ulp of ``E``).
3. **Gaussian pairs (Box-Muller):** ``(z1, z2) = sqrt(2E) (cos, sin)(theta)`` with ``theta``
   uniform on the ``2^26`` midpoints ``(j + 1/2) 2 pi / 2^26`` of a third word: its lowest 3
   bits pick the octant (swap and signs), its top 23 bits the angle ``phi`` in ``(0, pi/4)``,
   whose sine and cosine are short Taylor polynomials (error ``< 2^-28``) rather than
   ``jnp.sin``/``jnp.cos`` (which cost more than the random bits on CPU). So the radius obeys
   ``P(r > t) = exp(-t^2 / 2)`` exactly at ``t = sqrt(2 k ln 2)``, the angle is uniform on
   its grid, and the pair is ``N(0, I_2)`` up to these quantisations and float32 rounding.
4. **Laplace:** ``sign * E``, the sign from the lowest bit of ``lo``; ``E`` reads the other
   63 bits as ``0.b_1 ... b_63 1`` (the sign's place holds the marker): ``K`` exact for
   ``k <= 62`` and ``P(K = 63) = 2^-63``, so ``P(E > k ln 2) = 2^-k`` exactly for every
   ``k <= 63``.

Random words: with a threefry key one threefry2x32 hash gives two words
(``jax.random.bits`` XORs them into one), so the samplers hash counters themselves: 3 hashes
per 4 normals (``jax.random.normal``: 4) and 1 per Laplace sample. Other key
implementations (``rbg``, ``unsafe_rbg``, custom) go through ``jax.random.bits``: 1.5 words
per normal, 2 per Laplace sample. The bits -> sample maps (``_gaussian_from_bits``,
``_laplace_from_bits``) are pure, so tests evaluate them at crafted bits.

Support (the largest magnitude that any bits reach):

==========================  ==================  =======================================
sampler                     largest ``|x|``     mass beyond the last exact tail point
==========================  ==================  =======================================
float32 jax.random.normal   5.42 sigma          ``~2^-23`` (``P(Z > 5.42) = 3e-8``)
:func:`gaussian`            9.49 sigma          ``P(r > 9.42) = 2^-64 = 5.4e-20``
float32 jax.random.laplace  16.6 scales         ``~2^-24``
:func:`laplace`             44.36 scales        ``P(E > 63 ln 2) = 2^-63 = 1.1e-19``
==========================  ==================  =======================================

``9.49 = sqrt(2 * 65 ln 2)`` (all 64 bits zero, angle near 0) and ``44.36 = 64 ln 2``: the
mass of the tail beyond ``sqrt(128 ln 2) = 9.42`` sigma (``63 ln 2 = 43.7`` scales) is kept
but folded onto one atom just past that point. What a neighbour can push past the support
has, under the exact mechanism, probability about ``P(Z > 9.42 - 1 / z)`` per coordinate
(``2e-17`` at noise multiplier ``z = 1``), orders of magnitude below any ``delta`` in use.

Not addressed: float rounding of ``x + noise`` itself (Mironov, "On significance of the
least significant bits for differential privacy", CCS 2012): the low-order bits of a
released float can depend on ``x``. This module fixes the gross (tail) defect, not that one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import random as jex_random

_MAX_COUNTERS = 2**32
# Taylor coefficients of sin(phi)/phi and cos(phi) in phi^2; on [0, pi/4] the first omitted
# terms are phi^11/11! < 2e-9 and phi^12/12! < 2e-10.
_SIN = (1.0, -1 / 6, 1 / 120, -1 / 5040, 1 / 362880)
_COS = (1.0, -1 / 2, 1 / 24, -1 / 720, 1 / 40320, -1 / 3628800)
_PHI_STEP = math.pi / 4 * 2.0**-24  # phi = (2f + 1) * _PHI_STEP, f < 2^23: (2f + 1) exact


def _exponential_from_bits(hi: jax.Array, lo: jax.Array, *, midpoint: bool = True) -> jax.Array:
    """Exponential(1) variates from 64 random bits each: ``-log`` of a fine-grained uniform.

    Args:
      hi: ``uint32[...]``, the 32 leading bits of ``0.b_1 ... b_64``.
      lo: ``uint32[...]`` (same shape), the 32 trailing bits.
      midpoint: read the bits as ``0.b_1 ... b_64 1``, the midpoint of their ``2^-64`` cell
        (so all zero is ``2^-65``). False: as ``0.b_1 ... b_64``, for callers whose ``b_64``
        already is that marker (and is never all zero).

    Returns:
      ``f32[...]`` in ``(0, 65 ln 2]``: ``E = K ln 2 + R`` with ``K`` the leading-zero count
      of the bits (see the module docstring).
    """
    hi = jnp.asarray(hi, jnp.uint32)
    lo = jnp.asarray(lo, jnp.uint32)
    one = jnp.uint32(1)
    hi_zero = hi == 0
    clz_hi = lax.clz(hi)
    clz_lo = lax.clz(lo)
    k = jnp.where(hi_zero, 32 + clz_lo, clz_hi)  # in [0, 64]
    # The 32 bits after the leading one, left aligned; every shift amount stays in [0, 31].
    # With hi != 0 all 32 are random bits; with hi == 0 only 31 - clz(lo) are, and the next
    # one is the midpoint marker (the marker alone is the leading one when lo == 0 too).
    kh = jnp.minimum(clz_hi, 31)
    kl = jnp.minimum(clz_lo, 31)
    after_hi = lax.shift_left(lax.shift_left(hi, kh), one) | lax.shift_right_logical(lo, 31 - kh)
    after_lo = lax.shift_left(lax.shift_left(lo, kl), one)
    if midpoint:
        after_lo = after_lo | jnp.where(lo == 0, jnp.uint32(0), lax.shift_left(one, kl))
    mantissa = lax.shift_right_logical(jnp.where(hi_zero, after_lo, after_hi), jnp.uint32(9))
    exponent = (126 - k).astype(jnp.uint32)  # biased exponent of 2^-(K+1), >= 62
    u = lax.bitcast_convert_type(lax.shift_left(exponent, jnp.uint32(23)) | mantissa, jnp.float32)
    return -jnp.log(u)


def _unit_circle_from_bits(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)(theta)``, ``theta`` uniform on ``2^26`` midpoints, from one word each."""
    f = lax.shift_right_logical(w, jnp.uint32(9)).astype(jnp.float32)  # 23 bits: exact
    phi = (2.0 * f + 1.0) * jnp.float32(_PHI_STEP)  # in (0, pi/4)
    phi2 = phi * phi
    sin = jnp.float32(_SIN[-1])
    for c in _SIN[-2::-1]:
        sin = sin * phi2 + jnp.float32(c)
    sin = sin * phi
    cos = jnp.float32(_COS[-1])
    for c in _COS[-2::-1]:
        cos = cos * phi2 + jnp.float32(c)
    # Octant: the angles k pi/2 +- phi, i.e. (+-cos, +-sin) and (+-sin, +-cos).
    swap = (w & 1) != 0
    x = jnp.where(swap, sin, cos)
    y = jnp.where(swap, cos, sin)
    x = jnp.where((w & 2) != 0, -x, x)
    y = jnp.where((w & 4) != 0, -y, y)
    return x, y


def _box_muller(hi: jax.Array, lo: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    radius = jnp.sqrt(2.0 * _exponential_from_bits(hi, lo))
    x, y = _unit_circle_from_bits(jnp.asarray(w, jnp.uint32))
    return radius * x, radius * y


def _gaussian_from_bits(bits: jax.Array) -> jax.Array:
    """Pairs of independent standard normals from three random words each (Box-Muller).

    Args:
      bits: ``uint32[3, P]``: rows 0 and 1 (``hi``, ``lo``) give the radius through
        :func:`_exponential_from_bits`, row 2 the angle.

    Returns:
      ``f32[2, P]``: row 0 is ``r cos(theta)``, row 1 ``r sin(theta)``; ``|x| <= 9.4926``.
    """
    bits = jnp.asarray(bits, jnp.uint32)
    return jnp.stack(_box_muller(bits[0], bits[1], bits[2]))


def _laplace_from_bits(bits: jax.Array) -> jax.Array:
    """Standard Laplace variates (scale 1) from two random words each.

    Args:
      bits: ``uint32[2, N]``; the lowest bit of row 1 is the sign, the other 63 bits feed
        :func:`_exponential_from_bits` (as ``0.b_1 ... b_63 1``).

    Returns:
      ``f32[N]`` with ``|x| <= 64 ln 2 = 44.36``.
    """
    bits = jnp.asarray(bits, jnp.uint32)
    # 63 random bits, then the midpoint marker in place of the sign bit.
    e = _exponential_from_bits(bits[0], bits[1] | jnp.uint32(1), midpoint=False)
    return jnp.where((bits[1] & 1) == 1, -e, e)


def _random_words(key: jax.Array, num_pairs: int, size: int) -> list[jax.Array]:
    """``2 * num_pairs`` independent ``uint32[size]`` words from one key.

    Threefry keys: word pair ``i`` is threefry2x32 of the counters ``(i, 0..size-1)`` (both
    halves of each hash are used). Other implementations: one ``jax.random.bits`` call.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape:
        raise ValueError(f"key must be a single key, got shape {key.shape}")
    if str(jax.random.key_impl(key)) == "threefry2x32":
        if size > _MAX_COUNTERS:
            raise ValueError(f"{size=} counters exceed 2^32")
        k1, k2 = jax.random.key_data(key)
        count = lax.iota(jnp.uint32, size)
        words = []
        for i in range(num_pairs):
            words.extend(
                jex_random.threefry2x32_p.bind(k1, k2, jnp.full((size,), i, jnp.uint32), count)
            )
        return words
    bits = jax.random.bits(key, (2 * num_pairs, size), jnp.uint32)
    return [bits[i] for i in range(2 * num_pairs)]


def _check_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype={dtype} must be a floating dtype")
    return dtype


def gaussian(key: jax.Array, shape: tuple[int, ...] = (), dtype=jnp.float32) -> jax.Array:
    """Standard normal samples with support to 9.49 sigma; drop-in for ``jax.random.normal``.

    Computed in float32 (Box-Muller pairs, see the module docstring), then cast to ``dtype``.
    Samples come in groups of four per counter ``(r1 cos, r1 sin, r2 cos, r2 sin)``, laid out
    as four contiguous quarters of the flattened output; every entry is an independent
    ``N(0, 1)``.

    Args:
      key: a typed ``jax.random.key``, a single key (threefry, rbg, unsafe_rbg or custom).
      shape: the output shape.
      dtype: a floating dtype (float32, bfloat16, float16; float64 gets float32 samples).

    Returns:
      ``dtype[shape]``.

    Raises:
      ValueError: if ``dtype`` is not floating or ``key`` is not a single key.

    Privacy: the noise of a Gaussian mechanism. Unlike float32 ``jax.random.normal``
    (bounded by 5.42 sigma, which breaks the claimed ``delta``), the radial tail
    ``P(r > t) = exp(-t^2/2)`` is exact on the grid ``t = sqrt(2 k ln 2)`` up to 9.42 sigma,
    and the remaining ``2^-64`` of mass per pair lies at most 9.49 sigma out. Float rounding
    of ``x + noise`` is not protected against.

    Examples:
      >>> import jax
      >>> from fedjax_dp.mechanisms import noise
      >>> noise.gaussian(jax.random.key(0), (2, 3)).shape
      (2, 3)
    """
    dtype = _check_dtype(dtype)
    n = math.prod(shape)
    quads = -(-n // 4)
    hi1, lo1, hi2, lo2, wa, wb = _random_words(key, 3, quads)
    x1, y1 = _box_muller(hi1, lo1, wa)
    x2, y2 = _box_muller(hi2, lo2, wb)
    z = jnp.concatenate([x1, y1, x2, y2])[:n]
    return z.reshape(shape).astype(dtype)


def laplace(key: jax.Array, shape: tuple[int, ...] = (), dtype=jnp.float32) -> jax.Array:
    """Standard Laplace samples with support to 44 scales; drop-in for ``jax.random.laplace``.

    Computed in float32 from 64 random bits per sample, then cast to ``dtype``.

    Args:
      key: a typed ``jax.random.key``, a single key.
      shape: the output shape.
      dtype: a floating dtype.

    Returns:
      ``dtype[shape]``, density ``exp(-|x|) / 2``.

    Raises:
      ValueError: if ``dtype`` is not floating or ``key`` is not a single key.

    Privacy: the noise of the Laplace mechanism. float32 ``jax.random.laplace`` stops at
    16.6 scales, so the mechanism is not pure DP (the missing tail becomes a ``delta``). Here
    ``P(|x| > k ln 2) = 2^-k`` holds exactly for every ``k <= 63`` (43.7 scales) and the last
    ``2^-63`` of mass lies at 44.36 scales, so at ``eps = 1 / sigma`` the leftover
    ``delta`` is about ``exp(-(43.7 - 1 / sigma)) / 2`` per coordinate (``2e-19`` at
    ``sigma = 1``). Exact pure DP is out of reach for any finite-precision sampler.

    Examples:
      >>> import jax
      >>> from fedjax_dp.mechanisms import noise
      >>> noise.laplace(jax.random.key(0), (4,)).dtype
      dtype('float32')
    """
    dtype = _check_dtype(dtype)
    n = math.prod(shape)
    hi, lo = _random_words(key, 1, n)
    x = _laplace_from_bits(jnp.stack([hi, lo]))
    return x.reshape(shape).astype(dtype)
