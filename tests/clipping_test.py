"""Ghost clipping equals the per-example reference, layer type by layer type."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import fedjax_dp
from fedjax_dp.mechanisms import clipping
from tests import _testing


class SeqModel(nn.Module):
    """Dense on [B, T, F] (Gram or explicit ghost norm), LayerNorm (generic path)."""

    width: int

    @nn.compact
    def __call__(self, x):
        b = x.shape[0]
        x = x.reshape(b, 4, -1)  # T = 4 positions
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(3)(x.mean(axis=1))


class ConvVariants(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="VALID")(x))
        x = nn.relu(nn.Conv(5, (2, 2), padding=((1, 0), (0, 1)), kernel_dilation=2)(x))
        x = nn.relu(nn.Conv(3, (3, 3), padding="SAME", use_bias=False)(x))
        x = nn.Conv(2, (1, 1), feature_group_count=1, padding="CIRCULAR")(x)  # generic path
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class PatchConvVariants(nn.Module):
    @nn.compact
    def __call__(self, x):
        pc = fedjax_dp.models.PatchConv
        x = nn.relu(pc(4, (3, 3), strides=(2, 2), padding="VALID")(x))
        x = nn.relu(pc(5, (2, 2), padding=((1, 0), (0, 1)), kernel_dilation=2)(x))
        x = pc(3, (3, 3), padding="SAME", use_bias=False)(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Embedder(nn.Module):
    @nn.compact
    def __call__(self, x):
        tokens = (jnp.abs(x[:, :3]) * 5).astype(jnp.int32) % 7
        e = nn.Embed(7, 4)(tokens)  # generic path (integer input)
        return nn.Dense(3)(e.reshape(e.shape[0], -1))


class SharedWeights(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(x.shape[-1])
        return nn.Dense(3)(d(nn.relu(d(x))))


class OwnParam(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return nn.Dense(3)(x * scale)


def _model(name):
    if name == "mlp":
        return fedjax_dp.get_model("mlp", (12,), 3, hidden=(7, 5))
    if name == "cnn":
        return fedjax_dp.get_model("cnn", (8, 8, 2), 3, channels=(3, 4))
    if name == "conv_variants":
        return fedjax_dp.from_flax(ConvVariants(), (9, 9, 2), 3)
    if name == "patch_conv":
        return fedjax_dp.from_flax(PatchConvVariants(), (9, 9, 2), 3)
    if name == "seq":
        return fedjax_dp.from_flax(SeqModel(6), (12,), 3)
    if name == "embed":
        return fedjax_dp.from_flax(Embedder(), (12,), 3)
    raise ValueError(name)


def _batch(model, batch=6, seed=1):
    kx, _ = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, *model.input_shape))
    y = jnp.arange(batch) % 3
    return x, y


def _loss(model):
    return lambda p, x, y: fedjax_dp.cross_entropy(model.apply(p, x), y)


class GhostClippingTest(parameterized.TestCase):
    @parameterized.parameters("mlp", "cnn", "conv_variants", "patch_conv", "seq", "embed")
    def test_ghost_equals_per_example(self, name):
        model = _model(name)
        params = model.init(jax.random.key(0))
        x, y = _batch(model)
        valid = jnp.array([True, True, False, True, True, False])
        loss = _loss(model)
        self.assertIsInstance(clipping.discover_layers(loss, params, x, y), list)

        def summed(method):  # the clip norm traced: one compile serves every bound below
            return jax.jit(
                lambda p, x, c: clipping.clipped_grad_sum(loss, p, x, y, valid, c, method=method)
            )

        ref_fn, fast_fn = summed("per_example"), summed("ghost")
        for clip in (0.05, 1.0, 1e6):  # all clipped, some clipped, none clipped
            with self.subTest(clip=clip):
                ref, fast = ref_fn(params, x, clip), fast_fn(params, x, clip)
                np.testing.assert_allclose(fast.norms, ref.norms, rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(fast.losses, ref.losses, rtol=1e-6)
                _testing.assert_trees_close(fast.summed, ref.summed, rtol=1e-4, atol=1e-6)
                # Masked rows contribute nothing: zeroing their inputs changes nothing.
                x0 = jnp.where(valid.reshape(-1, *([1] * (x.ndim - 1))), x, 0.0)
                _testing.assert_trees_close(
                    fast_fn(params, x0, clip).summed, fast.summed, rtol=1e-5, atol=1e-7
                )
        # The reference itself against a plain loop over examples (the norms do not depend
        # on the bound).
        grad_one = jax.jit(jax.grad(lambda p, x1, y1: loss(p, x1, y1)[0]))
        for i in range(x.shape[0]):
            g = grad_one(params, x[i : i + 1], y[i : i + 1])
            n = float(np.linalg.norm(_testing.tree_flat(g))) if valid[i] else 0.0
            np.testing.assert_allclose(ref.norms[i], n, rtol=1e-5)

    @parameterized.parameters(
        dict(kernel_size=(3, 3), padding="SAME"),
        dict(kernel_size=(3, 3), strides=(2, 2), padding="VALID"),
        dict(kernel_size=(2, 3), padding=((1, 0), (0, 2)), kernel_dilation=(2, 1)),
        dict(kernel_size=(3, 3), padding="SAME", use_bias=False),
        dict(kernel_size=(3,), padding="SAME"),  # 1-D
        dict(kernel_size=(3, 3), padding="CIRCULAR"),  # falls back to nn.Conv
        dict(kernel_size=(3, 3), feature_group_count=2),  # falls back to nn.Conv
    )
    def test_patch_conv_equals_conv(self, **kw):
        shape = (2, 9, 4) if len(kw["kernel_size"]) == 1 else (2, 9, 8, 4)
        x = jax.random.normal(jax.random.key(3), shape)
        ref_mod, mod = nn.Conv(6, **kw), fedjax_dp.models.PatchConv(6, **kw)
        ref_params = ref_mod.init(jax.random.key(0), x)
        params = mod.init(jax.random.key(0), x)
        _testing.assert_trees_close(params, ref_params, rtol=0, atol=0)  # same init
        np.testing.assert_allclose(
            mod.apply(params, x), ref_mod.apply(params, x), rtol=1e-5, atol=1e-5
        )

    def test_clipped_sum_respects_bound(self):
        model = _model("cnn")
        params = model.init(jax.random.key(0))
        x, y = _batch(model)
        valid = jnp.ones(6, bool).at[0].set(False)
        fast = clipping.clipped_grad_sum(_loss(model), params, x, y, valid, 0.01, method="ghost")
        self.assertLessEqual(float(np.linalg.norm(_testing.tree_flat(fast.summed))), 5 * 0.01)
        self.assertEqual(float(fast.norms[0]), 0.0)

    def test_auto_falls_back_when_model_does_not_qualify(self):
        for module in (SharedWeights(), OwnParam()):
            model = fedjax_dp.from_flax(module, (5,), 3)
            params = model.init(jax.random.key(0))
            x, y = jax.random.normal(jax.random.key(1), (4, 5)), jnp.arange(4) % 3
            loss, valid = _loss(model), jnp.ones(4, bool)
            reason = clipping.discover_layers(loss, params, x, y)
            self.assertIsInstance(reason, str)
            auto = clipping.clipped_grad_sum(loss, params, x, y, valid, 0.5, method="auto")
            ref = clipping.clipped_grad_sum(loss, params, x, y, valid, 0.5, method="per_example")
            _testing.assert_trees_close(auto.summed, ref.summed)
            with self.assertRaisesRegex(ValueError, "ghost clipping does not support"):
                clipping.clipped_grad_sum(loss, params, x, y, valid, 0.5, method="ghost")

    def test_plain_jax_model_falls_back(self):
        def apply(p, x):
            return x @ p["w"]

        params = {"w": jnp.ones((4, 3))}
        x, y = jnp.ones((2, 4)), jnp.array([0, 1])

        def loss(p, x, y):
            return fedjax_dp.cross_entropy(apply(p, x), y)

        self.assertIn("leaf layer", clipping.discover_layers(loss, params, x, y))
        out = clipping.clipped_grad_sum(loss, params, x, y, jnp.ones(2, bool), 1.0)
        ref = clipping.clipped_grad_sum(
            loss, params, x, y, jnp.ones(2, bool), 1.0, method="per_example"
        )
        _testing.assert_trees_close(out.summed, ref.summed)

    def test_bad_method(self):
        with self.assertRaisesRegex(ValueError, "clipping method='fast'"):
            clipping.clipped_grad_sum(
                None, {}, jnp.ones(1), jnp.ones(1), jnp.ones(1), 1.0, method="fast"
            )
        with self.assertRaisesRegex(ValueError, "clipping='fast'"):
            fedjax_dp.resolve(fedjax_dp.AlgorithmConfig(name="dp_sgd_fedavg", clipping="fast"))

    def test_round_with_ghost_equals_per_example_round(self):
        # The CNN has both kinds of tapped layer (a PatchConv and a Dense head); every model
        # kind is compared with the per-example reference above, outside the round.
        data = _testing.small_data(num_clients=10, feature_dim=12)
        data = data.replace(x=data.x.reshape(-1, 2, 2, 3))
        model = fedjax_dp.get_model("cnn", (2, 2, 3), data.num_classes, channels=(3,))
        results = []
        for method in ("ghost", "per_example"):
            cfg = fedjax_dp.AlgorithmConfig(
                name="dp_sgd_fedavg",
                cohort_size=5,
                batch_size=3,
                local_epochs=2,
                client_lr=0.3,
                example_clip_norm=0.2,
                example_noise_multiplier=0.5,
                chunk_size=2,
                clipping=method,
            )
            sim = fedjax_dp.build_simulation(cfg, model, data)
            state = sim.init(jax.random.key(0))
            for r in range(2):
                state, _ = sim.round_fn(state, data, sim.make_hparams(), jax.random.key(10 + r))
            results.append(state.params)
        _testing.assert_trees_close(results[0], results[1], rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    absltest.main()
