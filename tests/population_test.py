"""Host-resident populations: gathered cohorts, prefetching, and equality with device rounds."""

import gc
import threading

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fedjax_dp
from fedjax_dp import population as pop_lib
from tests import _testing

_ALGORITHMS = {
    "fedavg": dict(cohort_size=7, weighting="num_examples"),
    # Poisson: a padded cohort of 20 slots with about 6 real clients, the rest masked.
    "dp_fedavg": dict(sampling="poisson", sampling_rate=0.3, clip_norm=0.1, noise_multiplier=0.7),
    "dp_sgd_fedavg": dict(cohort_size=5, example_clip_norm=0.5, example_noise_multiplier=0.7),
}


def _population(num_clients=20):
    data = _testing.small_data(num_clients=num_clients)
    return data, pop_lib.HostPopulation.from_federated_data(data)


def _sim(population, name="fedavg", **overrides):
    kw = dict(name=name, batch_size=3, client_lr=0.3, chunk_size=4, **_ALGORITHMS[name])
    kw.update(overrides)
    model = fedjax_dp.get_model("mlp", population.feature_shape, population.num_classes, hidden=())
    return fedjax_dp.build_simulation(fedjax_dp.AlgorithmConfig(**kw), model, population)


def _keys(n, seed=3):
    return [jax.random.fold_in(jax.random.key(seed), r) for r in range(n)]


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "fedjax_dp-cohort-prefetch"]


class HostRoundEqualsDeviceRoundTest(parameterized.TestCase):
    @parameterized.parameters("fedavg", "dp_fedavg", "dp_sgd_fedavg")
    def test_three_rounds_bit_for_bit(self, name):
        data, population = _population()
        sim = _sim(population, name)  # built from the population: the same static facts
        hp = sim.make_hparams()
        keys = _keys(3)
        dev = data.to_device()
        state = sim.init(jax.random.key(0))
        want = []
        for key in keys:
            state, metrics = sim.round_fn(state, dev, hp, key)
            want.append(metrics)
        got_state, got = pop_lib.run_rounds(sim, sim.init(jax.random.key(0)), population, hp, keys)

        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(got_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        self.assertLen(got, 3)
        for m_dev, m_host in zip(want, got):
            for k in m_dev:
                np.testing.assert_array_equal(np.asarray(m_dev[k]), np.asarray(m_host[k]))
        self.assertFalse(_prefetch_threads())
        if name == "dp_fedavg":  # the Poisson cohorts really had padding slots
            self.assertTrue(all(int(m["num_clients"]) < sim.sampler.cohort_size for m in got))
        # One compilation serves every gathered cohort.
        self.assertEqual(sim.round_fn._cache_size(), 2)  # device-resident + host-resident

    def test_cohort_of_wrong_size_is_rejected(self):
        data, population = _population()
        sim = _sim(population)
        key = jax.random.key(0)
        cohort = sim.round.sample(key)
        state = sim.init(jax.random.key(0))
        with self.assertRaisesRegex(ValueError, "exactly the cohort's 7 clients"):
            sim.round_fn(state, data, sim.make_hparams(), key, cohort)


class GatherTest(absltest.TestCase):
    def test_fixed_shapes_contents_and_padding(self):
        data, population = _population()
        m = population.max_count
        ids = np.array([3, 0, 17, 5])
        mask = np.array([True, True, False, True])
        got = population.gather(ids, mask)
        self.assertEqual(got.x.shape, (4 * m, *data.feature_shape))
        self.assertEqual(got.x.dtype, np.float32)
        self.assertEqual(got.y.shape, (4 * m,))
        self.assertEqual(got.y.dtype, np.int32)
        np.testing.assert_array_equal(got.offsets, np.arange(4) * m)
        self.assertEqual((got.max_count, got.num_classes), (m, data.num_classes))
        for slot, (cid, real) in enumerate(zip(ids, mask)):
            x_slot = got.x[slot * m : (slot + 1) * m]
            y_slot = got.y[slot * m : (slot + 1) * m]
            if not real:  # padding: one zero example, nothing read from client 17
                self.assertEqual(int(got.counts[slot]), 1)
                self.assertFalse(np.any(x_slot))
                continue
            x_k, y_k = data.client(int(cid))
            n = len(y_k)
            self.assertEqual(int(got.counts[slot]), n)
            np.testing.assert_array_equal(x_slot[:n], x_k)
            np.testing.assert_array_equal(y_slot[:n], y_k)
            self.assertFalse(np.any(x_slot[n:]))
        # Any cohort of the same size has the same shapes (one compilation).
        other = population.gather(np.array([1, 2, 4, 19]))
        self.assertEqual(
            jax.tree.map(np.shape, jax.tree.leaves(other)),
            jax.tree.map(np.shape, jax.tree.leaves(got)),
        )

    def test_narrow_storage_and_noncontiguous_blocks(self):
        x = np.arange(12, dtype=np.float16).reshape(6, 2)
        y = np.array([0, 1, 2, 0, 1, 2], np.uint8)
        # Client 0 owns rows 4..5, client 1 rows 0..2 (row 3 belongs to nobody).
        population = pop_lib.HostPopulation(x, y, counts=[2, 3], offsets=[4, 0])
        self.assertEqual((population.num_clients, population.max_count), (2, 3))
        self.assertEqual(population.num_classes, 3)
        got = population.gather([0, 1])
        np.testing.assert_array_equal(got.x[:2], x[4:6].astype(np.float32))
        np.testing.assert_array_equal(got.y[3:6], [0, 1, 2])
        self.assertEqual(got.x.dtype, np.float32)

    def test_invalid_inputs(self):
        x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
        with self.assertRaisesRegex(ValueError, "at least one"):
            pop_lib.HostPopulation(x, y, counts=[4, 0])
        with self.assertRaisesRegex(ValueError, "outside"):
            pop_lib.HostPopulation(x, y, counts=[2, 2], offsets=[0, 3])
        with self.assertRaisesRegex(ValueError, "num_classes"):
            pop_lib.HostPopulation(x, y + 5, counts=[4], num_classes=3)
        population = pop_lib.HostPopulation(x, y, counts=[1, 3])
        with self.assertRaisesRegex(ValueError, "not in"):
            population.gather([0, 2])
        population.gather([0, 2], [True, False])  # a masked slot's id is never read


class PrefetchTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        _, self.population = _population()
        self.sim = _sim(self.population, "dp_fedavg")

    def test_yields_the_rounds_cohorts_in_order(self):
        keys = _keys(5, seed=9)
        with pop_lib.prefetch_cohorts(self.sim, self.population, keys, depth=1) as it:
            items = list(it)
        self.assertEqual([c.index for c in items], list(range(5)))
        for key, c in zip(keys, items):
            self.assertIs(c.key, key)
            want = self.sim.round.sample(key)
            # The same cohort as the device-resident round draws (Round.sample == in-round).
            ids, mask, overflow = self.sim.sampler.sample(jax.random.fold_in(key, 0))
            for a, b, w in zip(c.cohort, want, (ids, mask, overflow)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
            self.assertIsInstance(c.data.x, jax.Array)
            host = self.population.gather(np.asarray(want.ids), np.asarray(want.mask))
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(c.data), host)
            self.assertGreaterEqual(c.prepare_s, 0.0)
        self.assertFalse(it.thread.is_alive())
        with self.assertRaises(StopIteration):
            next(it)

    def test_consumer_stops_early(self):
        with pop_lib.prefetch_cohorts(self.sim, self.population, _keys(50)) as it:
            first = next(it)
        self.assertEqual(first.index, 0)
        self.assertFalse(it.thread.is_alive())
        self.assertFalse(_prefetch_threads())

    def test_consumer_raises(self):
        with (
            self.assertRaisesRegex(RuntimeError, "consumer failed"),
            pop_lib.prefetch_cohorts(self.sim, self.population, _keys(50)) as it,
        ):
            for _ in it:
                raise RuntimeError("consumer failed")
        self.assertFalse(it.thread.is_alive())

    def test_abandoned_iterator_stops_its_thread(self):
        it = pop_lib.prefetch_cohorts(self.sim, self.population, _keys(50))
        next(it)
        thread = it.thread
        del it
        gc.collect()
        thread.join(timeout=10)
        self.assertFalse(thread.is_alive())

    def test_producer_error_is_raised_by_the_consumer(self):
        def keys():
            yield jax.random.key(0)
            raise OSError("disk gone")

        it = pop_lib.prefetch_cohorts(self.sim, self.population, keys())
        self.assertEqual(next(it).index, 0)
        with self.assertRaisesRegex(OSError, "disk gone"):
            next(it)
        self.assertFalse(it.thread.is_alive())
        with self.assertRaises(StopIteration):
            next(it)

    def test_population_mismatch(self):
        _, smaller = _population(num_clients=15)
        with self.assertRaisesRegex(ValueError, "15"):
            pop_lib.prefetch_cohorts(self.sim, smaller, _keys(1))
        with self.assertRaisesRegex(ValueError, "depth"):
            pop_lib.prefetch_cohorts(self.sim, self.population, _keys(1), depth=0)


if __name__ == "__main__":
    absltest.main()
