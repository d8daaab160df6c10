"""Models: the engine sees only a pure ``init(key) -> params`` and ``apply(params, x) -> logits``.

Any Flax (linen or nnx, through ``nnx.split``) or plain JAX model plugs in by wrapping it in
:class:`Model`. A few small Flax models are registered by name for configs and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp._src.base import Params


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


class CNN(nn.Module):
    """conv3x3(c) ReLU maxpool2 per entry of ``channels``, then a dense layer (SAME padding)."""

    channels: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


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
