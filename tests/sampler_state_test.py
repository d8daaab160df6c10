"""The sampler contract: round index and sampler state; the stateful 'shuffle' sampler."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import fedjax_dp
from fedjax_dp import population as pop_lib
from fedjax_dp import sampling
from tests import _testing


def _sim(data, **kw):
    defaults = dict(name="fedavg", sampling="shuffle", cohort_size=4, batch_size=3, client_lr=0.3)
    defaults.update(kw)
    model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=())
    return fedjax_dp.build_simulation(fedjax_dp.AlgorithmConfig(**defaults), model, data)


def _ids_of_rounds(sampler, keys):
    state, out = sampler.initial_state(), []
    step = jax.jit(sampler.step)
    for r, key in enumerate(keys):
        ids, mask, overflow, state = step(key, jnp.int32(r), state)
        np.testing.assert_array_equal(mask, True)
        assert int(overflow) == 0
        out.append(np.asarray(ids))
    return out


class ShuffledSamplerTest(absltest.TestCase):
    def test_every_client_once_per_epoch_and_fresh_permutations(self):
        n, c = 14, 4  # 3 rounds per epoch; 2 clients sit each epoch out
        s = sampling.shuffled(n, c)
        self.assertTrue(s.stateful)
        keys = [jax.random.key(r) for r in range(12)]
        rounds = _ids_of_rounds(s, keys)
        epochs = [np.concatenate(rounds[e * 3 : e * 3 + 3]) for e in range(4)]
        for ids in epochs:
            self.assertLen(set(ids.tolist()), 12)  # disjoint cohorts within an epoch
        self.assertGreater(len({tuple(e) for e in epochs}), 1)
        # Only an epoch's first round draws: later keys do not change that epoch's cohorts.
        other = list(keys)
        other[1] = other[2] = jax.random.key(99)
        np.testing.assert_array_equal(_ids_of_rounds(s, other)[2], rounds[2])
        # Uniform over epochs: each client's participation count is 1 or 0 per epoch, and
        # over many epochs every client is left out about equally often.
        many = _ids_of_rounds(s, [jax.random.key(r) for r in range(3 * 300)])
        counts = np.bincount(np.concatenate(many), minlength=n)
        np.testing.assert_array_less(np.abs(counts - 300 * 12 / 14), 5 * np.sqrt(300 * 0.15))

    def test_bad_arguments_name_them(self):
        with self.assertRaisesRegex(ValueError, "cohort_size"):
            sampling.shuffled(5, 6)
        with self.assertRaisesRegex(ValueError, "sampling='shuffle'"):
            _sim(_testing.small_data(), name="dp_fedavg", clip_norm=1.0, noise_multiplier=1.0)
        with self.assertRaisesRegex(ValueError, "needs cohort_size"):
            _sim(_testing.small_data(), cohort_size=None)


class StatefulRoundTest(absltest.TestCase):
    def test_round_advances_the_sampler_state_and_matches_sample_step(self):
        data = _testing.small_data(num_clients=12)
        sim = _sim(data)
        dev, hp = data.to_device(), sim.make_hparams()
        state = sim.init(jax.random.key(0))
        np.testing.assert_array_equal(state.sampler_state, np.arange(12))
        seen = []
        for r in range(6):
            key = jax.random.key(10 + r)
            cohort, _ = sim.round.sample_step(key, state.round, state.sampler_state)
            seen.append(np.asarray(cohort.ids))
            state, m = sim.round_fn(state, dev, hp, key)
            self.assertEqual(int(m["num_clients"]), 4)
        for e in (0, 1):
            self.assertCountEqual(np.concatenate(seen[3 * e : 3 * e + 3]).tolist(), range(12))
        with self.assertRaisesRegex(ValueError, "sample_step"):
            sim.round.sample(jax.random.key(0))

    def test_host_population_follows_the_sampler_state(self):
        data = _testing.small_data(num_clients=12)
        population = pop_lib.HostPopulation.from_federated_data(data)
        sim = _sim(population)
        hp, dev = sim.make_hparams(), data.to_device()
        keys = [jax.random.key(r) for r in range(5)]
        state = sim.init(jax.random.key(0))
        for key in keys[:2]:  # the host loop starts mid-epoch
            state, _ = sim.round_fn(state, dev, hp, key)
        want = jax.tree.map(jnp.copy, state)  # round_fn donates its state
        for key in keys[2:]:
            want, _ = sim.round_fn(want, dev, hp, key)
        got, _ = pop_lib.run_rounds(sim, state, population, hp, keys[2:])
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        with (
            self.assertRaisesRegex(ValueError, "state="),
            pop_lib.prefetch_cohorts(sim, population, keys) as cohorts,
        ):
            next(cohorts)

    def test_checkpoint_round_trip_keeps_the_sampler_state(self):
        data = _testing.small_data(num_clients=12)
        sim = _sim(data)
        state = sim.init(jax.random.key(0))
        state, _ = sim.round_fn(state, data.to_device(), sim.make_hparams(), jax.random.key(4))
        self.assertFalse(np.array_equal(state.sampler_state, np.arange(12)))
        restored = _testing.checkpoint_round_trip(sim, state)
        np.testing.assert_array_equal(restored.sampler_state, state.sampler_state)


class ShuffleFromTheCliTest(absltest.TestCase):
    def test_run_with_shuffled_cohorts(self):
        from fedjax_dp import experiment

        cfg = experiment.load_config(
            None,
            {
                "data.num_clients": 20,
                "run.rounds": 4,
                "run.progress": False,
                "algorithm.name": "fedavg",
                "algorithm.sampling": "shuffle",
                "algorithm.cohort_size": 5,
            },
        )
        result = experiment.run(cfg, write=False, log=lambda *_: None)
        self.assertEqual([h["num_clients"] for h in result.history], [5, 5, 5, 5])


if __name__ == "__main__":
    absltest.main()
