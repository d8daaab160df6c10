"""Per-client and server-side stages of the aggregation pipeline, and their DP mechanisms.

Mechanisms (user level: neighbouring datasets differ by one client's whole data):

=====================================  ==============================================
stages                                 one round is
=====================================  ==============================================
:func:`clip_per_client` +              the Gaussian mechanism, multiplier sigma,
:func:`add_gaussian_noise`             L2 sensitivity ``C``
:func:`clip_per_layer` +               the Gaussian mechanism, multiplier sigma,
:func:`add_gaussian_noise`             L2 sensitivity ``sqrt(sum_g C_g^2)``
:func:`adaptive_clipping`              the Gaussian mechanism, multiplier ``z``, on
                                       the deltas and the clipped count jointly
``clip_per_client(norm="l1")`` +       the Laplace mechanism, pure
:func:`add_laplace_noise`              ``eps = 1 / sigma``, L1 sensitivity ``C``
:func:`clip_per_client` +              local DP: each client's released update is the
:func:`add_local_gaussian_noise`       Gaussian mechanism on that client's data
=====================================  ==============================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_dp.core import base
from fedjax_dp.core import hparams as hparams_lib
from fedjax_dp.mechanisms import noise as noise_lib

_NORMS = ("l2", "l1")


def clip_per_client(clip_norm: str = "clip_norm", *, norm: str = "l2") -> base.DPTransform:
    """Scales each client's delta to ``norm``-norm <= ``hparams[clip_norm]``; masked -> 0.

    Update args: ``deltas`` leaves ``[C, *leaf]``, ``mask: bool[C]``.

    Args:
      clip_norm: name of the hparam holding the clip norm ``C``.
      norm: ``"l2"`` (for Gaussian noise) or ``"l1"`` (for :func:`add_laplace_noise`): the
        norm of the whole delta (all leaves together) that is bounded.

    Privacy: bounds the ``norm`` sensitivity of the SUM of deltas to ``C = hparams[clip_norm]``
    under add/remove of one client (all of its data); ``2C`` under replacing one client's
    data. Clipping alone protects nothing; pair it with :func:`add_gaussian_noise` (L2) or
    :func:`add_laplace_noise` (L1) on the sum, or :func:`add_local_gaussian_noise` (L2) on
    each client's update.

    ===========================  =======================================
    case                         result
    ===========================  =======================================
    ``clip_norm = 0``            every delta becomes 0
    ``clip_norm = inf``          no clipping
    zero-norm delta              unchanged (no division by zero)
    masked client                exactly 0 (even if its delta is NaN)
    ===========================  =======================================
    """

    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r} must be one of {_NORMS}")
    norm_fn = base.tree_l2_norm if norm == "l2" else _tree_l1_norm

    def update(deltas, state, *, key=None, mask, hparams):
        del key
        c = jnp.asarray(hparams[clip_norm], jnp.float32)
        norms = jax.vmap(norm_fn)(deltas)  # f32[C]
        scale = jnp.minimum(1.0, c / jnp.maximum(norms, 1e-30))
        return jax.tree.map(lambda x: _scale_rows(x, scale, mask), deltas), state

    return base.DPTransform(
        lambda _: base.EmptyState(),
        update,
        sensitivity=clip_norm,
        noise_multiplier="",
        unit="user",
        norm=norm,
    )


def add_gaussian_noise(
    clip_norm: str | Sequence[str] = "clip_norm", noise_multiplier: str = "noise_multiplier"
) -> base.DPTransform:
    """Adds ``N(0, (sigma * C)^2 I)`` to the summed deltas (server stage, leaves ``[*leaf]``).

    ``sigma = hparams[noise_multiplier]``, ``C = hparams[clip_norm]``; with a sequence of
    names (one clip norm per parameter group, :func:`clip_per_layer`) ``C`` is the combined
    L2 sensitivity ``sqrt(sum_g hparams[name_g]^2)`` and the same std is added to every
    coordinate.

    Privacy: with :func:`clip_per_client` (or :func:`clip_per_layer`) on the same
    ``clip_norm`` the sum has L2 sensitivity ``C`` under add/remove of one client, so one
    round is the Gaussian mechanism with noise multiplier ``sigma`` (before amplification by
    cohort sampling, which the accountant applies). Each leaf draws from its own key.
    ``sigma = 0`` adds nothing and gives no privacy (epsilon = inf).
    """
    clip_norm = clip_norm if isinstance(clip_norm, str) else tuple(clip_norm)

    def update(total, state, *, key, mask=None, hparams):
        del mask
        std = jnp.asarray(hparams[noise_multiplier], jnp.float32) * base.sensitivity_value(
            clip_norm, hparams
        )
        noise = base.gaussian_like(key, total, std)
        return jax.tree.map(jnp.add, total, noise), state

    return base.DPTransform(
        lambda _: base.EmptyState(),
        update,
        sensitivity=clip_norm,
        noise_multiplier=noise_multiplier,
        unit="user",
    )


# ----------------------------------------------------------------------------- per-layer clipping


def layer_clip_hparam(pattern: str) -> str:
    """The hparam name of the clip norm of the parameter group ``pattern``: ``clip_norm[...]``."""
    return f"clip_norm[{pattern}]"


def clip_per_layer(clip_norms: Mapping[str, str] | Sequence[tuple[str, str]]) -> base.DPTransform:
    """Clips each parameter group of each client's delta to its own L2 norm; masked -> 0.

    Update args: ``deltas`` leaves ``[C, *leaf]``, ``mask: bool[C]``.

    Args:
      clip_norms: ``(pattern, hparam name)`` pairs in order (or a mapping): a parameter
        group per pattern, clipped to ``C_g = hparams[name]``. A leaf, named by its
        ``/``-joined path (``"Dense_0/kernel"``), belongs to the FIRST pattern that matches
        a prefix of its path made of whole components (``re.match(f"(?:{pattern})(?:/|$)",
        path)``): ``"Dense_0"`` covers ``Dense_0/kernel`` and ``Dense_0/bias`` but not
        ``Dense_01/...``; ``".*"`` takes every remaining leaf. Every leaf must belong to a
        group and every group must hold a leaf (checked when the round is traced).

    Privacy: under add/remove of one client, group ``g`` of the sum moves by at most
    ``C_g`` in L2, all groups at once, so the L2 sensitivity of the whole sum is
    ``S = sqrt(sum_g C_g^2)`` (attained by a client at the bound in every group); ``2S``
    under replacing one client's data. The DP metadata names all group clip norms
    (``sensitivity`` is the tuple of names) and :func:`add_gaussian_noise` given the same
    names adds ``N(0, (sigma S)^2)`` to every coordinate: one Gaussian mechanism with
    multiplier ``sigma`` over ``S``, which is what the accountant sees.

    Why the same noise on every coordinate, rather than noise ``sigma sqrt(G) C_g`` on group
    ``g`` (also exactly one Gaussian mechanism with multiplier ``sigma``): with isotropic
    noise, group ``g`` released on its own is a Gaussian mechanism with multiplier
    ``sigma S / C_g >= sigma``, so a group with a smaller clip norm is protected more. That
    is the point of a sensitivity map (e.g. small norms on an embedding or output layer that
    memorises): it sets per-group protection, while the accounted guarantee for the whole
    update stays the single multiplier ``sigma``. Proportional noise would give every group
    the same protection ``sigma sqrt(G)`` and only shift utility between groups.
    """
    pairs = tuple(clip_norms.items()) if isinstance(clip_norms, Mapping) else tuple(clip_norms)
    if not pairs:
        raise ValueError("clip_norms is empty; give at least one (pattern, hparam name) pair")
    compiled = []
    for pattern, name in pairs:
        try:
            compiled.append(re.compile(f"(?:{pattern})(?:/|$)"))
        except re.error as e:
            raise ValueError(
                f"clip group pattern {pattern!r} is not a regular expression: {e}"
            ) from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"clip group {pattern!r}: hparam name {name!r} must be a string")
    names = tuple(name for _, name in pairs)
    if len(set(names)) != len(names):
        raise ValueError(f"clip group hparam names {names} must be distinct")

    def update(deltas, state, *, key=None, mask, hparams):
        del key
        paths, leaves, treedef = _leaf_paths(deltas)
        group = group_of_leaves(paths, [p for p, _ in pairs], compiled)
        sq = [
            jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim))) for x in leaves
        ]
        scales = []
        for g, name in enumerate(names):
            norm_g = jnp.sqrt(sum(sq[i] for i in range(len(leaves)) if group[i] == g))  # f32[C]
            c = jnp.asarray(hparams[name], jnp.float32)
            scales.append(jnp.minimum(1.0, c / jnp.maximum(norm_g, 1e-30)))
        out = [_scale_rows(x, scales[group[i]], mask) for i, x in enumerate(leaves)]
        return jax.tree.unflatten(treedef, out), state

    return base.DPTransform(
        lambda _: base.EmptyState(),
        update,
        sensitivity=names,
        noise_multiplier="",
        unit="user",
        norm="l2",
    )


def group_of_leaves(paths: Sequence[str], patterns: Sequence[str], compiled=None) -> list[int]:
    """For each leaf path, the index of the first pattern that covers it (see clip_per_layer)."""
    compiled = compiled or [re.compile(f"(?:{p})(?:/|$)") for p in patterns]
    group = []
    for path in paths:
        g = next((i for i, rx in enumerate(compiled) if rx.match(path)), None)
        if g is None:
            raise ValueError(
                f"parameter {path!r} matches no clip group {list(patterns)}; add a pattern for "
                "it (e.g. '.*' last, for every remaining parameter)"
            )
        group.append(g)
    empty = [patterns[i] for i in range(len(patterns)) if i not in group]
    if empty:
        raise ValueError(
            f"clip group(s) {empty} match no parameter of {list(paths)} (an earlier pattern "
            "may take them all)"
        )
    return group


def leaf_paths(tree) -> list[str]:
    """The ``/``-joined paths of a pytree's leaves (``"Dense_0/kernel"``), in leaf order."""
    return _leaf_paths(tree)[0]


def _leaf_paths(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        for path, _ in flat
    ]
    return paths, [x for _, x in flat], treedef


# ----------------------------------------------------------------------------- Laplace


def add_laplace_noise(
    clip_norm: str = "clip_norm", noise_multiplier: str = "noise_multiplier"
) -> base.DPTransform:
    """Adds i.i.d. ``Laplace(b)`` noise, ``b = sigma * C``, to every coordinate of the sum.

    Server stage, leaves ``[*leaf]``; ``sigma = hparams[noise_multiplier]`` (the ratio of
    the Laplace scale to the L1 sensitivity, ``dp_accounting``'s ``LaplaceDpEvent``
    parameter), ``C = hparams[clip_norm]``. Pair it with ``clip_per_client(clip_norm,
    norm="l1")``: the round refuses an L2 clip.

    Privacy: the clipped sum has L1 sensitivity ``C`` under add/remove of one client, so one
    round is the Laplace mechanism, pure ``eps_round = C / b = 1 / sigma`` (``delta = 0``)
    before amplification by cohort sampling; under replacing one client's data (fixed-size
    sampling) the L1 sensitivity is ``2C`` and ``eps_round = 2 / sigma``. See
    :class:`fedjax_dp.accounting.RoundPrivacy` (``mechanism="laplace"``) for how rounds are
    composed. ``sigma = 0`` adds nothing (epsilon = inf). L1 clipping is much tighter than L2
    clipping in high dimension (``|x|_1`` can reach ``sqrt(d) |x|_2``): expect lower utility
    than the Gaussian mechanism for large models.
    """

    def update(total, state, *, key, mask=None, hparams):
        del mask
        scale = jnp.asarray(hparams[noise_multiplier], jnp.float32) * base.sensitivity_value(
            clip_norm, hparams, norm="l1"
        )
        leaves, treedef = jax.tree.flatten(total)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            (x.astype(jnp.float32) + scale * noise_lib.laplace(k, x.shape, jnp.float32)).astype(
                x.dtype
            )
            for k, x in zip(keys, leaves)
        ]
        return jax.tree.unflatten(treedef, noisy), state

    return base.DPTransform(
        lambda _: base.EmptyState(),
        update,
        sensitivity=clip_norm,
        noise_multiplier=noise_multiplier,
        unit="user",
        norm="l1",
        mechanism="laplace",
    )


# ----------------------------------------------------------------------------- local DP


def add_local_gaussian_noise(
    clip_norm: str | Sequence[str] = "clip_norm", noise_multiplier: str = "noise_multiplier"
) -> base.DPTransform:
    """Local DP: every client adds ``N(0, (sigma * C)^2 I)`` to its own clipped delta.

    CLIENT stage, after a clip stage on the same ``clip_norm`` (:func:`clip_per_client` or
    :func:`clip_per_layer`, whose combined ``C = sqrt(sum_g C_g^2)`` is then used). Update
    args: ``deltas`` leaves ``[C, *leaf]``, per-client keys ``key[C]`` (each client noises
    with its own key), ``mask: bool[C]`` (masked clients stay exactly 0). The server adds no
    noise.

    Privacy (local model): what leaves client ``i`` is ``clip(delta_i) + N(0, (sigma C)^2
    I)``. Two arbitrary datasets of that client give clipped deltas at L2 distance at most
    ``2C``, so each released update is the Gaussian mechanism with multiplier ``sigma / 2``
    with respect to replacing the client's data: an (eps, delta) guarantee that holds
    against the server and anyone who sees the update, with no trust in aggregation. Over
    a run, the client's releases compose over the rounds it participates in; the accountant
    (``mechanism="local_gaussian"``) conservatively counts EVERY round (no amplification by
    sampling: a client knows it took part, and so may an observer of its upload) and no
    amplification by aggregation (the sum over clients and the central view would be more
    private, but it is not claimed). The noise on the sum has std ``sigma C sqrt(n)`` for
    ``n`` clients, so utility is far below central DP at the same sigma.
    """
    clip_norm = clip_norm if isinstance(clip_norm, str) else tuple(clip_norm)

    def update(deltas, state, *, key, mask, hparams):
        std = jnp.asarray(hparams[noise_multiplier], jnp.float32) * base.sensitivity_value(
            clip_norm, hparams
        )
        noise = jax.vmap(lambda k, d: base.gaussian_like(k, d, std))(key, deltas)

        def add(x, n):
            m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(m, x.astype(jnp.float32) + n.astype(jnp.float32), 0.0).astype(x.dtype)

        return jax.tree.map(add, deltas, noise), state

    return base.DPTransform(
        lambda _: base.EmptyState(),
        update,
        sensitivity=clip_norm,
        noise_multiplier=noise_multiplier,
        unit="user",
        norm="l2",
        mechanism="local_gaussian",
    )


# ----------------------------------------------------------------------------- adaptive clipping


class AdaptiveClipState(NamedTuple):
    """State of :func:`adaptive_clipping`'s server stage."""

    clip_norm: jax.Array  # shape=(), dtype=float32: C_t, the clip norm of the next round


def value_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The noise multiplier on the clipped deltas when adaptive clipping spends part of ``z``.

    ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021, Thm. 1), where ``z`` is
    the noise multiplier of the whole round (what the accountant uses) and ``sigma_b`` the
    std of the noise on the clipped count. ``z = 0`` gives ``0`` (no privacy).

    Raises:
      ValueError: ``z >= 2 sigma_b``: the count noise alone would already exceed the privacy
        budget of the round; raise ``clipped_count_stddev`` (or lower the noise multiplier).
    """
    z, sb = float(noise_multiplier), float(clipped_count_stddev)
    if math.isnan(z) or z < 0 or math.isinf(z):
        raise ValueError(f"noise_multiplier={z} must be finite and >= 0")
    if math.isnan(sb) or sb < 0 or math.isinf(sb):
        raise ValueError(f"clipped_count_stddev={sb} must be finite and >= 0")
    if z == 0:
        return 0.0
    if not z < 2.0 * sb:
        raise ValueError(
            f"adaptive clipping needs noise_multiplier < 2 * clipped_count_stddev (the noise "
            f"split z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 must be real), but noise_multiplier="
            f"{z:g} and clipped_count_stddev={sb:g}; raise clipped_count_stddev (default 0.05 x "
            f"expected cohort size, so a larger cohort also works) to above {z / 2:g}, or lower "
            "noise_multiplier"
        )
    return (z**-2 - (2.0 * sb) ** -2) ** -0.5


def unclipped_stat_name(clip_norm: str = "clip_norm") -> str:
    """The name of the per-client statistic ``1[|delta_i| <= C] - 1/2`` of adaptive clipping."""
    return f"{clip_norm}:unclipped"


def adaptive_clipping(
    initial_clip_norm: float,
    expected_cohort_size: float,
    *,
    clip_norm: str = "clip_norm",
    noise_multiplier: str = "noise_multiplier",
    target_quantile: str = "target_quantile",
    clip_lr: str = "clip_lr",
    clipped_count_stddev: str = "clipped_count_stddev",
) -> tuple[base.DPTransform, base.DPTransform]:
    """User-level DP with a clip norm that tracks a quantile of the update norms.

    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
    Clipping", NeurIPS 2021. Returns ``(client_stage, server_stage)``: put the first in the
    round's client stages, the second in its server stages (in place of
    :func:`clip_per_client` and :func:`add_gaussian_noise`).

    The clip norm ``C_t`` is STATE: it lives in the server stage's state (initialised to
    ``initial_clip_norm``) and its ``state_hparams`` hook publishes it as
    ``hparams[clip_norm]`` at the start of each round, so the clip stage and the noise stage
    of round ``t`` both use ``C_t``, and the round's metrics report it. Round ``t``:

    1. each client reports ``b_i = 1[|delta_i|_2 <= C_t]`` (before clipping), as the
       centred ``b_i - 1/2`` (a per-client statistic summed through the chunk scan), and
       clips ``delta_i`` to ``C_t``;
    2. the server adds ``N(0, (z_delta C_t)^2 I)`` to the sum of clipped deltas and
       ``N(0, sigma_b^2)`` to ``sum_i (b_i - 1/2)``, with ``z_delta`` from
       :func:`value_noise_multiplier`;
    3. ``b_bar = (sum_i (b_i - 1/2) + noise) / m + 1/2`` with ``m`` the public
       ``expected_cohort_size`` (equal to the paper's ``(sum_i b_i + noise) / m`` when ``m``
       clients take part), and ``C_{t+1} = C_t exp(-eta (b_bar - gamma))`` (geometric
       update): ``C`` shrinks when more than a fraction ``gamma`` of the updates fit.

    Hyper-parameters read: ``hparams[noise_multiplier] = z`` (the round's total noise
    multiplier), ``hparams[target_quantile] = gamma`` (0.5: the median),
    ``hparams[clip_lr] = eta`` (0.2), ``hparams[clipped_count_stddev] = sigma_b`` (usually
    ``0.05 m``). ``hparams[clip_norm]`` is set by the state; do not pass it.

    Privacy: neighbouring datasets differ by adding/removing one client's whole data. The
    round releases the pair (noisy sum of clipped deltas, noisy ``sum_i (b_i - 1/2)``). One
    client moves the first by at most ``C_t`` in L2 and the second by exactly ``1/2`` (the
    centring is what halves the count's sensitivity, for any number of participants). The
    noises are independent Gaussians of std ``z_delta C_t`` and ``sigma_b``, so the pair is
    one Gaussian mechanism whose sensitivity, measured in noise stds, is
    ``sqrt(z_delta^-2 + (2 sigma_b)^-2) = 1 / z``: exactly the Gaussian mechanism with noise
    multiplier ``z``, which the accountant composes (with sampling amplification) as for
    fixed clipping. Under replacing one client's data both sensitivities double (``2C_t``
    and ``1``), the ratio the accountant's replace-one analysis assumes. ``C_t`` depends on
    the data only through earlier rounds' released outputs (post-processing), and the
    composition theorems the accountant uses are adaptive. The reported clip norm is such a
    post-processed value, safe to publish.

    ================================  ==========================================
    case                              result
    ================================  ==========================================
    ``z = 0``                         no value noise (no privacy; epsilon = inf)
    ``z >= 2 sigma_b``                ``ValueError`` on the host
                                      (:func:`value_noise_multiplier`); NaN if
                                      such hparams reach the round anyway
    masked client                     contributes 0 to both sums
    ================================  ==========================================
    """
    c0 = float(initial_clip_norm)
    if not c0 > 0 or math.isinf(c0):
        raise ValueError(f"initial_clip_norm={initial_clip_norm!r} must be finite and > 0")
    m = float(expected_cohort_size)
    if not m > 0 or math.isinf(m):
        raise ValueError(f"expected_cohort_size={expected_cohort_size!r} must be finite and > 0")
    stat = unclipped_stat_name(clip_norm)

    def unclipped(deltas, *, hparams):
        c = jnp.asarray(hparams[clip_norm], jnp.float32)
        norms = jax.vmap(base.tree_l2_norm)(deltas)
        return (norms <= c).astype(jnp.float32) - 0.5

    client_stage = clip_per_client(clip_norm)._replace(client_stats={stat: unclipped})

    def init(params):
        del params
        return AdaptiveClipState(clip_norm=jnp.asarray(c0, jnp.float32))

    def update(total, state, *, key, mask=None, hparams):
        del mask
        z = jnp.asarray(hparams[noise_multiplier], jnp.float32)
        sigma_b = jnp.asarray(hparams[clipped_count_stddev], jnp.float32)
        c = state.clip_norm
        value_key, count_key = jax.random.split(key)
        noisy_total = jax.tree.map(
            jnp.add, total, base.gaussian_like(value_key, total, _value_multiplier(z, sigma_b) * c)
        )
        count_noise = sigma_b * noise_lib.gaussian(count_key, (), jnp.float32)
        fraction = (jnp.asarray(hparams[stat], jnp.float32) + count_noise) / m + 0.5
        gamma = jnp.asarray(hparams[target_quantile], jnp.float32)
        eta = jnp.asarray(hparams[clip_lr], jnp.float32)
        new_c = c * jnp.exp(-eta * (fraction - gamma))
        return noisy_total, AdaptiveClipState(clip_norm=new_c)

    server_stage = base.DPTransform(
        init,
        update,
        sensitivity=clip_norm,
        noise_multiplier=noise_multiplier,
        unit="user",
        norm="l2",
        mechanism="gaussian",
        state_hparams=lambda state: {clip_norm: state.clip_norm},
        hparams=(
            hparams_lib.CLIP_NORM.set_from_state(clip_norm),
            hparams_lib.NOISE_MULTIPLIER.renamed(noise_multiplier),
            hparams_lib.TARGET_QUANTILE.renamed(target_quantile),
            hparams_lib.CLIP_LR.renamed(clip_lr),
            hparams_lib.CLIPPED_COUNT_STDDEV.renamed(clipped_count_stddev),
        ),
    )
    return client_stage, server_stage


def _value_multiplier(z: jax.Array, sigma_b: jax.Array) -> jax.Array:
    """Traced :func:`value_noise_multiplier`: 0 for ``z = 0``, NaN where the split fails."""
    safe_z = jnp.where(z > 0, z, 1.0)
    inv = safe_z**-2 - (2.0 * jnp.maximum(sigma_b, 1e-30)) ** -2
    z_delta = jnp.where(inv > 0, jnp.maximum(inv, 1e-30) ** -0.5, jnp.nan)
    return jnp.where(z > 0, z_delta, 0.0)


# ----------------------------------------------------------------------------- helpers


def _tree_l1_norm(tree) -> jax.Array:
    """L1 norm of a pytree (all leaves together), computed in float32."""
    return sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def _scale_rows(x: jax.Array, scale: jax.Array, mask: jax.Array) -> jax.Array:
    """``x[c] * scale[c]`` in float32, cast back; masked rows exactly 0 (even NaN ones)."""
    s = scale.reshape((-1,) + (1,) * (x.ndim - 1))
    m = mask.reshape(s.shape)
    return jnp.where(m, x.astype(jnp.float32) * s, 0.0).astype(x.dtype)
