"""The host loop over rounds, with callbacks: one loop for run, sweep, audit and host populations.

Everything inside a round is one jitted call, supplied by the caller as
``step(state, r) -> (state, metrics)`` (``r`` is the 0-based round index: a plain
``sim.round_fn``, a sweep's vmapped step, an audit's round with canaries, a host population's
round fed by the cohort prefetcher). :func:`train_loop` runs rounds ``start .. rounds - 1`` and
calls the callbacks' hooks between them; it adds no host synchronisation of its own::

    state = train_loop(step, state, rounds=100, callbacks=[
        Metrics(),                                   # rows, one device_get per flush
        Evaluation(evaluate_fn, every=10),           # after rounds 10, 20, ... and the last
        Progress(100),                               # a tqdm bar (close it: a context manager)
        Checkpoints(save_fn, every=50),              # after rounds 50, 100, and on Ctrl-C
    ], stop_on_interrupt=True)

**Hooks** (:class:`Callback`; ``done`` counts rounds completed, so after round index ``r`` it
is ``r + 1``). Each hook is called on every callback in list order, so a later callback sees
what an earlier one did in the same hook (the evaluation sees the metrics rows of the same
flush, the checkpoint the evaluated row):

- ``on_start(start, rounds)`` once, before the first round;
- ``on_round_end(done, state, metrics)`` after every round, with the round's ``metrics``
  still on the device (not synchronised: a hook that reads them stalls the dispatch of the
  next round, so buffer them and read them at a flush);
- ``flush_due(done) -> bool``: whether the callback wants a flush after round ``done``;
- ``on_flush(done, state)`` at a flush: after round ``done`` when a callback asked or when
  ``done == rounds`` (also once at the end when the loop is started at ``start == rounds``,
  so a resumed run that is complete still gets its final flush), and when the loop is
  interrupted;
- ``on_end(done, state, interrupted=...)`` once at the end: after the final flush, or with
  ``interrupted=True`` after the flush of the last completed round when a Ctrl-C stopped the
  loop (then :func:`train_loop` raises ``KeyboardInterrupt``, for the command line's message).

**Donation.** ``step`` may donate its state (``sim.round_fn`` does), so a hook must not keep
the ``state`` it is given past its return: read or copy what it needs (``jax.device_get``,
``jnp.copy``) in the hook.

**Interrupts.** With ``stop_on_interrupt`` (on the main thread, the only one Python delivers
signals to) the first Ctrl-C (SIGINT) sets a flag checked between rounds: the current round
finishes, the loop flushes, calls ``on_end(..., interrupted=True)`` (where
:class:`Checkpoints` saves the last completed round) and raises ``KeyboardInterrupt``; a
second Ctrl-C raises at once. Without it Ctrl-C raises ``KeyboardInterrupt`` at once.

**Writing a callback** (a public extension point): subclass :class:`Callback` and override the
hooks you need; pass it to :func:`train_loop`, or to :func:`fedjax_dp.experiment.run` with
``callbacks=[...]`` (called after the built-in ones: the metrics rows, evaluation, files,
progress bar and checkpoints)::

    class ClipNormLog(Callback):
        def __init__(self):
            self.pending, self.values = [], []

        def on_round_end(self, done, state, metrics):
            self.pending.append(metrics["clip_norm"])  # a device scalar: no sync here

        def flush_due(self, done):
            return done % 5 == 0

        def on_flush(self, done, state):
            self.values += [float(x) for x in jax.device_get(self.pending)]
            self.pending.clear()
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Self

import jax
import numpy as np

__all__ = [
    "Callback",
    "Checkpoints",
    "Evaluation",
    "Metrics",
    "Progress",
    "Step",
    "train_loop",
]

PyTree = Any
#: ``step(state, r) -> (state, metrics)``: round index ``r`` (0-based), one jitted call.
Step = Callable[[PyTree, int], tuple[PyTree, PyTree]]


class Callback:
    """The hooks of :func:`train_loop` (see the module docstring); every hook does nothing
    here, so a subclass overrides only the ones it needs."""

    def on_start(self, start: int, rounds: int) -> None:
        """Before the first round: the loop runs rounds ``start .. rounds - 1``."""

    def on_round_end(self, done: int, state: PyTree, metrics: PyTree) -> None:
        """After round ``done`` (rounds completed); ``metrics`` are on the device."""

    def flush_due(self, done: int) -> bool:
        """Whether to flush after round ``done`` (the loop always flushes after the last)."""
        return False

    def on_flush(self, done: int, state: PyTree) -> None:
        """A flush after round ``done``: the point to read buffered metrics (one sync)."""

    def on_end(self, done: int, state: PyTree, *, interrupted: bool) -> None:
        """Once, after the final flush (``interrupted``: a Ctrl-C stopped the loop after round
        ``done``; :func:`train_loop` raises ``KeyboardInterrupt`` next)."""


def train_loop(
    step: Step,
    state: PyTree,
    *,
    rounds: int,
    start: int = 0,
    callbacks: Sequence[Callback] = (),
    stop_on_interrupt: bool = False,
) -> PyTree:
    """Runs ``state, metrics = step(state, r)`` for ``r = start .. rounds - 1`` with callbacks.

    Args:
      step: one round, ``(state, r) -> (state, metrics)``; it may donate ``state``.
      state: the state before round ``start`` (donated to the first step).
      rounds: the round to stop after (rounds completed at the end).
      start: rounds already completed (a resumed run), ``0 <= start <= rounds``.
      callbacks: :class:`Callback` s, whose hooks are called in this order.
      stop_on_interrupt: the first Ctrl-C stops the loop cleanly after the current round
        (module docstring, "Interrupts"); only on the main thread.

    Returns:
      The state after round ``rounds``.

    Raises:
      KeyboardInterrupt: a Ctrl-C stopped the loop (after the callbacks' ``on_end``).
    """
    if not 0 <= start <= rounds:
        raise ValueError(f"start={start} must be in [0, rounds={rounds}]")
    callbacks = tuple(callbacks)
    for cb in callbacks:
        cb.on_start(start, rounds)
    checkpoints = any(isinstance(cb, Checkpoints) for cb in callbacks)
    done = start
    with _StopOnInterrupt(stop_on_interrupt, checkpoints=checkpoints) as stop:
        for r in range(start, rounds):
            if stop.raised:
                break
            state, metrics = step(state, r)
            done = r + 1
            for cb in callbacks:
                cb.on_round_end(done, state, metrics)
            if done == rounds or any(cb.flush_due(done) for cb in callbacks):
                _flush(callbacks, done, state)
        if stop.raised and done < rounds:
            _flush(callbacks, done, state)
            for cb in callbacks:
                cb.on_end(done, state, interrupted=True)
            raise KeyboardInterrupt
    if start == rounds:  # no round ran (a resumed run that was complete): its final flush
        _flush(callbacks, done, state)
    for cb in callbacks:
        cb.on_end(done, state, interrupted=False)
    return state


def _flush(callbacks: Sequence[Callback], done: int, state: PyTree) -> None:
    for cb in callbacks:
        cb.on_flush(done, state)


class Metrics(Callback):
    """Each round's metrics as rows, fetched in batches: no host sync between flushes.

    At every flush the metrics of the rounds since the previous one are fetched with ONE
    ``jax.device_get`` and ``row_fn(round, metrics)`` (host numpy values) is appended to
    :attr:`rows` for each, in round order. It asks for no flush itself: the rows are as fresh
    as the other callbacks' flushes (evaluation points, checkpoints, the last round).

    Args:
      row_fn: ``(round, host metrics) -> row`` (default: ``{"round": round, **metrics}``
        with Python scalars).
      rows: the list to append to (e.g. the rows of a resumed run); default a new one.
    """

    def __init__(
        self,
        row_fn: Callable[[int, dict[str, Any]], Any] | None = None,
        *,
        rows: list[Any] | None = None,
    ) -> None:
        self.row_fn = _default_row if row_fn is None else row_fn
        self.rows: list[Any] = [] if rows is None else rows
        self.pending: list[tuple[int, PyTree]] = []

    def on_round_end(self, done: int, state: PyTree, metrics: PyTree) -> None:
        self.pending.append((done, metrics))

    def on_flush(self, done: int, state: PyTree) -> None:
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])  # one host sync
        for (rnd, _), m in zip(self.pending, fetched, strict=True):
            self.rows.append(self.row_fn(rnd, m))
        self.pending.clear()


def _default_row(rnd: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"round": rnd, **{k: np.asarray(v).tolist() for k, v in metrics.items()}}


class _Every(Callback):
    """Calls ``fn(done, state)`` at a flush after every ``every`` rounds and after the last."""

    def __init__(self, fn: Callable[[int, PyTree], Any], *, every: int) -> None:
        if every < 1:
            raise ValueError(f"{every=} must be >= 1")
        self.fn = fn
        self.every = every
        self.rounds: int | None = None

    def on_start(self, start: int, rounds: int) -> None:
        self.rounds = rounds

    def flush_due(self, done: int) -> bool:
        return done > 0 and (done % self.every == 0 or done == self.rounds)

    def on_flush(self, done: int, state: PyTree) -> None:
        if self.flush_due(done):
            self.fn(done, state)


class Evaluation(_Every):
    """Calls ``evaluate_fn(done, state)`` after every ``every`` rounds and after the last
    (at a flush, so after the metrics rows of the same rounds are fetched).

    Args:
      evaluate_fn: ``(rounds completed, state) -> None``; it reads ``state`` (e.g.
        ``state.params``) before returning.
      every: rounds between evaluations (>= 1).
    """

    def __init__(self, evaluate_fn: Callable[[int, PyTree], Any], *, every: int) -> None:
        super().__init__(evaluate_fn, every=every)


class Checkpoints(_Every):
    """Calls ``save_fn(done, state)`` after every ``every`` rounds, after the last, and after
    the last completed round when a Ctrl-C stops the loop (``stop_on_interrupt``).

    ``save_fn`` may be called twice for a round (a Ctrl-C right after a checkpoint): skip a
    round already on disk. Resuming is the caller's part: restore the state and pass
    ``start`` to :func:`train_loop`.

    Args:
      save_fn: ``(rounds completed, state) -> None``; writes before returning.
      every: rounds between checkpoints (>= 1).
      on_interrupt: optional ``(rounds completed) -> None`` called after the interrupt's
        save (e.g. to say where the checkpoint is).
    """

    def __init__(
        self,
        save_fn: Callable[[int, PyTree], Any],
        *,
        every: int,
        on_interrupt: Callable[[int], Any] | None = None,
    ) -> None:
        super().__init__(save_fn, every=every)
        self.on_interrupt = on_interrupt

    def on_end(self, done: int, state: PyTree, *, interrupted: bool) -> None:
        if interrupted:
            self.fn(done, state)
            if self.on_interrupt is not None:
                self.on_interrupt(done)


class Progress(Callback):
    """A tqdm progress bar over rounds: ``round n/total``, the rate in round/s (of this
    session's rounds: ``initial`` is where a resumed run starts) and a postfix.

    One bar may span several loops (a sweep's groups): it is closed by :meth:`close` (or as a
    context manager), never by the loop.

    Args:
      total: rounds in all (of every loop the bar spans).
      enabled: ``False``: no bar (every call does nothing).
      initial: rounds already done (a resumed run).
      postfix_fn: optional ``() -> dict`` shown after the rate, set at every flush (and at
        the start, redrawn).
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        initial: int = 0,
        postfix_fn: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        self.postfix_fn = postfix_fn
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled,
            unit="round",
            dynamic_ncols=True,
            leave=False,
            bar_format=(
                "round {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
            ),
        )

    def on_start(self, start: int, rounds: int) -> None:
        if self.postfix_fn is not None:
            self.bar.set_postfix(self.postfix_fn(), refresh=True)

    def on_round_end(self, done: int, state: PyTree, metrics: PyTree) -> None:
        self.bar.update(1)

    def on_flush(self, done: int, state: PyTree) -> None:
        if self.postfix_fn is not None:
            self.bar.set_postfix(self.postfix_fn(), refresh=False)

    def set_postfix(self, **values: Any) -> None:
        """Shows ``values`` after the rate (until the next flush with a ``postfix_fn``)."""
        self.bar.set_postfix(values)

    def write(self, message: str) -> None:
        """Prints a line above the bar."""
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _StopOnInterrupt:
    """Turns the first Ctrl-C (SIGINT) into a flag that the round loop checks between rounds,
    so the loop stops after its current round (and checkpoints it); a second Ctrl-C stops at
    once. Only in the main thread (elsewhere Python delivers no signals)."""

    def __init__(self, enabled: bool, *, checkpoints: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.raised = False
        self.checkpoints = checkpoints
        self._previous = None

    def __enter__(self) -> Self:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        what = "saving a checkpoint after this round" if self.checkpoints else "this round ends"
        print(f"\ninterrupted: {what} (Ctrl-C again to stop now)", file=sys.stderr)

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            previous = self._previous
            signal.signal(
                signal.SIGINT, signal.default_int_handler if previous is None else previous
            )
