"""The host loop over rounds (fedjax_dp.runner.loop): hook order, batched metrics, evaluation
cadence, Ctrl-C with a checkpoint and a bit-for-bit resume, and user callbacks."""

import functools
import os
import pathlib
import shutil
import signal
import tempfile
import threading
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from fedjax_dp import experiment
from fedjax_dp.runner import checkpointing
from fedjax_dp.runner import loop as loop_lib
from tests import _testing

_KEY = jax.random.key(7)


@functools.partial(jax.jit, donate_argnums=0)
def _round(state, key):
    """A stand-in for a round: new state from the old and a key; metrics as device arrays."""
    x = 0.5 * state["x"] + jax.random.normal(key, state["x"].shape)
    return {"x": x}, {"mean": jnp.mean(x), "norm": jnp.linalg.norm(x)}


def _step(state, r):
    return _round(state, jax.random.fold_in(_KEY, r))


def _init():
    return {"x": jnp.zeros((5,), jnp.float32)}


def _reference(rounds):
    """A plain loop: the final state and every round's metrics fetched at once."""
    state, metrics = _init(), []
    for r in range(rounds):
        state, m = _step(state, r)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


class _Recorder(loop_lib.Callback):
    """Logs every hook into ``events`` (shared, so the order across callbacks shows)."""

    def __init__(self, events, name="rec", flush_every=0):
        self.events, self.name, self.flush_every = events, name, flush_every

    def on_start(self, start, rounds):
        self.events.append((self.name, "start", start, rounds))

    def on_round_end(self, done, state, metrics):
        assert isinstance(metrics["mean"], jax.Array)  # handed over unsynchronised
        self.events.append((self.name, "round", done))

    def flush_due(self, done):
        return bool(self.flush_every) and done % self.flush_every == 0

    def on_flush(self, done, state):
        self.events.append((self.name, "flush", done))

    def on_end(self, done, state, *, interrupted):
        self.events.append((self.name, "end", done, interrupted))


class HooksTest(parameterized.TestCase):
    def test_hooks_are_called_in_order_with_the_right_rounds(self):
        events = []
        evaluation = loop_lib.Evaluation(lambda done, state: events.append(("eval", done)), every=2)
        loop_lib.train_loop(_step, _init(), rounds=5, callbacks=[evaluation, _Recorder(events)])
        rec = ("rec",)
        self.assertEqual(
            events,
            [
                (*rec, "start", 0, 5),
                (*rec, "round", 1),
                (*rec, "round", 2),
                ("eval", 2),  # the earlier callback first, in the same flush
                (*rec, "flush", 2),
                (*rec, "round", 3),
                (*rec, "round", 4),
                ("eval", 4),
                (*rec, "flush", 4),
                (*rec, "round", 5),
                ("eval", 5),  # the last round is always flushed (and evaluated)
                (*rec, "flush", 5),
                (*rec, "end", 5, False),
            ],
        )

    def test_a_callback_asks_for_flushes(self):
        events = []
        loop_lib.train_loop(_step, _init(), rounds=4, callbacks=[_Recorder(events, flush_every=3)])
        self.assertEqual([e[2] for e in events if e[1] == "flush"], [3, 4])

    @parameterized.parameters(
        # (start, rounds, every, evaluated after)
        (0, 7, 3, [3, 6, 7]),
        (0, 6, 3, [3, 6]),
        (0, 2, 5, [2]),
        (4, 7, 3, [6, 7]),  # resumed: the cadence counts rounds completed
        (7, 7, 3, [7]),  # resumed and complete: no round runs, the final flush does
    )
    def test_evaluation_every_k_rounds_and_after_the_last(self, start, rounds, every, want):
        evaluated, steps = [], []

        def step(state, r):
            steps.append(r)
            return _step(state, r)

        def evaluate_fn(done, state):
            evaluated.append(done)
            self.assertEqual(steps[-1:], [done - 1] if done > start else [])

        loop_lib.train_loop(
            step,
            _init(),
            start=start,
            rounds=rounds,
            callbacks=[loop_lib.Evaluation(evaluate_fn, every=every)],
        )
        self.assertEqual(evaluated, want)
        self.assertEqual(steps, list(range(start, rounds)))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "start=3"):
            loop_lib.train_loop(_step, _init(), start=3, rounds=2)
        with self.assertRaisesRegex(ValueError, "every=0"):
            loop_lib.Evaluation(lambda *_: None, every=0)


class MetricsTest(absltest.TestCase):
    def test_rows_are_fetched_in_batches_and_equal_each_rounds_metrics(self):
        rounds = 7
        _, want = _reference(rounds)
        metrics = loop_lib.Metrics()
        device_get = jax.device_get
        with (
            mock.patch.object(jax, "device_get", side_effect=device_get) as fetches,
            # No implicit device-to-host copy (float(x), np.asarray(x)) inside the loop.
            jax.transfer_guard_device_to_host("disallow"),
        ):
            state = loop_lib.train_loop(
                _step,
                _init(),
                rounds=rounds,
                callbacks=[metrics, loop_lib.Evaluation(lambda *_: None, every=3)],
            )
        # One host sync per flush (after rounds 3, 6 and 7), none in between.
        self.assertEqual(fetches.call_count, 3)
        self.assertEqual([len(c.args[0]) for c in fetches.call_args_list], [3, 3, 1])
        self.assertEqual([row["round"] for row in metrics.rows], list(range(1, rounds + 1)))
        for row, m in zip(metrics.rows, want, strict=True):
            self.assertIsInstance(row["mean"], float)
            self.assertEqual(row["mean"], float(m["mean"]))
            self.assertEqual(row["norm"], float(m["norm"]))
        self.assertEqual(metrics.pending, [])
        np.testing.assert_array_equal(np.asarray(state["x"]), _reference(rounds)[0]["x"])

    def test_row_fn_and_rows_of_a_resumed_run(self):
        rows = [{"round": 1, "mean": 0.0}]  # restored
        metrics = loop_lib.Metrics(
            lambda rnd, m: {"round": rnd, "mean": float(m["mean"])}, rows=rows
        )
        loop_lib.train_loop(_step, _init(), start=1, rounds=3, callbacks=[metrics])
        self.assertIs(metrics.rows, rows)
        self.assertEqual([r["round"] for r in rows], [1, 2, 3])
        self.assertEqual(sorted(rows[-1]), ["mean", "round"])


class InterruptTest(absltest.TestCase):
    def setUp(self):
        if threading.current_thread() is not threading.main_thread():
            self.skipTest("signals reach only the main thread")
        self.dir = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(lambda: shutil.rmtree(self.dir, ignore_errors=True))

    def _callbacks(self, ckpts, metrics, saved):
        def save(done, state):
            if ckpts.latest_round != done:
                saved.append(done)
                ckpts.save(
                    done,
                    state,
                    history=metrics.rows[:done],
                    accountants={},
                    train_key=_KEY,
                    config={},
                    elapsed_s=0.0,
                )

        return [metrics, loop_lib.Checkpoints(save, every=2, on_interrupt=saved.append)]

    def test_ctrl_c_checkpoints_the_last_round_and_resume_is_bit_for_bit(self):
        rounds, stop_after = 7, 3
        want_state, want_metrics = _reference(rounds)

        def step(state, r):
            if r == stop_after - 1:  # Ctrl-C while round 3 runs: it completes, then stop
                os.kill(os.getpid(), signal.SIGINT)
            return _step(state, r)

        ckpts = checkpointing.Checkpointer(self.dir)
        self.addCleanup(ckpts.close)
        metrics, saved = loop_lib.Metrics(), []
        events = []
        with self.assertRaises(KeyboardInterrupt):
            loop_lib.train_loop(
                step,
                _init(),
                rounds=rounds,
                callbacks=[*self._callbacks(ckpts, metrics, saved), _Recorder(events)],
                stop_on_interrupt=True,
            )
        self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)
        # The interval's checkpoint, the interrupted round's, then on_interrupt(3).
        self.assertEqual(saved, [2, 3, 3])
        self.assertEqual(ckpts.rounds, [2, 3])
        self.assertEqual(events[-2:], [("rec", "flush", 3), ("rec", "end", 3, True)])
        self.assertEqual([r["round"] for r in metrics.rows], [1, 2, 3])

        # Resume from the checkpoint: the same final state and rows as a run never stopped.
        restored = ckpts.restore(_init())
        self.assertEqual(restored.round, stop_after)
        metrics = loop_lib.Metrics(rows=restored.history)
        state = loop_lib.train_loop(
            _step,
            restored.state,
            start=restored.round,
            rounds=rounds,
            callbacks=self._callbacks(ckpts, metrics, saved),
            stop_on_interrupt=True,
        )
        np.testing.assert_array_equal(np.asarray(state["x"]), want_state["x"])
        self.assertEqual(
            [r["mean"] for r in metrics.rows], [float(m["mean"]) for m in want_metrics]
        )
        self.assertEqual(ckpts.rounds, [6, 7])

    def test_second_ctrl_c_stops_at_once(self):
        def step(state, r):
            if r == 1:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return _step(state, r)

        events = []
        with self.assertRaises(KeyboardInterrupt):
            loop_lib.train_loop(
                step, _init(), rounds=5, callbacks=[_Recorder(events)], stop_on_interrupt=True
            )
        self.assertNotIn("end", [e[1] for e in events])  # raised inside round 2
        self.assertEqual([e[2] for e in events if e[1] == "round"], [1])


class UserCallbackTest(absltest.TestCase):
    def test_run_calls_a_user_callback_after_the_built_in_ones(self):
        out = tempfile.mkdtemp()
        self.addCleanup(lambda: shutil.rmtree(out, ignore_errors=True))
        config = pathlib.Path(out) / "tiny.toml"
        config.write_text(_testing.TINY_DP_RUN)
        cfg = experiment.load_config(
            config, {"run.output_dir": out, "run.rounds": 4, "run.eval_every": 2}
        )

        class Watch(loop_lib.Callback):
            """Sees every round, forces a flush each round and reads the state's round."""

            def __init__(self):
                self.rounds, self.flushed, self.ended = [], [], None

            def on_round_end(self, done, state, metrics):
                self.rounds.append(done)

            def flush_due(self, done):
                return True

            def on_flush(self, done, state):
                self.flushed.append((done, int(jax.device_get(state.round))))

            def on_end(self, done, state, *, interrupted):
                self.ended = (done, interrupted)

        watch = Watch()
        result = experiment.run(cfg, log=lambda *_: None, callbacks=[watch])
        self.assertEqual(watch.rounds, [1, 2, 3, 4])
        self.assertEqual(watch.flushed, [(d, d) for d in (1, 2, 3, 4)])
        self.assertEqual(watch.ended, (4, False))
        # More flushes change when rows are fetched, not what they hold.
        self.assertEqual([h["round"] for h in result.history], [1, 2, 3, 4])
        self.assertEqual(["test_accuracy" in h for h in result.history], [False, True, False, True])
        lines = (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()
        self.assertLen(lines, 4)


if __name__ == "__main__":
    absltest.main()
