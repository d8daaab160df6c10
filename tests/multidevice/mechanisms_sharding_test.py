"""DP mechanisms with the cohort sharded over 8 devices equal the single-device round."""

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fedjax_dp
from tests import _testing


class ShardedMechanismsTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        if jax.device_count() < 8:
            self.skipTest("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

    @parameterized.named_parameters(
        ("adaptive", dict(adaptive_clipping=True, clip_norm=0.3, noise_multiplier=0.5)),
        ("per_layer", dict(layer_clip_norms="Dense_0=0.1, Dense_1=0.2", noise_multiplier=0.7)),
        ("laplace", dict(mechanism="laplace", clip_norm=1.0, noise_multiplier=2.0)),
        ("local", dict(mechanism="local_gaussian", clip_norm=0.3, noise_multiplier=0.5)),
    )
    def test_sharded_equals_single_device(self, kw):
        data = _testing.small_data(num_clients=20)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(5,))
        config = fedjax_dp.AlgorithmConfig(
            name="dp_fedavg", cohort_size=13, batch_size=3, client_lr=0.3, chunk_size=2, **kw
        )
        mesh = jax.make_mesh((8,), ("clients",))
        outs = [
            (params, [float(m.get("clip_norm", np.nan)) for m in history])
            for params, history in _testing.single_and_sharded(config, model, data, mesh, 3)
        ]
        _testing.assert_trees_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5)
        if config.adaptive_clipping:  # the clip norm moved, identically on both
            self.assertAlmostEqual(outs[0][1][0], 0.3, places=6)
            self.assertNotAlmostEqual(outs[0][1][2], 0.3, places=3)


if __name__ == "__main__":
    absltest.main()
