"""The jitted, vmapped, chunked round against plain-loop references; masking; retracing."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from scipy import stats

import fedjax_dp
from fedjax_dp.core import round as round_lib
from tests import _testing


def _sim(data, hidden=(5,), **kw):
    model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=hidden)
    defaults = dict(cohort_size=5, batch_size=3, local_epochs=2, client_lr=0.3, chunk_size=2)
    defaults.update(kw)
    return fedjax_dp.build_simulation(fedjax_dp.AlgorithmConfig(**defaults), model, data)


class RoundMatchesLoopTest(parameterized.TestCase):
    @parameterized.product(
        name=("fedavg", "dp_fedavg"),
        sampling=("fixed", "poisson"),
        noise=(0.0, 0.8),
    )
    def test_round_equals_python_loop_over_clients(self, name, sampling, noise):
        if name == "fedavg" and noise:
            self.skipTest("no noise without DP")
        data = _testing.small_data()
        kw = dict(name=name, sampling=sampling, server_lr=0.7)
        if sampling == "poisson":
            kw.update(sampling_rate=0.4, cohort_size=None)
        if name == "dp_fedavg":
            kw.update(clip_norm=0.05, noise_multiplier=noise)  # small clip: clipping is active
        sim = _sim(data, **kw)
        dev = data.to_device()
        hp = sim.make_hparams()
        key = jax.random.key(3)
        state = sim.init(jax.random.key(0))
        expected = _testing.loop_round(sim, state, dev, hp, key)
        new_state, metrics = sim.round_fn(state, dev, hp, key)
        _testing.assert_trees_close(new_state.params, expected, rtol=2e-4, atol=2e-6)
        self.assertEqual(int(new_state.round), 1)
        self.assertEqual(int(metrics["cohort_overflow"]), 0)

    def test_weighted_round_equals_loop(self):
        data = _testing.small_data()
        sim = _sim(data, weighting="num_examples")
        dev, hp, key = data.to_device(), sim.make_hparams(), jax.random.key(5)
        state = sim.init(jax.random.key(0))
        expected = _testing.loop_round(sim, state, dev, hp, key)
        got, _ = sim.round_fn(state, dev, hp, key)
        _testing.assert_trees_close(got.params, expected, rtol=2e-4, atol=2e-6)

    @parameterized.parameters(1, 2, 3, 5)
    def test_result_independent_of_chunk_size(self, chunk):
        """Chunk padding (masked clients) and chunking change nothing but summation order."""
        data = _testing.small_data()
        dev = data.to_device()
        outs = []
        for c in (5, chunk):
            sim = _sim(data, name="dp_fedavg", clip_norm=0.1, noise_multiplier=0.5, chunk_size=c)
            state, _ = sim.round_fn(
                sim.init(jax.random.key(0)), dev, sim.make_hparams(), jax.random.key(1)
            )
            outs.append(state.params)
        _testing.assert_trees_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


class ClientUpdateTest(parameterized.TestCase):
    @parameterized.product(example_dp=(False, True), client_id=(0, 3))
    def test_client_update_equals_loop_over_steps_and_examples(self, example_dp, client_id):
        data = _testing.small_data()
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(4,))
        loss_fn = lambda p, x, y: fedjax_dp.cross_entropy(model.apply(p, x), y)
        cu = fedjax_dp.build_client_update(
            loss_fn, max_count=data.max_count, batch_size=4, local_epochs=2, example_dp=example_dp
        )
        params = model.init(jax.random.key(0))
        hp = {
            "client_lr": jnp.float32(0.5),
            "example_clip_norm": jnp.float32(0.3),
            "example_noise_multiplier": jnp.float32(0.0),
        }
        key = jax.random.key(7)
        dev = data.to_device()
        got, metrics = jax.jit(cu.simple)(params, dev, jnp.int32(client_id), key, hp)
        want = _testing.loop_client_sgd(
            loss_fn,
            params,
            dev,
            client_id,
            key,
            max_count=data.max_count,
            batch_size=4,
            epochs=2,
            lr=0.5,
            clip=0.3 if example_dp else None,
        )
        _testing.assert_trees_close(got, want, rtol=1e-4, atol=1e-6)
        self.assertEqual(float(metrics["num_seen"]), 2 * int(data.counts[client_id]))

    @parameterized.parameters(
        (5, 8, 4, 2), (5, 5, 4, 3), (1, 6, 4, 2), (3, 3, 8, 2), (32, 32, 8, 1), (7, 9, 3, 4)
    )
    def test_each_example_once_per_epoch_never_twice_in_a_batch(
        self, count, max_count, batch_size, epochs
    ):
        # Example-level accounting assumes each example is in exactly `epochs` noised sums,
        # at most once in each (sensitivity C); a batch spanning two epochs would break it.
        from fedjax_dp.core import client as client_lib

        num_steps = epochs * client_lib.steps_per_epoch(max_count, batch_size)
        for seed in range(5):
            idx, valid = _testing.epoch_schedule(
                jax.random.key(seed), count, max_count, batch_size, epochs
            )
            self.assertEqual(idx.shape, (num_steps, batch_size))
            uses = np.zeros(count, int)
            for s in range(num_steps):
                rows = idx[s][valid[s]]
                self.assertEqual(len(set(rows.tolist())), len(rows), f"repeat in batch {s}")
                self.assertTrue(np.all((rows >= 0) & (rows < count)))
                uses[rows] += 1
            np.testing.assert_array_equal(uses, np.full(count, epochs))

    def test_examples_outside_the_client_never_leak(self):
        """Neighbouring clients' rows set to NaN: a client's update stays finite and equal."""
        data = _testing.small_data()
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(4,))
        loss_fn = lambda p, x, y: fedjax_dp.cross_entropy(model.apply(p, x), y)
        cu = fedjax_dp.build_client_update(loss_fn, max_count=data.max_count, batch_size=4)
        params = model.init(jax.random.key(0))
        hp = {"client_lr": jnp.float32(0.5)}
        cid = 1  # smaller than max_count, so slots past its data are masked
        self.assertLess(int(data.counts[cid]), data.max_count)
        x = np.asarray(data.x).copy()
        lo = int(data.offsets[cid])
        hi = lo + int(data.counts[cid])
        poisoned = x.copy()
        poisoned[:lo] = np.nan
        poisoned[hi:] = np.nan
        clean, _ = cu.simple(params, data.to_device(), jnp.int32(cid), jax.random.key(1), hp)
        dirty, _ = cu.simple(
            params, data.replace(x=jnp.asarray(poisoned)), jnp.int32(cid), jax.random.key(1), hp
        )
        self.assertTrue(np.all(np.isfinite(_testing.tree_flat(dirty))))
        _testing.assert_trees_close(dirty, clean, rtol=0, atol=0)

    def test_masked_clients_contribute_exactly_zero(self):
        deltas = {"w": jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf], [3.0, 4.0]])}
        mask = jnp.array([True, False, True])
        stage = fedjax_dp.clip_per_client()
        clipped, _ = stage.update(
            deltas, stage.init(None), mask=mask, hparams={"clip_norm": jnp.float32(100.0)}
        )
        np.testing.assert_array_equal(np.asarray(clipped["w"][1]), [0.0, 0.0])
        total = round_lib._masked_weighted_sum(deltas["w"], mask.astype(jnp.float32), mask)
        np.testing.assert_allclose(np.asarray(total), [4.0, 6.0])


@pytest.mark.xdist_group("padding_skip")  # one worker: the cases share two compiled rounds
class PaddingSkipTest(parameterized.TestCase):
    """Chunks after the last real client are not computed, and skipping them changes nothing."""

    _T, _F = True, False

    @staticmethod
    @functools.cache
    def _build(stateful_stage: bool):
        """The round (built once per variant, shared by the masks below) and the list its
        client update records the client ids of computed chunks in."""
        data = _testing.small_data()
        sim = _sim(data, name="dp_fedavg", clip_norm=0.1, noise_multiplier=0.5)
        ids = jnp.arange(10, dtype=jnp.int32)
        seen = []

        def update(params, d, ctx, hp):
            jax.debug.callback(lambda c: seen.extend(np.ravel(c).tolist()), ctx.client_id)
            return sim.client.update(params, d, ctx, hp)

        # The mask is the sampler's state, so one compiled round serves every mask.
        sampler = fedjax_dp.sampling.CohortSampler(
            None,
            10,
            5.0,
            "poisson",
            data.num_clients,
            0.5,
            draw=lambda key, r, mask: (ids, mask, jnp.zeros((), jnp.int32), mask),
            init_state=lambda: jnp.zeros(10, bool),
        )
        # A stateful client stage makes the round compute every chunk.
        counter = fedjax_dp.RoundTransform(
            init=lambda p: jnp.zeros((), jnp.int32),
            update=lambda x, s, *, key, mask, hparams: (x, s + 1),
        )
        rnd = round_lib.build_round(
            sim.client._replace(update=update),
            sampler,
            client_stages=(*((counter,) if stateful_stage else ()), *sim.round.client_stages),
            server_stages=sim.round.server_stages,
            denominator="expected",
            chunk_size=2,
        )
        return data, sim, rnd, seen

    def _round(self, mask, stateful_stage=False):
        data, sim, rnd, seen = self._build(stateful_stage)
        seen.clear()
        params = sim.init(jax.random.key(0)).params
        state = rnd.init(params)._replace(sampler_state=jnp.asarray(mask))
        state, metrics = rnd.round_fn(
            state, data.to_device(), sim.make_hparams(), jax.random.key(1)
        )
        jax.effects_barrier()
        return state.params, sorted(set(seen)), metrics

    @parameterized.parameters(
        ((_T, _T, _T) + (_F,) * 7, 4),  # the last real client is in chunk 1: 2 chunks
        ((_T,) + (_F,) * 4 + (_T,) + (_F,) * 4, 6),  # holes: up to the last real client
        ((_F,) * 10, 0),
        ((_T,) * 10, 10),
    )
    def test_only_chunks_up_to_the_last_real_client_run(self, mask, computed):
        params, seen, metrics = self._round(mask)
        self.assertEqual(seen, list(range(computed)))
        self.assertEqual(int(metrics["num_clients"]), sum(mask))
        # A stateful client stage makes the round compute every chunk, as before: the
        # skipped chunks added exact zeros, so the results are bit-identical.
        full, seen_full, _ = self._round(mask, stateful_stage=True)
        self.assertEqual(seen_full, list(range(10)))
        jax.tree.map(np.testing.assert_array_equal, params, full)

    def test_poisson_auto_chunk_is_at_most_half_the_expected_cohort(self):
        data = _testing.small_data(num_clients=200)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(5,))
        config = fedjax_dp.AlgorithmConfig(
            sampling="poisson", sampling_rate=0.1, cohort_size=None, batch_size=3
        )
        sim = fedjax_dp.build_simulation(config, model, data)
        self.assertEqual(sim.sampler.expected_cohort_size, 20.0)
        self.assertEqual(sim.config.chunk_size, 10)
        fixed = fedjax_dp.build_simulation(
            dataclasses.replace(config, sampling="fixed", cohort_size=20), model, data
        )
        self.assertEqual(fixed.config.chunk_size, 20)  # the memory budget allows all 20


class NoiseTest(parameterized.TestCase):
    """The noise actually added has std sigma*C/denominator: accept it, reject 2/3 and 3/2."""

    def _ks(self, samples, std):
        return stats.kstest(samples, stats.norm(scale=std).cdf).pvalue

    def test_user_level_noise_std(self):
        data = _testing.small_data(num_clients=20)
        sigma, clip, cohort = 1.3, 0.5, 4
        sim = _sim(
            data,
            name="dp_fedavg",
            clip_norm=clip,
            noise_multiplier=sigma,
            cohort_size=cohort,
            hidden=(512,),
        )
        hp = sim.make_hparams(client_lr=0.0)  # deltas are 0: the model change IS the noise
        state = sim.init(jax.random.key(0))
        before = _testing.tree_flat(state.params)
        new_state, _ = sim.round_fn(state, data.to_device(), hp, jax.random.key(11))
        noise = _testing.tree_flat(new_state.params) - before
        self.assertGreater(noise.size, 4000)
        want = sigma * clip / cohort
        self.assertGreater(self._ks(noise, want), 1e-3)
        self.assertLess(self._ks(noise, want * 2 / 3), 1e-6)
        self.assertLess(self._ks(noise, want * 3 / 2), 1e-6)

    def test_example_level_noise_std(self):
        data = _testing.small_data(num_clients=4, min_count=4, max_count=4)
        model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(512,))
        loss_fn = lambda p, x, y: fedjax_dp.cross_entropy(model.apply(p, x), y)
        batch = 4  # one step per epoch
        cu = fedjax_dp.build_client_update(
            loss_fn, max_count=4, batch_size=batch, local_epochs=1, example_dp=True
        )
        params = model.init(jax.random.key(0))
        sigma, clip, lr = 2.0, 0.7, 1.0
        hp = lambda s: {
            "client_lr": jnp.float32(lr),
            "example_clip_norm": jnp.float32(clip),
            "example_noise_multiplier": jnp.float32(s),
        }
        args = (params, data.to_device(), jnp.int32(2), jax.random.key(4))
        noisy, _ = cu.simple(*args, hp(sigma))
        clean, _ = cu.simple(*args, hp(0.0))
        noise = (_testing.tree_flat(clean) - _testing.tree_flat(noisy)) * batch / lr
        want = sigma * clip
        self.assertGreater(self._ks(noise, want), 1e-3)
        self.assertLess(self._ks(noise, want * 2 / 3), 1e-6)
        self.assertLess(self._ks(noise, want * 3 / 2), 1e-6)

    def test_noise_differs_across_rounds_and_leaves(self):
        data = _testing.small_data()
        sim = _sim(data, name="dp_fedavg", clip_norm=1.0, noise_multiplier=1.0, hidden=(8,))
        hp = sim.make_hparams(client_lr=0.0)
        dev = data.to_device()
        s0 = sim.init(jax.random.key(0))
        p0 = _testing.tree_flat(s0.params)
        a, _ = sim.round_fn(sim.init(jax.random.key(0)), dev, hp, jax.random.key(1))
        b, _ = sim.round_fn(sim.init(jax.random.key(0)), dev, hp, jax.random.key(2))
        c, _ = sim.round_fn(sim.init(jax.random.key(0)), dev, hp, jax.random.key(1))
        na, nb = _testing.tree_flat(a.params) - p0, _testing.tree_flat(b.params) - p0
        self.assertGreater(np.abs(na - nb).min(), 0.0)
        np.testing.assert_array_equal(na, _testing.tree_flat(c.params) - p0)  # pure
        leaves = [np.ravel(np.asarray(x)) for x in jax.tree.leaves(a.params)]
        base = [np.ravel(np.asarray(x)) for x in jax.tree.leaves(s0.params)]
        bias0, bias1 = leaves[0] - base[0], leaves[2] - base[2]
        n = min(len(bias0), len(bias1))
        self.assertFalse(np.allclose(bias0[:n], bias1[:n]))


class CompileOnceTest(absltest.TestCase):
    def test_one_trace_across_rounds_and_hparams(self):
        data = _testing.small_data()
        traces = []
        base_model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(4,))

        def counting_apply(params, x):
            traces.append(1)
            return base_model.apply(params, x)

        model = base_model._replace(apply=counting_apply)
        cfg = fedjax_dp.AlgorithmConfig(
            name="dp_fedavg", cohort_size=4, batch_size=4, clip_norm=1.0, noise_multiplier=1.0
        )
        sim = fedjax_dp.build_simulation(cfg, model, data)
        dev = data.to_device()
        state = sim.init(jax.random.key(0))
        state, _ = sim.round_fn(state, dev, sim.make_hparams(), jax.random.key(1))
        after_first = len(traces)
        self.assertGreater(after_first, 0)
        outs = []
        for r, (sigma, lr, clip) in enumerate([(0.5, 0.1, 1.0), (2.0, 0.3, 0.2), (0.0, 0.05, 3.0)]):
            hp = sim.make_hparams(noise_multiplier=sigma, client_lr=lr, clip_norm=clip)
            state, m = sim.round_fn(state, dev, hp, jax.random.key(2 + r))
            outs.append(float(m["update_norm"]))
        self.assertEqual(len(traces), after_first)  # no retrace
        self.assertEqual(len(set(outs)), 3)  # the new values were used

    def test_round_does_not_transfer_to_host(self):
        data = _testing.small_data()
        sim = _sim(data, name="dp_fedavg", clip_norm=1.0, noise_multiplier=1.0)
        dev = data.to_device()
        hp = jax.device_put(sim.make_hparams())
        key = jax.device_put(jax.random.key(1))
        state = sim.init(jax.random.key(0))
        state, _ = sim.round_fn(state, dev, hp, key)  # compile outside the guard
        with jax.transfer_guard("disallow"):
            state, _m = sim.round_fn(state, dev, hp, key)
        self.assertEqual(int(state.round), 2)


class ConfigErrorTest(parameterized.TestCase):
    @parameterized.parameters(
        (dict(name="dp_fedavg", noise_multiplier=-1.0), "noise_multiplier"),
        (dict(name="dp_fedavg", noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(name="dp_fedavg", clip_norm=-0.5), "clip_norm"),
        (dict(name="dp_fedavg", clip_norm=float("nan")), "clip_norm"),
        (dict(name="dp_sgd_fedavg", example_noise_multiplier=-2.0), "example_noise_multiplier"),
        (dict(name="fedavg", cohort_size=1000), "cohort_size"),
        (dict(name="fedavgg"), "algorithm name"),
        (dict(name="fedavg", client_optimizer="nope"), "client_optimizer"),
        (dict(name="fedavg", sampling="poisson"), "sampling_rate"),
        (dict(name="fedavg", sampling="poisson", sampling_rate=1.5), "sampling_rate"),
        (dict(name="dp_fedavg", weighting="num_examples"), "weighting"),
        (dict(name="fedavg", clip_norm=1.0), "dp_fedavg"),
        (dict(name="dp_sgd_fedavg", local_epochs=None, local_steps=3), "local_epochs"),
        (dict(name="fedavg", batch_size=0), "batch_size"),
    )
    def test_bad_config_names_the_argument(self, kw, pattern):
        data = _testing.small_data()
        with self.assertRaisesRegex(ValueError, pattern):
            _sim(data, **kw)

    def test_bad_hparam_override(self):
        sim = _sim(_testing.small_data(), name="dp_fedavg")
        with self.assertRaisesRegex(ValueError, "noise_multiplier"):
            sim.make_hparams(noise_multiplier=-0.1)
        with self.assertRaisesRegex(ValueError, "unknown hparams"):
            sim.make_hparams(mu=0.1)

    def test_noise_without_clipping_is_refused(self):
        data = _testing.small_data()
        sim = _sim(data)
        with self.assertRaisesRegex(ValueError, "sensitivity is unbounded"):
            fedjax_dp.build_round(
                sim.client, sim.sampler, server_stages=[fedjax_dp.add_gaussian_noise()]
            )

    def test_model_data_mismatch(self):
        data = _testing.small_data()
        model = fedjax_dp.get_model("mlp", (7,), data.num_classes)
        with self.assertRaisesRegex(ValueError, "input_shape"):
            fedjax_dp.build_simulation(fedjax_dp.AlgorithmConfig(cohort_size=2), model, data)


class AlgorithmsTest(parameterized.TestCase):
    @parameterized.parameters(*fedjax_dp.ALGORITHMS)
    def test_every_algorithm_lowers_the_loss(self, name):
        data = _testing.small_data(num_clients=10, num_classes=2)
        # learnable labels: sign of the first feature
        y = (np.asarray(data.x)[:, 0] > 0).astype(np.int32)
        data = data.replace(y=jnp.asarray(y))
        lr = {"fedadam": 0.05, "fedyogi": 0.05, "fedadagrad": 0.1, "fedsgd": 1.0}.get(name, 1.0)
        kw = dict(name=name, server_lr=lr, client_lr=0.3, cohort_size=10, chunk_size=5)
        if name == "dp_fedavg":
            kw.update(clip_norm=10.0, noise_multiplier=0.01)
        if name == "dp_sgd_fedavg":
            kw.update(example_clip_norm=10.0, example_noise_multiplier=0.01)
        sim = _sim(data, **kw)
        dev = data.to_device()
        state = sim.init(jax.random.key(0))
        hp = sim.make_hparams()
        x, yy = np.asarray(data.x), y
        first = fedjax_dp.evaluate(sim.model, state.params, x, yy)["loss"]
        for r in range(30):
            state, _ = sim.round_fn(state, dev, hp, jax.random.key(r))
        last = fedjax_dp.evaluate(sim.model, state.params, x, yy)
        self.assertLess(last["loss"], 0.8 * first)
        self.assertGreater(last["accuracy"], 0.8)

    def test_fedsgd_delta_is_minus_the_full_client_gradient(self):
        data = _testing.small_data()
        sim = _sim(data, name="fedsgd", cohort_size=1, server_lr=1.0)
        self.assertEqual(sim.client.num_steps, 1)
        self.assertEqual(sim.client.batch_size, data.max_count)
        params = sim.model.init(jax.random.key(0))
        delta, _ = sim.client.simple(
            params, data.to_device(), jnp.int32(2), jax.random.key(0), sim.make_hparams()
        )
        x, y = data.client(2)
        grad = jax.grad(lambda p: jnp.mean(fedjax_dp.cross_entropy(sim.model.apply(p, x), y)))(
            params
        )
        _testing.assert_trees_close(delta, jax.tree.map(jnp.negative, grad), rtol=1e-5)

    def test_resolve_is_idempotent(self):
        c = fedjax_dp.resolve(fedjax_dp.AlgorithmConfig(name="fedadam"))
        self.assertEqual(c.server_optimizer, "adam")
        self.assertEqual(fedjax_dp.resolve(c), c)
        self.assertEqual(dataclasses.replace(c), c)


if __name__ == "__main__":
    absltest.main()
