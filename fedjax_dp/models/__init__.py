"""Models: the engine sees only a pure ``init(key) -> params`` and ``apply(params, x) -> logits``.

Any Flax (linen or nnx, through ``nnx.split``) or plain JAX model plugs in by wrapping it in
:class:`Model`. A few small Flax models are registered by name for configs and benchmarks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp.core.base import Params


class Model(NamedTuple):
    """A pure model.

    Attributes:
      init: ``key -> params``.
      apply: ``(params, x[B, *feature]) -> logits[B, num_classes]``.
      input_shape: per-example feature shape the model expects.
      num_classes: number of output classes.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    input_shape: tuple[int, ...]
    num_classes: int


def from_flax(module: nn.Module, input_shape: Sequence[int], num_classes: int) -> Model:
    """Wraps a ``flax.linen`` module whose ``__call__(x)`` returns logits."""
    input_shape = tuple(int(d) for d in input_shape)

    def init(key):
        return module.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]

    def apply(params, x):
        return module.apply({"params": params}, x)

    return Model(init, apply, input_shape, int(num_classes))


class MLP(nn.Module):
    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class PatchConv(nn.Conv):
    """``nn.Conv`` computed as image patches times the reshaped kernel (same parameters).

    Numerically the same layer as ``nn.Conv`` (same parameter names, shapes and
    initialisation), but under ``vmap`` over clients, each with its own kernel, it becomes a
    batched matrix product, where ``nn.Conv`` becomes a grouped convolution that XLA runs
    about 1.8x slower on CPU (measured on R1-cnn's shapes). Falls back to ``nn.Conv`` for
    configurations :func:`conv_patches` does not handle.
    """

    @nn.compact
    def __call__(self, inputs):
        patches = conv_patches(self, inputs)
        if patches is None:
            return super().__call__(inputs)
        kernel_shape = (*self.kernel_size, inputs.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        y = jnp.dot(
            patches.astype(self.dtype or patches.dtype),
            kernel.reshape(-1, self.features),
            precision=self.precision,
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias
        return y


def conv_patches(module: nn.Conv, a):
    """Image patches ``[B, *spatial_out, K]`` that ``module`` (an ``nn.Conv``) multiplies.

    ``K = prod(kernel_size) * C_in`` in the order of ``kernel.reshape(-1, features)``, so
    ``conv(x) == conv_patches(conv, x) @ kernel.reshape(-1, features) (+ bias)``. Returns
    None for what it does not handle (feature groups, input dilation, circular/causal
    padding, unbatched inputs).
    """
    kernel_size = tuple(module.kernel_size)
    nd = len(kernel_size)
    if a.ndim != nd + 2 or module.feature_group_count != 1:
        return None
    if (
        module.input_dilation not in (None, 1)
        and tuple(conv_tuple(module.input_dilation, nd)) != (1,) * nd
    ):
        return None
    padding = module.padding
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            return None
        padding = padding.upper()
    elif isinstance(padding, int):
        padding = [(padding, padding)] * nd
    else:
        padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    strides, dilation = conv_tuple(module.strides, nd), conv_tuple(module.kernel_dilation, nd)
    spatial = a.shape[1:-1]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(
            spatial,
            tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation)),
            strides,
            padding,
        )
    a = jnp.pad(a, ((0, 0), *[tuple(p) for p in padding], (0, 0)))
    out_size = [
        (a.shape[1 + i] - (kernel_size[i] - 1) * dilation[i] - 1) // strides[i] + 1
        for i in range(nd)
    ]
    # One strided slice per kernel tap (data movement only, no arithmetic): [B, *out, taps, C].
    taps = []
    for offset in itertools.product(*[range(k) for k in kernel_size]):
        start = [0] + [o * d for o, d in zip(offset, dilation)] + [0]
        limit = (
            [a.shape[0]]
            + [st + (n - 1) * s + 1 for st, n, s in zip(start[1:], out_size, strides)]
            + [a.shape[-1]]
        )
        taps.append(jax.lax.slice(a, start, limit, (1, *strides, 1)))
    patches = jnp.stack(taps, axis=-2)
    return patches.reshape(*patches.shape[:-2], -1)


def conv_tuple(v, nd):
    if v is None:
        return (1,) * nd
    if isinstance(v, int):
        return (v,) * nd
    return tuple(v)


class CNN(nn.Module):
    """conv3x3(c) ReLU maxpool2 per entry of ``channels``, then a dense layer (SAME padding)."""

    channels: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = PatchConv(c, (3, 3), padding="SAME")(x)
            x = max_pool_2d(nn.relu(x), 2)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


def max_pool_2d(x: jax.Array, k: int) -> jax.Array:
    """Non-overlapping ``k x k`` max pooling of ``x[B, H, W, C]`` with SAME padding.

    Equals ``nn.max_pool(x, (k, k), strides=(k, k), padding="SAME")`` in the forward pass,
    written as a reshape and a max so that its gradient is elementwise instead of XLA's
    ``select_and_scatter`` (about 7x faster on CPU for R1-cnn's shapes). At ties the
    gradient is split evenly instead of going to one position; after a ReLU the only ties
    are at zero, where the ReLU's gradient is zero anyway.
    """
    b, h, w, c = x.shape
    ph, pw = -h % k, -w % k
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=-jnp.inf)
    return x.reshape(b, (h + ph) // k, k, (w + pw) // k, k, c).max(axis=(2, 4))


def mlp(input_shape, num_classes, hidden: Sequence[int] = (64,)) -> Model:
    """A ReLU multi-layer perceptron; ``hidden=()`` is multinomial logistic regression."""
    return from_flax(MLP(tuple(hidden), num_classes), input_shape, num_classes)


def logistic(input_shape, num_classes) -> Model:
    """Multinomial logistic regression."""
    return mlp(input_shape, num_classes, hidden=())


def cnn(input_shape, num_classes, channels: Sequence[int] = (16, 32)) -> Model:
    """A small CNN for images ``[H, W, C]``."""
    if len(tuple(input_shape)) != 3:
        raise ValueError(
            f"model 'cnn' needs image inputs [H, W, C], got input_shape={tuple(input_shape)}; "
            "set data.input_shape (e.g. [8, 8, 1] for digits) or use model 'mlp'"
        )
    return from_flax(CNN(tuple(channels), num_classes), input_shape, num_classes)


_REGISTRY: dict[str, Callable[..., Model]] = {"mlp": mlp, "logistic": logistic, "cnn": cnn}


def get_model(name: str, input_shape, num_classes: int, **kwargs: Any) -> Model:
    """Builds a registered model by name (``mlp``, ``logistic``, ``cnn``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; choose one of {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[name](tuple(input_shape), int(num_classes), **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for model {name!r}: {e}") from None


def register_model(name: str, factory: Callable[..., Model]) -> None:
    """Registers ``factory(input_shape, num_classes, **options) -> Model`` under ``name``."""
    _REGISTRY[name] = factory


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, ``f32[B]``."""
    logits = logits.astype(jnp.float32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
