"""Checkpoints of a run with orbax: resume a killed run and get the same result bit for bit.

A checkpoint is one orbax step, ``<output_dir>/checkpoints/<round>/``, written after round
``round`` (rounds completed) with two items:

- ``state``: the server state pytree (:class:`fedjax_dp.ServerState`: parameters, server
  optimizer state, the state of every client/server stage such as the adaptive clip norm, the
  round counter), saved with ``ocp.args.StandardSave`` and restored against the structure and
  dtypes of a freshly initialised state, so nothing is cast or reshaped;
- ``meta`` (JSON): the round, the RNG position (the training key's data and implementation;
  round ``r`` uses ``fold_in(train_key, r)``, so the next key is derived from ``round``), the
  accountants (:meth:`fedjax_dp.accounting.Accountant.state_dict`), the metrics rows so far,
  the cumulative training time and the full config.

Saves are synchronous and atomic (orbax writes to a temporary folder and renames it), so a run
killed at any moment leaves the previous complete checkpoint; ``max_to_keep`` of them are kept.
:func:`check_resumable` decides whether a config may continue from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

#: The folder of ``run.output_dir`` that holds the checkpoints.
CHECKPOINT_DIR = "checkpoints"

# 2: ServerState with client_states and server_aux (Round v2); 3: with sampler_state, and
# accountants of capped Poisson rounds (max_cohort_size, upload_probability).
_VERSION = 3
# What each format added, for the message that refuses an older one.
_ADDED = {2: "per-client state", 3: "a sampler state and exact accounting of the cohort cap"}

#: Options that may change when a run resumes: they do not change the trained parameters or
#: the accounted privacy. ``run.rounds`` may change too, unless it sets the noise (see
#: :func:`check_resumable`).
RESUMABLE_OPTIONS = frozenset(
    {
        "run.progress",
        "run.eval_every",
        "run.checkpoint_every",
        "run.resume",
        "run.tensorboard",
        "run.output_dir",
        "data.download",
    }
)

# Sections that other commands read; `fedjax-dp run` ignores them.
_IGNORED_SECTIONS = ("audit", "sweep")


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint holds.

    Attributes:
      round: rounds completed; the next round to run has this index.
      state: the server state (``None`` when only the metadata was read).
      history: the metrics rows of rounds ``1..round`` (one dict per round).
      accountants: label -> :meth:`fedjax_dp.accounting.Accountant.state_dict`.
      train_key: ``{"impl": str, "data": [int, ...]}``, the training key from which round
        ``r``'s key is ``fold_in(train_key, r)``.
      config: the run's config (``to_dict`` of the experiment config).
      elapsed_s: training time of rounds ``1..round``, summed over sessions.
    """

    round: int
    state: Any
    history: list[dict[str, Any]]
    accountants: dict[str, dict[str, Any]]
    train_key: dict[str, Any]
    config: dict[str, Any]
    elapsed_s: float


def key_fingerprint(key: jax.Array) -> dict[str, Any]:
    """The JSON description of a typed key: its implementation and its data."""
    data = np.asarray(jax.random.key_data(key))
    return {"impl": str(jax.random.key_impl(key)), "data": data.ravel().tolist()}


class Checkpointer:
    """Saves and restores :class:`Checkpoint` s in ``directory`` (an orbax CheckpointManager).

    Args:
      directory: the checkpoint folder (created on the first save).
      max_to_keep: how many of the latest checkpoints to keep (>= 1). Two keep a complete
        previous checkpoint beside the latest.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2) -> None:
        if max_to_keep < 1:
            raise ValueError(f"{max_to_keep=} must be >= 1")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            # Synchronous: when save() returns the checkpoint is complete, so a kill loses at
            # most the rounds since it (async saves could lose one more interval).
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.handlers.StandardCheckpointHandler(),
                "meta": ocp.handlers.JsonCheckpointHandler(),
            },
        )

    @property
    def rounds(self) -> list[int]:
        """The rounds of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    @property
    def latest_round(self) -> int | None:
        """The round of the latest complete checkpoint (``None`` if there is none)."""
        return self._manager.latest_step()

    def save(
        self,
        round: int,
        state: Any,
        *,
        history: list[dict[str, Any]],
        accountants: dict[str, dict[str, Any]],
        train_key: jax.Array,
        config: dict[str, Any],
        elapsed_s: float,
    ) -> None:
        """Writes the checkpoint of round ``round`` (rounds completed); returns when it is on
        disk. ``history`` must hold exactly ``round`` rows."""
        if len(history) != round:
            raise ValueError(f"history has {len(history)} rows, expected one per round ({round})")
        meta = {
            "version": _VERSION,
            "round": int(round),
            "train_key": key_fingerprint(train_key),
            "accountants": accountants,
            "history": history,
            "elapsed_s": float(elapsed_s),
            "config": config,
        }
        self._manager.save(
            int(round),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        self._manager.wait_until_finished()

    def read_meta(self, round: int | None = None) -> Checkpoint:
        """The checkpoint of ``round`` (default: the latest) without its state."""
        round = self._round(round)
        meta = self._manager.restore(round, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return self._checkpoint(round, meta["meta"], None)

    def restore(self, target: Any, round: int | None = None) -> Checkpoint:
        """The checkpoint of ``round`` (default: the latest).

        Args:
          target: a state with the structure, shapes and dtypes to restore into (e.g. the
            run's freshly initialised ``ServerState``); only its metadata is used.
          round: which checkpoint.

        Raises:
          ValueError: no checkpoint, or the checkpoint's state does not match ``target``.
        """
        round = self._round(round)
        where = self.directory / str(round)
        fix = "start over with --run.resume false or choose another --run.output_dir"
        # orbax casts to the target's dtypes; a changed dtype would silently change the run.
        saved = self._manager.item_metadata(round)["state"]
        saved_dtypes = _dtypes_by_path(getattr(saved, "tree", saved))
        for path, dtype in _dtypes_by_path(target).items():
            if path in saved_dtypes and saved_dtypes[path] != dtype:
                raise ValueError(
                    f"the checkpoint {where} stores state{''.join(f'[{p}]' for p in path)} as "
                    f"{saved_dtypes[path]}, this run has {dtype}; {fix}"
                )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            got = self._manager.restore(
                round,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"the checkpoint {where} does not fit this run's state ({type(e).__name__}: "
                f"{e}); {fix}"
            ) from None
        return self._checkpoint(round, got["meta"], got["state"])

    def close(self) -> None:
        self._manager.close()

    def _round(self, round: int | None) -> int:
        if round is None:
            round = self.latest_round
        if round is None or round not in self._manager.all_steps():
            raise ValueError(f"no checkpoint of round {round} in {self.directory}")
        return round

    def _checkpoint(self, round: int, meta: dict[str, Any], state: Any) -> Checkpoint:
        version = meta.get("version")
        if isinstance(version, int) and version < _VERSION:
            raise ValueError(
                f"{self.directory / str(round)} is a fedjax_dp checkpoint of format {version}, "
                f"written before the checkpoint gained "
                + ", ".join(_ADDED[v] for v in range(version + 1, _VERSION + 1) if v in _ADDED)
                + f" (format {_VERSION}); "
                "it cannot be resumed: start over with --run.resume false or another "
                "--run.output_dir"
            )
        if version != _VERSION or meta.get("round") != round:
            raise ValueError(
                f"{self.directory / str(round)} is not a fedjax_dp checkpoint of version "
                f"{_VERSION}; start over with --run.resume false"
            )
        return Checkpoint(
            round=round,
            state=state,
            history=list(meta["history"]),
            accountants=dict(meta["accountants"]),
            train_key=dict(meta["train_key"]),
            config=dict(meta["config"]),
            elapsed_s=float(meta["elapsed_s"]),
        )


def _dtypes_by_path(tree: Any) -> dict[tuple[str, ...], np.dtype]:
    """``{path: dtype}`` of a pytree's leaves; attribute, key and index steps all become
    strings, so a NamedTuple state and orbax's dict metadata of it give the same paths."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        steps = tuple(
            str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path
        )
        out[steps] = np.dtype(leaf.dtype)
    return out


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{name}": value
        for section, options in config.items()
        if section not in _IGNORED_SECTIONS and isinstance(options, dict)
        for name, value in options.items()
    }


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(option, saved value, current value)`` for every option whose change forbids resuming.

    Options missing from ``saved`` (added since) count with their value in ``defaults``.
    ``run.rounds`` may change unless ``privacy.target_epsilon`` or a non-constant
    ``privacy.noise_schedule`` makes the noise depend on it.
    """
    old, new, default = _flatten(saved), _flatten(current), _flatten(defaults)
    rounds_set_noise = (
        new.get("privacy.target_epsilon", 0) > 0
        or new.get("privacy.noise_schedule", "constant") != "constant"
    )
    allowed = RESUMABLE_OPTIONS if rounds_set_noise else RESUMABLE_OPTIONS | {"run.rounds"}
    changes = []
    for option, value in new.items():
        before = old.get(option, default.get(option))
        if option not in allowed and before != value:
            changes.append((option, before, value))
    return changes


def check_resumable(
    checkpoint: Checkpoint, current: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """Raises ``ValueError`` naming the options and the fix if ``current`` cannot continue
    ``checkpoint``: a result-changing option differs, or ``run.rounds`` is below its round."""
    where = f"run.output_dir={current['run']['output_dir']!r}"
    changes = config_changes(checkpoint.config, current, defaults)
    fix = (
        "Rerun with the checkpoint's options to resume, or start over with --run.resume false "
        "(replaces that run's outputs), or choose another --run.output_dir."
    )
    if changes:
        shown = "; ".join(f"{o} was {b!r}, now {v!r}" for o, b, v in changes[:5])
        more = f" (and {len(changes) - 5} more)" if len(changes) > 5 else ""
        why = (
            " (with privacy.target_epsilon or a noise schedule the number of rounds sets the noise)"
            if any(o == "run.rounds" for o, _, _ in changes)
            else ""
        )
        raise ValueError(
            f"{where} holds a checkpoint (round {checkpoint.round}) of a different run: "
            f"{shown}{more}{why}. {fix}"
        )
    rounds = current["run"]["rounds"]
    if rounds < checkpoint.round:
        raise ValueError(
            f"run.rounds={rounds} is below round {checkpoint.round} of the checkpoint in "
            f"{where}: set run.rounds >= {checkpoint.round}, or start over with "
            "--run.resume false, or choose another --run.output_dir."
        )


def rewrite_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Replaces ``path`` by one JSON line per row, atomically (a kill leaves old or new)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)
