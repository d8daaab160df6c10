"""The memory model behind the automatic chunk size, and a gathering aggregator's buffer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import fedjax_dp
from fedjax_dp.core import memory
from tests import _testing


def _setup(hidden=(8,), batch=4):
    model = fedjax_dp.get_model("mlp", (6,), 3, hidden=hidden)
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, 6), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def loss_fn(p, a, b):
        return fedjax_dp.cross_entropy(model.apply(p, a), b)

    return loss_fn, params, x, y


def _param_count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


class PerClientBytesTest(absltest.TestCase):
    def test_per_example_gradients_add_one_param_copy_per_example(self):
        loss_fn, params, x, y = _setup(batch=5)
        plain = memory.per_client_bytes(loss_fn, params, x, y, per_example_grads=False)
        dp = memory.per_client_bytes(loss_fn, params, x, y, per_example_grads=True)
        self.assertEqual(dp - plain, 5 * 4 * _param_count(params))

    def test_grows_with_the_model(self):
        small = memory.per_client_bytes(*_setup(hidden=(8,)), per_example_grads=False)
        large = memory.per_client_bytes(*_setup(hidden=(64,)), per_example_grads=False)
        self.assertGreater(large, small)


class AutoChunkTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.args = _setup()
        self.need = memory.per_client_bytes(*self.args, per_example_grads=False)

    def test_largest_chunk_within_the_budget(self):
        for k in (1, 3, 7):
            self.assertEqual(
                memory.auto_chunk_size(100, *self.args, budget_bytes=k * self.need + 1), k
            )
        self.assertEqual(memory.auto_chunk_size(100, *self.args, budget_bytes=self.need - 1), 1)

    def test_never_more_than_each_device_processes(self):
        big = 1000 * self.need
        self.assertEqual(memory.auto_chunk_size(10, *self.args, budget_bytes=big), 10)
        self.assertEqual(memory.auto_chunk_size(10, *self.args, budget_bytes=big, num_devices=4), 3)

    def test_fixed_bytes_come_out_of_the_budget(self):
        fixed = 10 * self.need
        self.assertEqual(
            memory.auto_chunk_size(
                100, *self.args, budget_bytes=fixed + 3 * self.need, fixed_bytes=fixed
            ),
            3,
        )
        self.assertEqual(
            memory.auto_chunk_size(100, *self.args, budget_bytes=fixed, fixed_bytes=2 * fixed),
            1,
        )

    def test_bad_budgets(self):
        with self.assertRaisesRegex(ValueError, "budget_bytes=0 must be positive"):
            memory.auto_chunk_size(10, *self.args, budget_bytes=0)
        with self.assertRaisesRegex(ValueError, "fixed_bytes=-1 must be >= 0"):
            memory.auto_chunk_size(10, *self.args, budget_bytes=10, fixed_bytes=-1)


class GatherAggregatorMemoryTest(absltest.TestCase):
    def test_buffer_bytes(self):
        _, params, _, _ = _setup()
        p = _param_count(params)
        median = fedjax_dp.aggregators.coordinate_median()
        self.assertEqual(memory.aggregator_bytes(median, params, 20), 4 * p * 20)
        self.assertEqual(memory.aggregator_bytes(median, params, 20, num_uploads=2), 8 * p * 20)
        self.assertEqual(
            memory.aggregator_bytes(fedjax_dp.aggregators.weighted_sum(), params, 20), 0
        )

    def test_auto_chunk_leaves_room_for_the_buffer(self):
        data = _testing.small_data(num_clients=40)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(16,))
        config = fedjax_dp.AlgorithmConfig(
            name="fedavg", cohort_size=40, batch_size=4, local_epochs=1
        )
        params = jax.eval_shape(model.init, jax.random.key(0))
        buffer = memory.aggregator_bytes(fedjax_dp.aggregators.coordinate_median(), params, 40)
        plain = fedjax_dp.build_simulation(
            dataclasses.replace(config, memory_budget_mb=2 * buffer / 2**20),
            model,
            data,
        )
        gathered = fedjax_dp.build_simulation(
            dataclasses.replace(config, memory_budget_mb=2 * buffer / 2**20),
            model,
            data,
            aggregator=fedjax_dp.aggregators.coordinate_median(),
        )
        self.assertLess(gathered.config.chunk_size, plain.config.chunk_size)
        # The round with the median runs and moves the model.
        state = gathered.init(jax.random.key(0))
        before = jax.device_get(state.params)  # the round donates its state
        new, _ = gathered.round_fn(
            state, data.to_device(), gathered.make_hparams(), jax.random.key(1)
        )
        moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), new.params, before)
        self.assertGreater(max(jax.tree.leaves(moved)), 0.0)

    def test_dp_noise_with_a_median_is_refused(self):
        data = _testing.small_data(num_clients=20)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(4,))
        with self.assertRaisesRegex(ValueError, "coordinate_median"):
            fedjax_dp.build_simulation(
                fedjax_dp.AlgorithmConfig(name="dp_fedavg", cohort_size=5, batch_size=4),
                model,
                data,
                aggregator=fedjax_dp.aggregators.coordinate_median(),
            )


if __name__ == "__main__":
    absltest.main()
