"""Per-client state on the host, for populations whose state does not fit on the device.

A stateful client algorithm (SCAFFOLD's control variates: one model-sized row per client)
keeps ``[N, *params]`` of state; for a host population of millions of clients that is far
beyond a device's memory. With ``build_simulation(..., host_client_states=True)`` (or
``build_round(..., host_client_states=True)``) the device state ``ServerState.client_states``
holds only the cohort's rows ``[cohort_size, ...]``, and :class:`HostClientStates` holds the
population's rows in host memory (numpy), gathering the cohort's rows before each round and
scattering the rows the round wrote after it. The round is the same jitted program as with
device-placed state, so the results are the same (tested against it bit for bit).

Each round costs one host-to-device copy of ``cohort_size`` rows and one copy back (a
synchronisation point per round, like the host population's data gather).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class HostClientStates:
    """The population's per-client state rows on the host (numpy leaves ``[N, ...]``).

    Args:
      state: a ``ServerState`` of a round built with ``host_client_states=True`` (its
        ``client_states`` leaves are ``[cohort_size, ...]`` copies of the initial row).
      num_clients: ``N``, the population size.
    """

    def __init__(self, state: Any, num_clients: int):
        if int(num_clients) != num_clients or num_clients < 1:
            raise ValueError(f"num_clients={num_clients!r} must be a positive integer")
        rows = jax.device_get(state.client_states)
        if not jax.tree.leaves(rows):
            raise ValueError(
                "the state has no per-client state (a stateless client algorithm): "
                "HostClientStates is not needed"
            )
        self.num_clients = int(num_clients)
        self.states = jax.tree.map(
            lambda r: np.broadcast_to(np.asarray(r)[0], (self.num_clients, *r.shape[1:])).copy(),
            rows,
        )

    @property
    def nbytes(self) -> int:
        """Host bytes of the population's state."""
        return int(sum(a.nbytes for a in jax.tree.leaves(self.states)))

    def gather(self, ids: Any) -> Any:
        """The rows of clients ``ids`` (``[C]``; ids out of range, e.g. padding, read row 0)."""
        ids = np.asarray(ids).reshape(-1)
        safe = np.where((ids >= 0) & (ids < self.num_clients), ids, 0)
        return jax.tree.map(lambda s: s[safe], self.states)

    def scatter(self, ids: Any, mask: Any, rows: Any) -> None:
        """Writes ``rows[i]`` to client ``ids[i]`` where ``mask[i]`` (real cohort slots).

        The round leaves a real client's row unchanged when it did not upload (or the round
        was skipped), so writing every real slot back is exact.

        Raises:
          ValueError: a real slot's id is out of range or repeated.
        """
        ids = np.asarray(ids).reshape(-1)
        real = np.asarray(mask, bool).reshape(-1)
        idx = ids[real]
        if ((idx < 0) | (idx >= self.num_clients)).any() or len(np.unique(idx)) != len(idx):
            raise ValueError(
                f"scatter: the real slots' ids must be distinct and in [0, {self.num_clients})"
            )

        def write(s, r):
            s[idx] = np.asarray(r)[real]

        jax.tree.map(write, self.states, rows)

    def round(self, round_fn, state, data, hparams, key, cohort):
        """One round with host-placed state: gather the cohort's rows into ``state``, run
        ``round_fn(state, data, hparams, key, cohort)`` (``state`` is donated), scatter the
        written rows back. Returns ``(new_state, metrics)``."""
        rows = jax.tree.map(
            lambda r, old: jax.device_put(r.astype(old.dtype)),
            self.gather(cohort.ids),
            state.client_states,
        )
        new_state, metrics = round_fn(
            state._replace(client_states=rows), data, hparams, key, cohort
        )
        self.scatter(cohort.ids, cohort.mask, jax.device_get(new_state.client_states))
        return new_state, metrics
