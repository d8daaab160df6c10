"""The cohort sharded over 8 devices equals the single-device round."""

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fedjax_dp
from tests import _testing


class ShardedRoundTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        if jax.device_count() < 8:
            self.skipTest("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

    @parameterized.parameters(
        ("fedavg", 13, 8),  # 13 clients over 8 devices: padded, uneven shards
        ("dp_fedavg", 8, 8),
        ("dp_sgd_fedavg", 13, 8),
        ("dp_fedavg", 13, 2),
    )
    def test_sharded_equals_single_device(self, name, cohort, devices):
        data = _testing.small_data(num_clients=20)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(5,))
        kw = dict(name=name, cohort_size=cohort, batch_size=3, client_lr=0.3, chunk_size=2)
        if name == "dp_fedavg":
            kw.update(clip_norm=0.1, noise_multiplier=0.7)
        if name == "dp_sgd_fedavg":
            kw.update(example_clip_norm=0.5, example_noise_multiplier=0.7)
        config = fedjax_dp.AlgorithmConfig(**kw)
        mesh = jax.make_mesh((devices,), ("clients",), devices=jax.devices()[:devices])
        outs = [
            (params, history[-1])
            for params, history in _testing.single_and_sharded(config, model, data, mesh, 2)
        ]
        _testing.assert_trees_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            float(outs[0][1]["train_loss"]), float(outs[1][1]["train_loss"]), rtol=1e-5
        )
        self.assertEqual(int(outs[1][1]["num_clients"]), cohort)

    def test_sharded_poisson_cohort_equals_single_device(self):
        """Real clients first, slots dealt round-robin: each device skips its padding chunks."""
        data = _testing.small_data(num_clients=40)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(5,))
        config = fedjax_dp.AlgorithmConfig(
            name="dp_fedavg",
            sampling="poisson",
            sampling_rate=0.3,
            cohort_size=None,
            batch_size=3,
            client_lr=0.3,
            chunk_size=2,
            clip_norm=0.1,
            noise_multiplier=0.7,
        )
        mesh = jax.make_mesh((8,), ("clients",))
        (p1, h1), (p8, h8) = _testing.single_and_sharded(config, model, data, mesh, 3)
        _testing.assert_trees_close(p1, p8, rtol=1e-5, atol=1e-6)
        self.assertEqual([int(m["num_clients"]) for m in h1], [int(m["num_clients"]) for m in h8])
        self.assertGreater(int(h8[-1]["num_clients"]), 0)

    def test_mesh_without_clients_axis(self):
        data = _testing.small_data()
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes)
        mesh = jax.make_mesh((8,), ("batch",))
        with self.assertRaisesRegex(ValueError, "clients"):
            fedjax_dp.build_simulation(
                fedjax_dp.AlgorithmConfig(cohort_size=4), model, data, mesh=mesh
            )


if __name__ == "__main__":
    absltest.main()
