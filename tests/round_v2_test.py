"""Round v2 contracts: per-client state, named uploads, aggregators, systems heterogeneity.

Each algorithm is compared with a plain Python loop over clients that derives its keys on
its own from the documented scheme; DP preconditions are checked to fail loudly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from scipy import stats

import fedjax_dp
from tests import _testing

_MAX_COUNT = 9


def _model(data, hidden=(4,)):
    return fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=hidden)


def _sim(data, hidden=(4,), **kw):
    defaults = dict(cohort_size=5, batch_size=3, local_epochs=2, client_lr=0.3, chunk_size=2)
    defaults.update(kw)
    return fedjax_dp.build_simulation(
        fedjax_dp.AlgorithmConfig(**defaults), _model(data, hidden), data
    )


def _loss_fn(model):
    return lambda p, x, y: fedjax_dp.cross_entropy(model.apply(p, x), y)


def _client_key(key, cid):
    clients_key = jax.random.fold_in(key, _testing.CLIENTS)
    return jax.random.fold_in(jax.random.fold_in(clients_key, int(cid)), 0)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _rows(tree, n):
    """Per-client rows of a population-sized pytree, flattened: ``[n, size]``."""
    return np.concatenate([np.asarray(x).reshape(n, -1) for x in jax.tree.leaves(tree)], axis=1)


def _row(tree, i):
    return jax.tree.map(lambda x: np.asarray(x[i], np.float64), tree)


class ScaffoldTest(parameterized.TestCase):
    def _loop_round(self, sim, state, data, key):
        """SCAFFOLD option II by hand: corrected local SGD, control variates, server step."""
        cohort = sim.round.sample(key)
        lr = sim.config.client_lr
        params, c = _np(state.params), _np(state.server_aux["control"])
        controls = _np(state.client_states["control"])
        deltas, changes, written = [], [], {}
        for cid, m, up in zip(*(np.asarray(a) for a in (cohort.ids, cohort.mask, cohort.uploaded))):
            if not (m and up):
                continue
            ci = _row(controls, cid)
            delta, steps = _testing.loop_client_sgd(
                _loss_fn(sim.model),
                state.params,
                data,
                int(cid),
                _client_key(key, cid),
                max_count=_MAX_COUNT,
                batch_size=sim.config.batch_size,
                epochs=sim.config.local_epochs,
                lr=lr,
                correction=jax.tree.map(np.subtract, c, ci),
                return_steps=True,
            )
            change = jax.tree.map(lambda c_, d, k=steps: -c_ - d / (k * lr), c, delta)
            deltas.append(delta)
            changes.append(change)
            written[int(cid)] = jax.tree.map(np.add, ci, change)
        n = len(deltas)
        mean = jax.tree.map(lambda *xs: sum(xs) / max(n, 1), *deltas)
        new_params = jax.tree.map(lambda p, d: p + sim.config.server_lr * d, params, mean)
        new_c = jax.tree.map(lambda c_, *xs: c_ + sum(xs) / data.num_clients, c, *changes)
        new_controls = jax.tree.map(np.copy, controls)
        for cid, row in written.items():
            jax.tree.map(lambda buf, r, cid=cid: buf.__setitem__(cid, r), new_controls, row)
        return new_params, new_c, new_controls

    @parameterized.parameters(dict(dropout=0.0), dict(dropout=0.4))
    def test_two_rounds_equal_plain_loop(self, dropout):
        data = _testing.small_data()
        sim = _sim(data, name="scaffold", dropout_rate=dropout, client_lr=0.2)
        dev, hp = data.to_device(), sim.make_hparams()
        state = sim.init(jax.random.key(0))
        for r in range(2):
            key = jax.random.key(10 + r)
            want = self._loop_round(sim, state, dev, key)
            state, _ = sim.round_fn(state, dev, hp, key)
            got = (state.params, state.server_aux["control"], state.client_states["control"])
            for g, w in zip(got, want):
                _testing.assert_trees_close(g, w, rtol=2e-4, atol=2e-6)
        self.assertEqual(int(state.round), 2)
        # Something was written and something was not (the test would be vacuous otherwise).
        rows = np.abs(_rows(state.client_states["control"], 12))
        self.assertTrue(0 < np.sum(rows.sum(axis=1) > 0) < 12)

    def test_padding_and_clients_without_upload_never_write(self):
        data = _testing.small_data(num_clients=30)
        sim = _sim(
            data,
            name="scaffold",
            sampling="poisson",
            sampling_rate=0.3,
            cohort_size=None,
            dropout_rate=0.5,
        )
        dev, hp = data.to_device(), sim.make_hparams()
        state = sim.init(jax.random.key(0))
        key = jax.random.key(4)
        cohort = sim.round.sample(key)
        state, _ = sim.round_fn(state, dev, hp, key)
        wrote = np.abs(_rows(state.client_states["control"], 30)).sum(1) > 0
        ids, mask, up = (np.asarray(a) for a in (cohort.ids, cohort.mask, cohort.uploaded))
        expected = np.zeros(30, bool)
        expected[ids[mask & up]] = True
        np.testing.assert_array_equal(wrote, expected)
        self.assertTrue(0 < expected.sum() < np.sum(mask), "dropout should leave some out")

    def test_chunk_size_changes_nothing_but_summation_order(self):
        data = _testing.small_data()
        outs = []
        for chunk in (1, 5):
            sim = _sim(data, name="scaffold", chunk_size=chunk)
            state = sim.init(jax.random.key(0))
            for r in range(2):
                state, _ = sim.round_fn(
                    state, data.to_device(), sim.make_hparams(), jax.random.key(r)
                )
            outs.append((state.params, state.server_aux, state.client_states))
        _testing.assert_trees_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)

    def test_jit_equals_no_jit(self):
        data = _testing.small_data()
        sim = _sim(data, name="scaffold")
        rnd = fedjax_dp.build_round(
            sim.client, sim.sampler, aggregator=sim.round.aggregator, chunk_size=2, jit=False
        )
        state = rnd.init(sim.init(jax.random.key(0)).params)
        a, _ = rnd.round_fn(state, data.to_device(), sim.make_hparams(), jax.random.key(3))
        b, _ = sim.round_fn(
            sim.init(jax.random.key(0)), data.to_device(), sim.make_hparams(), jax.random.key(3)
        )
        _testing.assert_trees_close(a.client_states, b.client_states, rtol=1e-5, atol=1e-7)
        _testing.assert_trees_close(a.params, b.params, rtol=1e-5, atol=1e-7)

    def test_checkpoint_round_trip_keeps_client_states(self):
        data = _testing.small_data()
        sim = _sim(data, name="scaffold")
        state = sim.init(jax.random.key(0))
        state, _ = sim.round_fn(state, data.to_device(), sim.make_hparams(), jax.random.key(1))
        restored = _testing.checkpoint_round_trip(sim, state)
        jax.tree.map(np.testing.assert_array_equal, restored.client_states, state.client_states)
        jax.tree.map(np.testing.assert_array_equal, restored.server_aux, state.server_aux)

    def test_user_level_dp_accounts_both_releases_as_one_gaussian(self):
        data = _testing.small_data()
        sim = _sim(
            data,
            name="scaffold",
            clip_norm=0.5,
            noise_multiplier=1.0,
            control_noise_multiplier=2.0,
        )
        (rp,) = sim.round_privacy({k: float(v) for k, v in sim.make_hparams().items()})
        self.assertAlmostEqual(rp.noise_multiplier, (1.0**-2 + 2.0**-2) ** -0.5, places=12)
        # A config that noises only the deltas would under-report: both stages exist.
        names = {s.noise_multiplier for s in sim.round.upload_stages["control"][1]}
        self.assertEqual(names, {"control_noise_multiplier"})
        releases = sim.releases({k: float(v) for k, v in sim.make_hparams().items()})
        self.assertCountEqual(
            [(r.upload, r.noise_hparam, r.noise_multiplier) for r in releases],
            [("delta", "noise_multiplier", 1.0), ("control", "control_noise_multiplier", 2.0)],
        )

    def test_start_up_line_says_the_noise_multiplier_is_combined(self):
        from fedjax_dp import experiment

        cfg = experiment.load_config(
            None,
            {
                "data.num_clients": 20,
                "run.rounds": 1,
                "run.progress": False,
                "algorithm.name": "scaffold",
                "algorithm.cohort_size": 5,
                "algorithm.clip_norm": 0.5,
                "algorithm.noise_multiplier": 1.0,
                "algorithm.control_noise_multiplier": 2.0,
            },
        )
        lines = []
        experiment.run(cfg, write=False, log=lines.append)
        text = "\n".join(lines)
        self.assertIn(f"noise multiplier {(1.0**-2 + 2.0**-2) ** -0.5:g}", text)
        self.assertIn("combines 2 releases", text)
        self.assertIn("control (control_noise_multiplier 2)", text)

    def test_control_upload_noise_has_the_stated_std(self):
        """Server control change x N = noise on the control sum: N(0, (sigma_c C_c)^2)."""
        data = _testing.small_data()
        sigma, clip = 1000.0, 1e-3  # the clipped sum (<= 5 C) is 2e-4 noise stds at most
        sim = _sim(
            data,
            hidden=(16,),
            name="scaffold",
            clip_norm=0.5,
            noise_multiplier=1.0,
            control_clip_norm=clip,
            control_noise_multiplier=sigma,
        )
        samples = []
        for r in range(3):
            state = sim.init(jax.random.key(0))
            state, _ = sim.round_fn(state, data.to_device(), sim.make_hparams(), jax.random.key(r))
            samples.append(_testing.tree_flat(state.server_aux["control"]) * data.num_clients)
        z = np.concatenate(samples)
        std = sigma * clip
        self.assertGreater(stats.kstest(z / std, "norm").pvalue, 1e-3)
        for wrong in (2 / 3, 3 / 2):
            self.assertLess(stats.kstest(z / (wrong * std), "norm").pvalue, 1e-3)


class FedProxTest(parameterized.TestCase):
    @parameterized.parameters(0.0, 0.7)
    def test_client_update_equals_loop_with_the_proximal_term(self, mu):
        data = _testing.small_data()
        model = _model(data)
        cu = fedjax_dp.build_client_update(
            _loss_fn(model), max_count=_MAX_COUNT, batch_size=4, local_epochs=2, proximal=True
        )
        params = model.init(jax.random.key(0))
        hp = {"client_lr": jnp.float32(0.5), "mu": jnp.float32(mu)}
        got, _ = jax.jit(cu.simple)(params, data.to_device(), jnp.int32(2), jax.random.key(7), hp)
        want = _testing.loop_client_sgd(
            _loss_fn(model),
            params,
            data.to_device(),
            2,
            jax.random.key(7),
            max_count=_MAX_COUNT,
            batch_size=4,
            epochs=2,
            lr=0.5,
            mu=mu,
        )
        _testing.assert_trees_close(got, want, rtol=1e-4, atol=1e-6)

    def test_mu_zero_is_fedavg_keeping_partial_work(self):
        data = _testing.small_data()
        kw = dict(straggler_fraction=0.6, local_epochs=3)
        prox = _sim(data, name="fedprox", mu=0.0, **kw)
        avg = _sim(data, name="fedavg", straggler_policy="partial", **kw)
        outs = []
        for sim in (prox, avg):
            state, _ = sim.round_fn(
                sim.init(jax.random.key(0)), data.to_device(), sim.make_hparams(), jax.random.key(1)
            )
            outs.append(state.params)
        _testing.assert_trees_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)

    def test_mu_is_traced_one_compile_and_vmappable(self):
        data = _testing.small_data()
        sim = _sim(data, name="fedprox")
        dev = data.to_device()
        finals = []
        for mu in (0.0, 1.0):
            state, _ = sim.round_fn(
                sim.init(jax.random.key(0)), dev, sim.make_hparams(mu=mu), jax.random.key(2)
            )
            finals.append(state.params)
        self.assertEqual(sim.round_fn._cache_size(), 1)
        self.assertGreater(
            float(np.max(np.abs(_testing.tree_flat(finals[0]) - _testing.tree_flat(finals[1])))),
            1e-5,
        )
        hp = sim.make_hparams()
        batched = {k: jnp.stack([v, v]) for k, v in hp.items()}
        batched["mu"] = jnp.array([0.0, 1.0], jnp.float32)
        vstate, _ = jax.vmap(sim.round.round_fn, in_axes=(None, None, 0, None))(
            sim.init(jax.random.key(0)), dev, batched, jax.random.key(2)
        )
        for i in range(2):
            _testing.assert_trees_close(
                jax.tree.map(lambda x, i=i: x[i], vstate.params), finals[i], rtol=1e-5, atol=1e-6
            )

    def test_stragglers_partial_work_equals_loop(self):
        data = _testing.small_data()
        sim = _sim(data, name="fedprox", mu=0.3, straggler_fraction=0.6, local_epochs=3)
        dev, hp, key = data.to_device(), sim.make_hparams(), jax.random.key(6)
        state = sim.init(jax.random.key(0))
        cohort = sim.round.sample(key)
        deltas = []
        for cid, budget in zip(np.asarray(cohort.ids), np.asarray(cohort.step_budget)):
            deltas.append(
                _testing.loop_client_sgd(
                    _loss_fn(sim.model),
                    state.params,
                    dev,
                    int(cid),
                    _client_key(key, cid),
                    max_count=_MAX_COUNT,
                    batch_size=3,
                    epochs=3,
                    lr=0.3,
                    mu=0.3,
                    budget=int(budget),
                )
            )
        self.assertLess(int(np.min(np.asarray(cohort.step_budget))), sim.client.num_steps)
        mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *deltas)
        want = jax.tree.map(lambda p, d: np.asarray(p, np.float64) + d, state.params, mean)
        got, metrics = sim.round_fn(state, dev, hp, key)
        _testing.assert_trees_close(got.params, want, rtol=2e-4, atol=2e-6)
        self.assertEqual(int(metrics["num_uploads"]), 5)


class SystemsTest(parameterized.TestCase):
    def test_straggler_budgets_follow_the_stated_distribution(self):
        spec = fedjax_dp.systems.systems(straggler_fraction=0.3)
        ids = jnp.arange(400, dtype=jnp.int32)
        mask = jnp.arange(400) < 300
        draw = jax.jit(
            lambda k: fedjax_dp.systems.draw(spec, k, ids, mask, num_steps=12, local_epochs=4)
        )
        budgets = []
        uploads = []
        for r in range(20):
            up, budget = (np.asarray(a) for a in draw(jax.random.key(r)))
            budgets.append(budget[np.asarray(mask)])
            uploads.append(up)
            self.assertFalse(np.any(up[300:]), "padding never uploads")
        b = np.concatenate(budgets)
        straggled = b < 12
        n = b.size
        p = straggled.mean()
        self.assertLess(abs(p - 0.3), 4 * math.sqrt(0.3 * 0.7 / n))
        # Stragglers run 1..E-1 whole epochs (3 steps each), uniformly.
        counts = np.array([np.sum(b == 3 * e) for e in (1, 2, 3)])
        self.assertEqual(counts.sum(), straggled.sum())
        self.assertGreater(stats.chisquare(counts).pvalue, 1e-3)
        # FedAvg's policy: stragglers do not upload.
        up = np.concatenate([u[:300] for u in uploads])
        np.testing.assert_array_equal(up, ~straggled)

    def test_dropout_rate_and_upload_probability(self):
        spec = fedjax_dp.systems.systems(dropout_rate=0.25, straggler_fraction=0.2)
        self.assertAlmostEqual(spec.upload_probability, 0.8 * 0.75)
        ids = jnp.arange(2000, dtype=jnp.int32)
        up, _ = fedjax_dp.systems.draw(
            spec, jax.random.key(0), ids, jnp.ones(2000, bool), num_steps=4, local_epochs=None
        )
        rate = float(np.mean(np.asarray(up)))
        self.assertLess(abs(rate - 0.6), 4 * math.sqrt(0.6 * 0.4 / 2000))

    def test_fedavg_drops_stragglers_fedprox_keeps_them(self):
        data = _testing.small_data()
        kw = dict(cohort_size=12, straggler_fraction=0.5, local_epochs=3)
        key = jax.random.key(3)
        ups = {}
        for name in ("fedavg", "fedprox"):
            sim = _sim(data, name=name, **kw)
            cohort = sim.round.sample(key)
            _, m = sim.round_fn(
                sim.init(jax.random.key(0)), data.to_device(), sim.make_hparams(), key
            )
            ups[name] = int(m["num_uploads"])
            stragglers = int(np.sum(np.asarray(cohort.step_budget) < sim.client.num_steps))
        self.assertEqual(ups["fedprox"], 12)
        self.assertEqual(ups["fedavg"], 12 - stragglers)
        self.assertGreater(stragglers, 0)

    def test_round_with_too_few_uploads_is_skipped_and_reported(self):
        data = _testing.small_data()
        sim = _sim(data, name="scaffold", min_clients=6)  # cohort of 5 < 6: always skipped
        state0 = sim.init(jax.random.key(0))
        want = jax.tree.map(np.asarray, state0)
        state, m = sim.round_fn(state0, data.to_device(), sim.make_hparams(), jax.random.key(1))
        self.assertEqual(int(m["skipped"]), 1)
        self.assertEqual(int(state.round), 1)
        jax.tree.map(np.testing.assert_array_equal, state.params, want.params)
        jax.tree.map(np.testing.assert_array_equal, state.client_states, want.client_states)
        ok = _sim(data, name="scaffold", min_clients=5)
        _, m = ok.round_fn(
            ok.init(jax.random.key(0)), data.to_device(), ok.make_hparams(), jax.random.key(1)
        )
        self.assertEqual(int(m["skipped"]), 0)

    def test_accounting_and_denominator_use_expected_uploads(self):
        data = _testing.small_data(num_clients=50)
        sim = _sim(
            data,
            name="dp_fedavg",
            sampling="poisson",
            sampling_rate=0.2,
            cohort_size=None,
            dropout_rate=0.5,
        )
        (rp,) = sim.round_privacy({k: float(v) for k, v in sim.make_hparams().items()})
        # The inclusion rate is q; dropout thins the uploads to q * p, credited only where
        # the cohort cap does not bind (accounting.RoundPrivacy.upload_probability).
        self.assertAlmostEqual(rp.sampling_rate, 0.2)
        self.assertAlmostEqual(rp.upload_probability, 0.5)
        self.assertAlmostEqual(rp.upload_rate, 0.1)
        self.assertIsNotNone(rp.max_cohort_size)
        fixed = _sim(data, name="dp_fedavg", dropout_rate=0.5)
        (rp,) = fixed.round_privacy({k: float(v) for k, v in fixed.make_hparams().items()})
        self.assertEqual(rp.cohort_size, 5)  # fixed size: the unthinned rate, an upper bound

    @parameterized.parameters(
        (dict(straggler_fraction=1.5), "straggler_fraction"),
        (dict(dropout_rate=1.0), "dropout_rate"),
        (dict(straggler_policy="sometimes"), "straggler_policy"),
        (dict(min_clients=-1), "min_clients"),
    )
    def test_bad_systems_options_name_the_argument(self, kw, name):
        with self.assertRaisesRegex(ValueError, name):
            _sim(_testing.small_data(), **kw)


class RunReportsSystemsTest(absltest.TestCase):
    def test_skipped_rounds_are_reported_in_rows_summary_and_log(self):
        from fedjax_dp import experiment

        cfg = experiment.load_config(
            None,
            {
                "data.num_clients": 20,
                "run.rounds": 6,
                "run.eval_every": 3,
                "run.progress": False,
                "algorithm.name": "fedprox",
                "algorithm.cohort_size": 5,
                "algorithm.dropout_rate": 0.5,
                "algorithm.min_clients": 4,
            },
        )
        lines = []
        result = experiment.run(cfg, write=False, log=lines.append)
        skipped = [h["skipped"] for h in result.history]
        self.assertLen(skipped, 6)
        self.assertEqual(result.final["skipped_rounds"], sum(skipped))
        self.assertGreater(sum(skipped), 0)
        self.assertTrue(all(h["num_uploads"] < 4 for h in result.history if h["skipped"]))
        self.assertTrue(any("rounds were skipped" in line for line in lines))


class AggregatorTest(parameterized.TestCase):
    def _deltas(self, sim, state, data, key):
        cohort = sim.round.sample(key)
        out = []
        for cid in np.asarray(cohort.ids):
            d, _ = sim.client.simple(
                state.params, data, jnp.int32(cid), _client_key(key, cid), sim.make_hparams()
            )
            out.append(_testing.tree_flat(d))
        return np.stack(out)

    @parameterized.parameters(1, 2, 5)
    def test_coordinate_median_equals_numpy(self, chunk):
        data = _testing.small_data()
        sim = _sim(data, name="fedavg")
        rnd = fedjax_dp.build_round(
            sim.client,
            sim.sampler,
            aggregator=fedjax_dp.aggregators.coordinate_median(),
            chunk_size=chunk,
        )
        dev, key = data.to_device(), jax.random.key(2)
        state = rnd.init(sim.init(jax.random.key(0)).params)
        want = _testing.tree_flat(state.params) + np.median(self._deltas(sim, state, dev, key), 0)
        got, _ = rnd.round_fn(state, dev, sim.make_hparams(), key)
        np.testing.assert_allclose(_testing.tree_flat(got.params), want, rtol=1e-5, atol=1e-6)

    def test_norm_bounded_mean_two_passes_equals_loop(self):
        data = _testing.small_data()
        sim = _sim(data, name="fedavg")
        radius = 0.05
        rnd = fedjax_dp.build_round(
            sim.client,
            sim.sampler,
            aggregator=fedjax_dp.aggregators.norm_bounded_mean(radius),
            chunk_size=2,
        )
        dev, key = data.to_device(), jax.random.key(2)
        state = rnd.init(sim.init(jax.random.key(0)).params)
        d = self._deltas(sim, state, dev, key).astype(np.float64)
        centre = d.mean(0)
        diff = d - centre
        norms = np.linalg.norm(diff, axis=1)
        self.assertTrue(np.any(norms > radius), "the radius must bind for the test to bite")
        clipped = centre + diff * np.minimum(1.0, radius / norms)[:, None]
        want = _testing.tree_flat(state.params) + clipped.mean(0)
        got, _ = rnd.round_fn(state, dev, sim.make_hparams(), key)
        np.testing.assert_allclose(_testing.tree_flat(got.params), want, rtol=1e-5, atol=1e-6)


class PreconditionTest(parameterized.TestCase):
    """build_round refuses what would void the documented DP guarantee."""

    def setUp(self):
        super().setUp()
        self.data = _testing.small_data()
        self.sim = _sim(self.data, name="dp_fedavg", clip_norm=0.1, noise_multiplier=1.0)
        self.clip, self.noise = self.sim.round.client_stages, self.sim.round.server_stages

    def _build(self, **kw):
        kw.setdefault("client_stages", self.clip)
        kw.setdefault("server_stages", self.noise)
        return fedjax_dp.build_round(self.sim.client, self.sim.sampler, **kw)

    def test_the_safe_configuration_builds(self):
        self._build(weighting="uniform", denominator="expected")

    @parameterized.parameters(
        (dict(weighting="num_examples", denominator="mean"), "aggregator"),
        (dict(weighting="uniform", denominator="mean"), "public normaliser"),
        (dict(aggregator=fedjax_dp.aggregators.coordinate_median()), "coordinate_median"),
    )
    def test_noise_with_a_data_dependent_aggregate_is_refused(self, kw, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            self._build(**kw)

    def test_a_stage_after_the_clip_is_refused(self):
        double = fedjax_dp.RoundTransform(
            lambda _: fedjax_dp.EmptyState(),
            lambda x, s, *, key, mask, hparams: (jax.tree.map(lambda a: 2 * a, x), s),
        )
        with self.assertRaisesRegex(ValueError, "after the DP clip"):
            self._build(client_stages=(*self.clip, double), denominator="expected")
        self._build(client_stages=(double, *self.clip), denominator="expected")  # before: fine

    def test_min_clients_with_poisson_and_dp_is_refused(self):
        with self.assertRaisesRegex(ValueError, "min_clients"):
            _sim(
                self.data,
                name="dp_fedavg",
                sampling="poisson",
                sampling_rate=0.5,
                cohort_size=None,
                min_clients=2,
            )

    def test_scaffold_needs_uniform_weights_and_sgd(self):
        with self.assertRaisesRegex(ValueError, "weighting"):
            _sim(self.data, name="scaffold", weighting="num_examples")
        with self.assertRaisesRegex(ValueError, "client_optimizer"):
            _sim(self.data, name="scaffold", client_optimizer="adam")


if __name__ == "__main__":
    absltest.main()
