"""Per-client and server-side stages of the aggregation pipeline, and their DP mechanisms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_dp._src import base


def clip_per_client(clip_norm: str = "clip_norm") -> base.DPTransform:
    """Scales each client's delta to L2 norm <= ``hparams[clip_norm]``; masked clients -> 0.

    Update args: ``deltas`` leaves ``[C, *leaf]``, ``mask: bool[C]``.

    Privacy: bounds the L2 sensitivity of the SUM of deltas to ``C = hparams[clip_norm]``
    under add/remove of one client (all of its data). Clipping alone protects nothing; pair
    it with :func:`add_gaussian_noise` on the sum.

    ===========================  =======================================
    case                         result
    ===========================  =======================================
    ``clip_norm = 0``            every delta becomes 0
    ``clip_norm = inf``          no clipping
    zero-norm delta              unchanged (no division by zero)
    masked client                exactly 0 (even if its delta is NaN)
    ===========================  =======================================
    """

    def update(deltas, state, *, key=None, mask, hparams):
        del key
        c = jnp.asarray(hparams[clip_norm], jnp.float32)
        norms = jax.vmap(base.tree_l2_norm)(deltas)  # f32[C]
        scale = jnp.minimum(1.0, c / jnp.maximum(norms, 1e-30))
        scale = jnp.where(mask, scale, 0.0)

        def apply(x):
            s = scale.reshape((-1,) + (1,) * (x.ndim - 1))
            m = mask.reshape(s.shape)
            return jnp.where(m, x.astype(jnp.float32) * s, 0.0).astype(x.dtype)

        return jax.tree.map(apply, deltas), state

    return base.DPTransform(
        lambda _: base.EmptyState(), update, sensitivity=clip_norm, noise_multiplier="", unit="user"
    )


def add_gaussian_noise(
    clip_norm: str = "clip_norm", noise_multiplier: str = "noise_multiplier"
) -> base.DPTransform:
    """Adds ``N(0, (sigma * C)^2 I)`` to the summed deltas (server stage, leaves ``[*leaf]``).

    ``sigma = hparams[noise_multiplier]``, ``C = hparams[clip_norm]``.

    Privacy: with :func:`clip_per_client` on the same ``clip_norm`` the sum has L2
    sensitivity ``C`` under add/remove of one client, so one round is the Gaussian mechanism
    with noise multiplier ``sigma`` (before amplification by cohort sampling, which the
    accountant applies). Each leaf draws from its own key. ``sigma = 0`` adds nothing and
    gives no privacy (epsilon = inf).
    """

    def update(total, state, *, key, mask=None, hparams):
        del mask
        std = jnp.asarray(hparams[noise_multiplier], jnp.float32) * jnp.asarray(
            hparams[clip_norm], jnp.float32
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
