"""Privacy-utility sweeps: a grid of runs as ONE vectorised simulation (``fedjax-dp sweep``).

A sweep trains every point of a grid, noise multipliers x seeds (optionally x clip norms x
client learning rates x server learning rates), for ``run.rounds`` rounds of the config's
algorithm on the config's data, and reports for each setting the accounted epsilon and the
final test accuracy over the seeds (mean, sample standard deviation, each seed's value).

**One program for the whole grid.** The numeric hyper-parameters are traced arguments of the
round (``sim.round_fn(state, data, hparams, key)``), so every point runs the same compiled
round. The sweep stacks the points' server states ``[seeds, settings]``, hyper-parameters
``[settings]`` and keys ``[seeds]``, and one jitted call per round trains all points:
``vmap`` over seeds (states, keys) of ``vmap(sim.round_fn, in_axes=(0, None, 0, None))`` over
settings (states, hparams), on one shared copy of the data. On CPU the seeds run one after
another inside the same call (``lax.map`` instead of the outer ``vmap``): same results,
and on the digits sweep it compiles faster (5.2 s against 7.5 s) and trains at least as
fast (two runs of ``benchmarks/sweep.py``, see ``benchmarks/RESULTS.md``), because a CPU has no idle lanes for a wider batch
to fill, while under a ``vmap`` over seeds every seed's chunk loop runs to the largest of
their cohorts. Within a seed the key is not
batched, so what depends on the key alone (the cohort, the local data order, the gathered
batches, the noise draws, which the settings then scale) is computed once per seed, and a
batch's product with the settings' weights becomes one larger matrix product. Evaluation is
vmapped over the points too. ``sweep.vectorize = false`` runs the points one after another
with the same compiled round (the reference, and a fallback).

**What varies, what is shared.** Point ``(setting, seed)`` is exactly the run
``fedjax-dp run CONFIG --run.seed seed --data.partition_seed P`` with that setting's
hyper-parameters, where ``P`` is the config's ``data.partition_seed`` (else its
``run.seed``): the data (train/test split and client partition) are the same for every point;
the seed drives initialisation, cohort sampling, local data order and noise, derived as
:func:`fedjax_dp.experiment.run` derives them (``root = key(seed)``, init key
``fold_in(root, 0)``, round ``r`` key ``fold_in(fold_in(root, 1), r)``). Results equal the
single runs up to float rounding (``vmap`` may reorder float operations).

**The non-private baseline** (``sweep.baseline``) is the same algorithm with noise
multiplier 0 and clip norm :data:`BASELINE_CLIP_NORM` (1e15) in the same vmapped batch, one
per seed (and per swept learning rates). Clipping scales a delta by
``min(1, C / max(norm, tiny))``, which is exactly 1 for any norm below 1e15, and the noise
``0 * normal`` is exactly 0, so both stages are exact no-ops; an infinite clip norm cannot be
used because the noise std ``0 * inf`` is NaN. It keeps everything else of the DP algorithm
(the division by the public expected cohort size, DP-SGD's division by the batch size), so
the gap to the baseline is the cost of clipping and noise alone. Its epsilon is infinite.

**Privacy.** Epsilon is accounted on the host with the run's own accountant
(:func:`fedjax_dp.privacy.build_plan`, so noise schedules, ``privacy.target_epsilon``
without ``sweep.noise_multipliers`` and the noise-cohort trick behave as in ``fedjax-dp
run``), once per distinct noise multiplier: clip norms, learning rates and seeds do not
change it. Each row's epsilon is that of ONE point. All points train on the same data, so
releasing the grid composes them: ``sweep.json``'s ``privacy`` block, the table's footer and
the log give the epsilon of releasing all points together (:meth:`Sweep.composed_epsilons`:
every point's rounds in one accountant; ``inf`` with the non-private baseline, so also
without the baseline). A DP sweep writes no training loss, cohort size or overflow count
(functions of the training data that the accountant does not cover).

**Memory.** A vmapped round holds every point's cohort chunk at once (with the seeds in
sequence, one seed's points at a time): memory grows with points x
``algorithm.chunk_size``. With an automatic chunk size (``algorithm.chunk_size =
0``) the memory budget is split over the points of a group, so a vmapped chunk stays within
the budget of one run; ``sweep.parallel = p`` vmaps at most ``p`` points at a time (blocks of
``min(seeds, p)`` seeds x ``p // that`` settings; the last blocks are padded with copies, so
every group reuses the same compiled program).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import privacy as privacy_lib
from fedjax_dp.core import memory
from fedjax_dp.core.algorithms import build_simulation, hparams_of
from fedjax_dp.core.evaluation import evaluate, evaluate_batch
from fedjax_dp.runner import loop as loop_lib

#: Clip norm of the non-private baseline: large enough that clipping never acts, small enough
#: that ``0 * C`` (the noise std) and ``C ** 2`` (per-layer sensitivities) stay finite.
BASELINE_CLIP_NORM = 1e15

# The clip-norm hparam of each unit's DP mechanism (noise: fedjax_dp.privacy.NOISE_HPARAM).
_CLIP_HPARAM = {"user": "clip_norm", "example": "example_clip_norm"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of the grid (a point without its seed).

    Attributes:
      noise_multiplier: the DP mechanism's noise multiplier (``None``: non-private algorithm;
        with ``privacy.target_epsilon`` the calibrated one, with a noise schedule the first
        round's).
      clip_norm: the DP mechanism's clip norm (``None``: not a hyper-parameter of the run,
        e.g. adaptive or per-layer clipping, or a non-private algorithm).
      client_lr, server_lr: the learning rates.
      baseline: the non-private baseline (noise 0, clip norm :data:`BASELINE_CLIP_NORM`).
      grid: the values of the ``sweep.grid`` axes, ``((name, value), ...)`` in the order of
        the option.
    """

    noise_multiplier: float | None
    clip_norm: float | None
    client_lr: float
    server_lr: float
    baseline: bool = False
    grid: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
      rows: one dict per setting (the table of ``sweep.csv``), baseline rows last.
      points: one dict per point ``(setting, seed)`` (``points.jsonl``), in the order of
        ``params``: setting by setting, seeds in the order of ``sweep.seeds``.
      params: the final parameters of every point, leaves ``[num_points, *leaf]``.
      timing: wall times of the training (``train_s``), of the first round (compilation
        included, ``first_round_s``), rounds, points and point-rounds per second.
      output_dir: where the files went (``None`` with ``write=False``).
      privacy: what the sweep's epsilons cover and the epsilon of releasing all its points
        together (:func:`composition`; ``None`` without DP).
    """

    rows: list[dict[str, Any]]
    points: list[dict[str, Any]]
    params: Any
    timing: dict[str, Any]
    output_dir: pathlib.Path | None
    privacy: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- the grid


def _sweep_lists(cfg) -> dict[str, list]:
    return {
        name: list(getattr(cfg.sweep, name))
        for name in ("noise_multipliers", "seeds", "clip_norms", "client_lrs", "server_lrs")
    }


def parse_grid(text: str) -> list[tuple[str, list[float]]]:
    """``sweep.grid`` (``"name=v1,v2; name2=v1,v2"``) as ``[(name, [values]), ...]``.

    Raises:
      ValueError: a malformed axis, a repeated name or value, or a value that is not a
        finite number (the message names the option and the fix).
    """
    axes: list[tuple[str, list[float]]] = []
    for part in (p.strip() for p in str(text or "").split(";")):
        if not part:
            continue
        name, eq, values = part.partition("=")
        name = name.strip()
        example = "e.g. sweep.grid = 'mu=0,0.01,1; target_quantile=0.3,0.5'"
        if not eq or not name or not values.strip():
            raise ValueError(f"sweep.grid: {part!r} is not 'name=v1,v2,...' ({example})")
        try:
            vals = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"sweep.grid: {part!r}: the values must be numbers ({example})")
        bad = [v for v in vals if not math.isfinite(v)]
        if bad:
            raise ValueError(f"sweep.grid: {part!r}: {bad} is not a finite number")
        dupes = sorted({v for v in vals if vals.count(v) > 1})
        if dupes:
            raise ValueError(f"sweep.grid: {part!r} repeats {dupes}; list each value once")
        if name in (n for n, _ in axes):
            raise ValueError(f"sweep.grid: {name!r} is named twice; give one axis per hparam")
        axes.append((name, vals))
    return axes


def check(cfg) -> None:
    """Raises ValueError naming the option and the fix for a sweep that cannot run.

    Checks what does not need the data (see :class:`Sweep` for the checks that need the
    built simulation).
    """
    s, p = cfg.sweep, cfg.privacy
    lists = _sweep_lists(cfg)
    if not any(lists.values()) and not parse_grid(s.grid):
        raise ValueError(
            "the sweep grid is empty: list what to sweep, e.g. sweep.noise_multipliers = "
            "[0.5, 1, 2] and sweep.seeds = [0, 1, 2] (also sweep.clip_norms, "
            "sweep.client_lrs, sweep.server_lrs, and sweep.grid for any other hparam)"
        )
    for name, values in lists.items():
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise ValueError(f"sweep.{name}={values} repeats {dupes}; list each value once")
        for v in values:
            if not math.isfinite(v):
                raise ValueError(f"sweep.{name}={values}: {v} is not a finite number")
    for name, low, fix in (
        ("noise_multipliers", 0.0, ">= 0 (0: no noise)"),
        ("seeds", 0, ">= 0"),
        ("client_lrs", 0.0, ">= 0"),
        ("server_lrs", 0.0, ">= 0"),
    ):
        bad = [v for v in lists[name] if v < low]
        if bad:
            raise ValueError(f"sweep.{name}={lists[name]}: {bad} must be {fix}")
    bad = [v for v in lists["clip_norms"] if not v > 0]
    if bad:
        raise ValueError(f"sweep.clip_norms={lists['clip_norms']}: {bad} must be > 0")
    if s.parallel < 0:
        raise ValueError(
            f"sweep.parallel={s.parallel} must be >= 0 (0: all points in one vmapped group)"
        )
    if p.target_epsilon > 0 and lists["noise_multipliers"]:
        raise ValueError(
            f"privacy.target_epsilon={p.target_epsilon:g} calibrates the noise multiplier, so "
            "it cannot be combined with sweep.noise_multipliers; unset one of them (the table "
            "reports each listed noise multiplier's epsilon)"
        )
    if p.attack:
        raise ValueError(
            "privacy.attack holds clients out of one run; the sweep does not run the attack. "
            "Unset privacy.attack (or run fedjax-dp run for the points to attack)"
        )
    if cfg.algorithm.name == "fedsgd" and lists["client_lrs"]:
        raise ValueError(
            "sweep.client_lrs: fedsgd fixes client_lr = 1 (one step of plain SGD per client); "
            "sweep sweep.server_lrs instead"
        )


# ----------------------------------------------------------------------------- the sweep


class Sweep:
    """A sweep built from a config: data, model, simulation, grid, hparams, privacy plans.

    :func:`run_sweep` is the command; this class lets benchmarks time the training of the
    same grid in both modes (:meth:`train`) after compiling once (:meth:`compile`).

    Attributes:
      cfg: the experiment config.
      settings: the :class:`Setting` of the grid (noise multipliers outermost, then clip
        norms, client and server learning rates), the baseline settings last.
      seeds: the seeds; point ``i`` is ``(settings[i // len(seeds)], seeds[i % len(seeds)])``.
      unit: ``"user"`` or ``"example"``: the level of the DP mechanism (``None``: no DP).
      seeds_in_sequence: whether a vectorised group runs its seeds one after another within
        each round's call (``lax.map``) rather than vmapped; default: on CPU (see the module
        docstring). Results are the same either way.
    """

    def __init__(
        self,
        cfg,
        *,
        log: Callable[[str], Any] = print,
        seeds_in_sequence: bool | None = None,
    ):
        from fedjax_dp.runner import experiment

        experiment._check(cfg)
        check(cfg)
        self.cfg, self._log = cfg, log
        if seeds_in_sequence is None:
            seeds_in_sequence = jax.default_backend() == "cpu"
        self.seeds_in_sequence = bool(seeds_in_sequence)
        self.train_data, (self.x_test, self.y_test) = experiment.load_data(cfg)
        self.model = experiment.make_model(
            cfg, self.train_data.feature_shape, self.train_data.num_classes
        )
        self._algorithm = experiment.algorithm_config(cfg)
        self.sim = build_simulation(self._algorithm, self.model, self.train_data)
        self._vector_sims: dict[int, Any] = {}
        self._steps: dict[tuple[int, int], Any] = {}
        self._inits: dict[tuple[int, int], Any] = {}
        self._epsilons: list[dict[str, float]] | None = None
        sim, lists = self.sim, _sweep_lists(cfg)
        hp = hparams_of(sim.config)  # host floats, as configured
        privacy = sim.round_privacy(hp)
        units = sorted({rp.unit for rp in privacy})
        if len(units) > 1:
            raise ValueError(f"the sweep needs at most one DP mechanism; this run has {units}")
        self.unit = units[0] if units else None
        noise_key = privacy_lib.NOISE_HPARAM.get(self.unit)
        clip_key = _CLIP_HPARAM.get(self.unit)
        if self.unit is not None and noise_key not in hp:
            raise ValueError(f"this run's {self.unit}-level mechanism cannot be swept")
        if clip_key not in hp:
            clip_key = None
        a = sim.config
        if self.unit is None:
            for name in ("noise_multipliers", "clip_norms"):
                if lists[name]:
                    raise ValueError(
                        f"sweep.{name} needs a DP algorithm, but algorithm.name={a.name!r} adds "
                        "no noise; use algorithm.name = 'dp_fedavg' (user level) or "
                        f"'dp_sgd_fedavg' (example level), or unset sweep.{name}"
                    )
        elif lists["clip_norms"] and clip_key is None:
            why = (
                "adapted during training (algorithm.adaptive_clipping)"
                if a.adaptive_clipping
                else "set per parameter group (algorithm.layer_clip_norms)"
            )
            raise ValueError(
                f"sweep.clip_norms: this run's clip norm is {why}, not one hyper-parameter; "
                "unset sweep.clip_norms"
            )
        baseline = bool(cfg.sweep.baseline) and self.unit is not None
        if baseline and a.adaptive_clipping:
            raise ValueError(
                "sweep.baseline: with algorithm.adaptive_clipping the clip norm is round state, "
                "so noise 0 does not switch clipping off; set sweep.baseline = false (or run the "
                "baseline as a separate sweep without adaptive clipping)"
            )
        if cfg.sweep.baseline and self.unit is None:
            log("sweep: the algorithm is not private, so there is no separate baseline")
        self._noise_key, self._clip_key = noise_key, clip_key
        self.seeds = [int(v) for v in lists["seeds"]] or [int(cfg.run.seed)]
        noises = [float(v) for v in lists["noise_multipliers"]] or [
            hp[noise_key] if noise_key else None
        ]
        clips = [float(v) for v in lists["clip_norms"]] or [hp[clip_key] if clip_key else None]
        client_lrs = [float(v) for v in lists["client_lrs"]] or [hp["client_lr"]]
        server_lrs = [float(v) for v in lists["server_lrs"]] or [hp["server_lr"]]
        self.grid_names, grids = self._grid_axes(cfg, noise_key, clip_key)
        settings = [
            Setting(n, c, cl, sl, grid=g)
            for n, c, cl, sl, g in itertools.product(noises, clips, client_lrs, server_lrs, grids)
        ]
        if baseline:
            settings += [
                Setting(0.0, None, cl, sl, baseline=True, grid=g)
                for cl, sl, g in itertools.product(client_lrs, server_lrs, grids)
            ]
        self.settings = settings
        # Host float32 hparams of each setting (as the round sees them), checked.
        self._hparams: list[dict[str, float]] = []
        for st in settings:
            overrides = {"client_lr": st.client_lr, "server_lr": st.server_lr, **dict(st.grid)}
            if st.baseline:
                overrides[noise_key] = 0.0
                for name in hp:
                    if (
                        name == clip_key
                        or name.endswith("clip_norm")
                        or name.startswith("clip_norm[")
                    ):
                        overrides[name] = BASELINE_CLIP_NORM
            else:
                if noise_key:
                    overrides[noise_key] = st.noise_multiplier
                if clip_key:
                    overrides[clip_key] = st.clip_norm
            try:
                arrays = sim.make_hparams(**overrides)
            except ValueError as e:
                raise ValueError(f"sweep point {_describe(st)}: {e}") from None
            self._hparams.append({k: float(v) for k, v in jax.device_get(arrays).items()})
        self._names = sorted(hp)
        self._plans = self._privacy_plans()
        self._table = self._hparams_table()

    def _grid_axes(self, cfg, noise_key, clip_key):
        """``sweep.grid``'s names and the product of its axes, checked against the
        hyper-parameters this run's round declares (``sim.hparams``)."""
        axes = parse_grid(cfg.sweep.grid)
        declared = {h.name: h for h in self.sim.hparams}
        dedicated = {
            noise_key: "sweep.noise_multipliers",
            clip_key: "sweep.clip_norms",
            "client_lr": "sweep.client_lrs",
            "server_lr": "sweep.server_lrs",
        }
        noise_names = {r.noise_hparam for r in self.sim.releases(self.sim.make_hparams())}
        for name, values in axes:
            h = declared.get(name)
            if name in dedicated:
                raise ValueError(f"sweep.grid: sweep {name} with {dedicated[name]}")
            if h is None or h.from_state:
                why = "is set from round state" if h is not None else "is not an hparam of"
                sweepable = sorted(
                    n for n, d in declared.items() if not d.from_state and n not in dedicated
                )
                others = (
                    f"the others it declares are {sweepable}"
                    if sweepable
                    else "it declares no other (learning rates, clip norm and noise have "
                    "their own sweep options)"
                )
                raise ValueError(
                    f"sweep.grid: {name!r} {why} this run; {others} (`fedjax-dp hparams "
                    "CONFIG` lists them)"
                )
            if name in noise_names:
                raise ValueError(
                    f"sweep.grid: {name!r} sets the noise of a DP release, so each value has "
                    "its own epsilon; sweep it in separate sweeps (or with "
                    "sweep.noise_multipliers when it is the mechanism's noise multiplier)"
                )
            for v in values:
                try:
                    h.check(v)
                except ValueError as e:
                    raise ValueError(f"sweep.grid: {e}") from None
        names = [n for n, _ in axes]
        grids = [tuple(zip(names, combo)) for combo in itertools.product(*(v for _, v in axes))]
        return names, grids

    # ------------------------------------------------------------------ privacy and hparams

    def _privacy_plans(self) -> dict[int, Any]:
        """Setting index -> the run's privacy plan; one plan per distinct noise multiplier."""
        plans: dict[int, Any] = {}
        by_noise: dict[float, Any] = {}
        # The run's messages (calibration, schedule) only when there is one plan to describe.
        quiet = len({st.noise_multiplier for st in self.settings if not st.baseline}) > 1
        for i, st in enumerate(self.settings):
            if st.baseline:
                continue
            hp = self._hparams[i]
            noise = hp.get(self._noise_key) if self._noise_key else None
            if noise not in by_noise:
                by_noise[noise] = privacy_lib.build_plan(
                    self.cfg.privacy,
                    self.sim,
                    _device_hparams(hp),
                    self.cfg.run.rounds,
                    (lambda *_: None) if quiet else self._log,
                )
            plans[i] = by_noise[noise]
        if self._noise_key and self.cfg.privacy.target_epsilon > 0:
            (plan,) = {id(p): p for p in plans.values()}.values()
            sigma = plan.summary["calibrated_noise_multiplier"]
            added = float(plan.hparams_at(0)[self._noise_key])  # float32 >= sigma
            for i, st in enumerate(self.settings):
                if not st.baseline:
                    self.settings[i] = dataclasses.replace(st, noise_multiplier=sigma)
                    self._hparams[i] = {**self._hparams[i], self._noise_key: added}
        return plans

    def _round_hparams(self, setting: int, r: int) -> dict[str, float]:
        """The host hparams the round of setting ``setting`` is called with in round ``r``."""
        hp = self._hparams[setting]
        plan = self._plans.get(setting)
        if plan is None or self._noise_key is None:
            return hp
        return {**hp, self._noise_key: float(plan.hparams_at(r)[self._noise_key])}

    def _hparams_table(self) -> np.ndarray:
        """``f32[T, settings, H]``: hparams (sorted names) per round; ``T = 1`` if constant."""
        rounds = self.cfg.run.rounds
        varying = self._noise_key is not None and self.cfg.privacy.noise_schedule != "constant"
        steps = rounds if varying else 1
        table = np.zeros((steps, len(self.settings), len(self._names)), np.float32)
        noise_of: dict[int, np.ndarray] = {}  # id(plan) -> f32[steps]; plans live in _plans
        for i in range(len(self.settings)):
            table[:, i] = [self._hparams[i][n] for n in self._names]
            plan = self._plans.get(i)
            if plan is not None and self._noise_key is not None:
                if id(plan) not in noise_of:
                    noise_of[id(plan)] = np.asarray(
                        [plan.hparams_at(r)[self._noise_key] for r in range(steps)], np.float32
                    )
                table[:, i, self._names.index(self._noise_key)] = noise_of[id(plan)]
        return table

    def epsilons(self) -> list[dict[str, float]]:
        """Per setting: ``{label: epsilon}`` after ``run.rounds`` rounds (the labels of
        ``fedjax-dp run``: the unit, plus ``user_simulated`` with the noise-cohort trick);
        ``inf`` for the baseline, ``{}`` without DP. Computed once per distinct plan."""
        if self._epsilons is not None:
            return self._epsilons
        out, done = [], {}
        for i, _ in enumerate(self.settings):
            plan = self._plans.get(i)
            if plan is None:
                out.append({self.unit: math.inf} if self.unit else {})
                continue
            if id(plan) not in done:
                done[id(plan)] = plan.epsilons(self.cfg.run.rounds)
            out.append(done[id(plan)])
        self._epsilons = out
        return out

    def composed_epsilons(self, *, baseline: bool = True) -> dict[str, float]:
        """``{label: epsilon}`` of releasing every point of the sweep together.

        All points train on the same data, so their releases compose: every point's rounds
        (each seed of each setting, ``run.rounds`` rounds of its privacy plan) go into one
        :class:`fedjax_dp.accounting.Accountant` per label, with the run's delta, accountant
        and conversion (heterogeneous composition; rounds with the same
        :class:`~fedjax_dp.accounting.RoundPrivacy` are composed at once). A non-private
        point (the baseline, noise multiplier 0) makes it ``inf``. ``baseline=False`` leaves
        the baseline points out (the epsilon of releasing the DP points only). ``{}``
        without DP.
        """
        if self.unit is None:
            return {}
        labels = next(iter(self._plans.values())).labels  # every setting's plan has them
        schedules: dict[str, list] = {label: [] for label in labels}
        for i, _ in enumerate(self.settings):
            plan = self._plans.get(i)
            if plan is None:  # the non-private baseline
                if baseline:
                    return {label: math.inf for label in labels}
                continue
            for label, schedule in plan.schedule(self.cfg.run.rounds, len(self.seeds)).items():
                schedules[label].extend(schedule)
        return {
            label: privacy_lib.composed_epsilon(schedule, self.cfg.privacy)
            for label, schedule in schedules.items()
        }

    def neighboring_relation(self) -> str | None:
        """The neighbouring relation of the sweep's epsilons (``None`` without DP)."""
        plan = next(iter(self._plans.values()), None)
        return None if plan is None else plan.relation

    # ----------------------------------------------------------------------------- training

    @property
    def num_points(self) -> int:
        return len(self.settings) * len(self.seeds)

    def point(self, i: int) -> tuple[int, int]:
        """``(setting index, seed)`` of point ``i``."""
        return i // len(self.seeds), self.seeds[i % len(self.seeds)]

    def group_shape(self, parallel: int | None = None) -> tuple[int, int]:
        """``(seeds, settings)`` per vmapped group: every point by default; with
        ``parallel = p``, at most ``p`` points (seeds first: they are the outer axis)."""
        parallel = self.cfg.sweep.parallel if parallel is None else parallel
        n_seeds, n_settings = len(self.seeds), len(self.settings)
        if parallel <= 0:
            return n_seeds, n_settings
        k = min(n_seeds, parallel)
        return k, min(n_settings, max(1, parallel // k))

    def vector_sim(self, points: int):
        """The simulation vmapped over ``points`` points: the config's, except that an
        automatic chunk size splits the memory budget over the points."""
        if points not in self._vector_sims:
            a = self._algorithm
            if a.chunk_size is None and points > 1:
                budget_mb = a.memory_budget_mb or memory.default_budget() / 2**20
                a = dataclasses.replace(a, memory_budget_mb=budget_mb / points)
                self._vector_sims[points] = build_simulation(a, self.model, self.train_data)
            else:
                self._vector_sims[points] = self.sim
        return self._vector_sims[points]

    def _step(self, shape: tuple[int, int]):
        """``jit(step)``: one round of a ``[seeds, settings]`` group of points.

        ``vmap`` (or, with ``seeds_in_sequence``, ``lax.map``) over seeds (states, keys) of
        ``vmap`` over settings (states, hparams) of the round; the data are shared by all
        points, and each seed's key by its settings, so
        what derives from the key alone (cohort, local data order, gathered batches, noise
        draws) is computed once per seed, and a batch's product with the settings' weights
        is one larger matrix product.
        """
        if shape not in self._steps:
            round_fn = self.vector_sim(shape[0] * shape[1]).round_fn
            names = self._names

            def step(states, data, table, train_keys, r):
                row = table[jnp.minimum(r, table.shape[0] - 1)]  # [settings, H]
                hparams = {name: row[:, j] for j, name in enumerate(names)}
                keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(train_keys, r)
                per_setting = jax.vmap(round_fn, in_axes=(0, None, 0, None))
                if self.seeds_in_sequence:
                    return jax.lax.map(
                        lambda sk: per_setting(sk[0], data, hparams, sk[1]), (states, keys)
                    )
                return jax.vmap(per_setting, in_axes=(0, None, None, 0))(
                    states, data, hparams, keys
                )

            self._steps[shape] = jax.jit(step, donate_argnums=0)
        return self._steps[shape]

    def _groups(self, shape: tuple[int, int]) -> list[tuple[list[int], list[int]]]:
        """``(seed indices, setting indices)`` per group; blocks padded with their last."""
        k, b = shape

        def blocks(n, size):
            out = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
            out[-1] += [out[-1][-1]] * (size - len(out[-1]))
            return out

        return [
            (seeds, settings)
            for settings in blocks(len(self.settings), b)
            for seeds in blocks(len(self.seeds), k)
        ]

    def _group_inputs(self, shape, seeds: list[int], settings: list[int]):
        """Initial states ``[seeds, settings]``, the hparams table and the train keys."""
        if shape not in self._inits:
            init, n_settings = self.vector_sim(shape[0] * shape[1]).init, shape[1]

            def init_group(roots):
                init_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(roots, 0)
                train_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(roots, 1)
                states = jax.vmap(init)(init_keys)
                # Every setting of a seed starts from that seed's initialisation.
                states = jax.tree.map(lambda x: jnp.repeat(x[:, None], n_settings, axis=1), states)
                return states, train_keys

            self._inits[shape] = jax.jit(init_group)
        roots = jax.random.wrap_key_data(
            jnp.stack([jax.random.key_data(jax.random.key(self.seeds[j])) for j in seeds])
        )
        states, train_keys = self._inits[shape](roots)
        table = jnp.asarray(self._table[:, settings])
        return states, table, train_keys

    def compile(self, *, vectorize: bool | None = None, parallel: int | None = None) -> float:
        """Compiles (by running once on throw-away states) what :meth:`train` runs; seconds."""
        vectorize = self.cfg.sweep.vectorize if vectorize is None else vectorize
        start = time.perf_counter()
        data = self.train_data.to_device()
        if vectorize:
            shape = self.group_shape(parallel)
            states, table, train_keys = self._group_inputs(shape, *self._groups(shape)[0])
            states, _ = self._step(shape)(states, data, table, train_keys, 0)
            evaluate_batch(self.model, _flatten2(states.params), self.x_test, self.y_test)
        else:
            hp = _device_hparams(dict(zip(self._names, self._table[0, 0].tolist())))
            state = self.sim.init(jax.random.key(0))
            state, _ = self.sim.round_fn(state, data, hp, jax.random.key(1))
            evaluate(self.model, state.params, self.x_test, self.y_test)
        return time.perf_counter() - start

    def train(
        self,
        *,
        vectorize: bool | None = None,
        parallel: int | None = None,
        progress: bool | None = None,
    ) -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
        """Trains every point for ``run.rounds`` rounds, evaluating every ``run.eval_every``.

        Returns:
          ``(results, params, timing)``: per point a dict (``test_loss``, ``test_accuracy``,
          ``curve``, the evaluations; without DP also ``train_loss`` of the last round and
          ``cohort_overflow`` summed over rounds, which a DP sweep does not release), the
          final parameters (leaves ``[num_points, *leaf]``) and the wall times.
        """
        cfg = self.cfg
        vectorize = cfg.sweep.vectorize if vectorize is None else vectorize
        progress = cfg.run.progress if progress is None else progress
        rounds = cfg.run.rounds
        data = self.train_data.to_device()
        results: list[dict[str, Any]] = [{} for _ in range(self.num_points)]
        params_out: list[Any] = [None] * self.num_points
        start = time.perf_counter()
        first_round_s = None

        def train(step, state, track, evaluate_fn, bar):
            """``rounds`` rounds of ``step`` from ``state``, ``track`` collecting the metrics,
            ``evaluate_fn`` every ``run.eval_every``; times the sweep's first round."""

            def timed_step(state, r):
                nonlocal first_round_s
                state, metrics = step(state, r)
                if first_round_s is None:  # compilation, unless compile() ran before
                    jax.block_until_ready(state)
                    first_round_s = time.perf_counter() - start
                return state, metrics

            evaluation = loop_lib.Evaluation(evaluate_fn, every=cfg.run.eval_every)
            return loop_lib.train_loop(
                timed_step, state, rounds=rounds, callbacks=[track, evaluation, bar]
            )

        n_seeds = len(self.seeds)
        if vectorize:
            shape = self.group_shape(parallel)
            group = shape[0] * shape[1]
            groups = self._groups(shape)
            step_fn = self._step(shape)
            with loop_lib.Progress(rounds * len(groups), enabled=progress) as bar:
                for seeds, settings in groups:
                    states, table, train_keys = self._group_inputs(shape, seeds, settings)
                    # Row j of the flattened [seeds, settings] group is point `points[j]`.
                    points = [s * n_seeds + k for k in seeds for s in settings]
                    track = _Tracker(group, private=self.unit is not None)

                    def evaluate_group(done, states, track=track):
                        ev = evaluate_batch(
                            self.model, _flatten2(states.params), self.x_test, self.y_test
                        )
                        track.evaluated(done, ev["loss"], ev["accuracy"])
                        bar.set_postfix(acc=f"{float(np.mean(ev['accuracy'])):.3f}")

                    def step(states, r, table=table, train_keys=train_keys):
                        return step_fn(states, data, table, train_keys, r)

                    states = train(step, states, track, evaluate_group, bar)
                    params = jax.device_get(_flatten2(states.params))
                    for j, i in enumerate(points):
                        if params_out[i] is None:  # padding copies come after the original
                            results[i] = track.result(j)
                            params_out[i] = jax.tree.map(lambda x, j=j: x[j], params)
        else:
            group = 1
            device_hp: dict[tuple, dict[str, jax.Array]] = {}
            with loop_lib.Progress(rounds * self.num_points, enabled=progress) as bar:
                for i in range(self.num_points):
                    setting, seed = self.point(i)
                    root = jax.random.key(seed)
                    state = self.sim.init(jax.random.fold_in(root, 0))
                    train_key = jax.random.fold_in(root, 1)
                    track = _Tracker(1, private=self.unit is not None)
                    table = self._table[:, setting]

                    def evaluate_point(done, state, track=track):
                        ev = evaluate(self.model, state.params, self.x_test, self.y_test)
                        track.evaluated(done, np.array([ev["loss"]]), np.array([ev["accuracy"]]))
                        bar.set_postfix(acc=f"{ev['accuracy']:.3f}")

                    def step(state, r, table=table, train_key=train_key):
                        values = table[min(r, len(table) - 1)]
                        hp = device_hp.get(values.tobytes())
                        if hp is None:
                            hp = _device_hparams(dict(zip(self._names, values.tolist())))
                            device_hp[values.tobytes()] = hp
                        return self.sim.round_fn(state, data, hp, jax.random.fold_in(train_key, r))

                    state = train(step, state, track, evaluate_point, bar)
                    results[i] = track.result(0)
                    params_out[i] = jax.device_get(state.params)
        train_s = time.perf_counter() - start
        params = jax.tree.map(lambda *xs: np.stack(xs), *params_out)
        timing = {
            "vectorize": bool(vectorize),
            "points": self.num_points,
            "points_per_group": group,
            "group_shape": list(shape) if vectorize else [1, 1],  # [seeds, settings]
            "seeds_in_sequence": bool(vectorize and self.seeds_in_sequence),
            "chunk_size": int(
                self.vector_sim(group).config.chunk_size
                if vectorize
                else self.sim.config.chunk_size
            ),
            "rounds": rounds,
            "train_s": train_s,
            "first_round_s": first_round_s,
            "point_rounds_per_s": self.num_points * rounds / max(train_s, 1e-9),
            # Without the first call (compilation, unless compile() ran before).
            "point_rounds_per_s_after_first": (self.num_points * rounds - group)
            / max(train_s - first_round_s, 1e-9),
        }
        return results, params, timing


class _Tracker(loop_lib.Callback):
    """Per-round metrics of ``n`` points, fetched at evaluation points (one host sync).

    With ``private`` (a DP sweep) the training loss and the cohort overflow are neither
    fetched nor reported: they are functions of the training data that the accountant does
    not cover (see ``docs/privacy.md``, "What a run releases").
    """

    def __init__(self, n: int, *, private: bool):
        self.n = n
        self.private = private
        self.pending: list[dict[str, jax.Array]] = []
        self.overflow = np.zeros(n, np.int64)
        self.curve: list[list[dict[str, float]]] = [[] for _ in range(n)]

    def on_round_end(self, done: int, state: Any, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)

    def evaluated(self, rnd: int, loss: np.ndarray, accuracy: np.ndarray) -> None:
        last = None
        if not self.private:
            fetched = jax.device_get(self.pending)
            for m in fetched:
                self.overflow += np.reshape(m["cohort_overflow"], self.n).astype(np.int64)
            last = np.reshape(fetched[-1]["train_loss"], self.n)
        self.pending.clear()
        for j in range(self.n):
            point = {"round": rnd}
            if last is not None:
                point["train_loss"] = float(last[j])
            point.update(test_loss=float(loss[j]), test_accuracy=float(accuracy[j]))
            self.curve[j].append(point)

    def result(self, j: int) -> dict[str, Any]:
        final = self.curve[j][-1]
        out: dict[str, Any] = {}
        if not self.private:
            out["train_loss"] = final["train_loss"]
        out.update(test_loss=final["test_loss"], test_accuracy=final["test_accuracy"])
        if not self.private:
            out["cohort_overflow"] = int(self.overflow[j])
        out["curve"] = self.curve[j]
        return out


def _flatten2(tree):
    """Merges the two leading axes ``[seeds, settings, ...]`` of every leaf."""
    return jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), tree)


def _device_hparams(hp: dict[str, float]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}


def _describe(st: Setting) -> str:
    grid = "".join(f", {n}={v:g}" for n, v in st.grid)
    if st.baseline:
        return f"baseline (client_lr={st.client_lr:g}, server_lr={st.server_lr:g}{grid})"
    parts = []
    if st.noise_multiplier is not None:
        parts.append(f"noise_multiplier={st.noise_multiplier:g}")
    if st.clip_norm is not None:
        parts.append(f"clip_norm={st.clip_norm:g}")
    parts += [f"client_lr={st.client_lr:g}", f"server_lr={st.server_lr:g}"]
    return ", ".join(parts) + grid


# ----------------------------------------------------------------------------- summaries


def summarize(
    settings: Sequence[Setting],
    seeds: Sequence[int],
    points: Sequence[dict[str, Any]],
    epsilons: Sequence[dict[str, float]],
    *,
    unit: str | None,
    delta: float,
    rounds: int,
) -> list[dict[str, Any]]:
    """One row per setting: its hyper-parameters, epsilon and the final metrics over seeds.

    ``points[i]`` is point ``i`` = ``(settings[i // len(seeds)], seeds[i % len(seeds)])``.
    ``accuracy_std`` is the sample standard deviation over the seeds (``ddof=1``; 0 with one
    seed). ``epsilon`` is the unit's epsilon at ``delta`` (``inf`` for the baseline and for
    noise multiplier 0, ``None`` without DP); further labels (``user_simulated`` with the
    noise-cohort trick) get their own ``epsilon_<label>`` columns.
    """
    n = len(seeds)
    rows = []
    for s, st in enumerate(settings):
        mine = points[s * n : (s + 1) * n]
        acc = np.array([p["test_accuracy"] for p in mine], np.float64)
        loss = np.array([p["test_loss"] for p in mine], np.float64)
        eps = epsilons[s]
        row: dict[str, Any] = {
            "baseline": st.baseline,
            "unit": unit,
            "noise_multiplier": st.noise_multiplier,
            "clip_norm": BASELINE_CLIP_NORM if st.baseline else st.clip_norm,
            "client_lr": st.client_lr,
            "server_lr": st.server_lr,
            **dict(st.grid),
            "epsilon": eps.get(unit) if unit else None,
        }
        for label, value in eps.items():
            if label != unit:
                row[f"epsilon_{label}"] = value
        row.update(
            delta=delta if unit else None,
            rounds=rounds,
            n_seeds=n,
            accuracy_mean=float(np.mean(acc)),
            accuracy_std=_std(acc),
        )
        for seed, a in zip(seeds, acc):
            row[f"accuracy_seed{seed}"] = float(a)
        row.update(test_loss_mean=float(np.mean(loss)), test_loss_std=_std(loss))
        if all("train_loss" in p for p in mine):  # non-private sweeps only
            row["train_loss_mean"] = float(np.mean([p["train_loss"] for p in mine]))
        rows.append(row)
    return rows


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def _fmt(x, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def format_table(
    rows: Sequence[dict[str, Any]],
    *,
    delta: float | None,
    privacy: dict[str, Any] | None = None,
    grid: Sequence[str] = (),
) -> str:
    """A Markdown table of :func:`summarize` rows; with ``privacy`` (:func:`composition`) a
    footer gives the epsilon of releasing all points together; ``grid``: the names of the
    ``sweep.grid`` axes (a column each)."""
    dp = any(r["unit"] for r in rows)
    head = ["setting", "noise multiplier", "clip norm", "client lr", "server lr", *grid]
    if dp:
        head.append(f"epsilon (delta={delta:g})")
    head += ["accuracy mean ± std", "test loss", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            "baseline (no DP)" if r["baseline"] else "",
            _fmt(r["noise_multiplier"]),
            "none" if r["baseline"] else _fmt(r["clip_norm"]),
            _fmt(r["client_lr"]),
            _fmt(r["server_lr"]),
            *(_fmt(r[name]) for name in grid),
        ]
        if dp:
            cells.append(_fmt(r["epsilon"], ".3f"))
        cells += [
            f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}",
            f"{r['test_loss_mean']:.4f}",
            str(r["n_seeds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if privacy is not None:
        lines += ["", composition_footer(privacy)]
    return "\n".join(lines)


#: What a DP sweep writes next to its epsilons (``sweep.json``'s ``privacy.released``).
RELEASED = (
    "each point's model after every evaluation and its test loss and accuracy on held-out "
    "data, the hyper-parameters and epsilons; not written: training losses, cohort sizes and "
    "overflow counts (functions of the training data that the accountant does not cover)"
)


def composition(sweep: Sweep) -> dict[str, Any] | None:
    """What the sweep's epsilons cover, and the epsilon of releasing all its points together.

    Every point trains on the same data, so publishing the whole grid composes the points'
    guarantees: ``epsilon_all_points`` is :meth:`Sweep.composed_epsilons` (``inf`` as soon as
    one point is non-private, e.g. the baseline), ``epsilon_without_baseline`` the same
    without the baseline points (when there are any). Each row's ``epsilon`` is one point
    alone. ``None`` without DP.
    """
    if sweep.unit is None:
        return None
    p, unit = sweep.cfg.privacy, sweep.unit
    n_base = sum(st.baseline for st in sweep.settings) * len(sweep.seeds)
    out: dict[str, Any] = {
        "unit": unit,
        "neighboring_relation": sweep.neighboring_relation(),
        "delta": p.delta,
        "accountant": p.accountant,
        "conversion": p.conversion,
        "points": sweep.num_points,
    }
    for label, eps in sweep.composed_epsilons().items():
        out["epsilon_all_points" + ("" if label == unit else f"_{label}")] = eps
    if n_base:
        out["points_without_baseline"] = sweep.num_points - n_base
        for label, eps in sweep.composed_epsilons(baseline=False).items():
            out["epsilon_without_baseline" + ("" if label == unit else f"_{label}")] = eps
    out["released"] = RELEASED
    return out


def composition_footer(privacy: dict[str, Any]) -> str:
    """One paragraph: the epsilon of releasing all points together (:func:`composition`)."""
    eps = privacy["epsilon_all_points"]
    text = (
        f"Releasing all {privacy['points']} points together (same data; delta="
        f"{privacy['delta']:g}, {privacy['accountant']}, {privacy['neighboring_relation']}): "
        f"epsilon = {_fmt(eps, '.3f')}"
    )
    if "epsilon_without_baseline" in privacy:
        if math.isinf(eps):
            text += " (the non-private baseline is among them)"
        text += (
            f"; the {privacy['points_without_baseline']} points without the baseline: "
            f"epsilon = {_fmt(privacy['epsilon_without_baseline'], '.3f')}"
        )
    return text + ". Each row's epsilon is one point alone."


def write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in columns})


# ----------------------------------------------------------------------------- the plot


def plot(
    rows: Sequence[dict[str, Any]],
    path: str | pathlib.Path,
    *,
    title: str,
    epsilon_label: str,
    grid: Sequence[str] = (),
) -> None:
    """Final test accuracy against epsilon (log scale), mean ± std over seeds.

    One line per (clip norm, learning rates) combination; the non-private baseline is a
    dashed horizontal line with its ± std band; points with epsilon = inf (noise multiplier
    0 with clipping) cannot sit on a log axis and are drawn at the right edge, marked
    "ε = ∞". Without DP (no finite epsilon) the settings are plotted side by side instead.
    ``grid``: the names of the ``sweep.grid`` axes (each combination is a line too).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 12})
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    curves = [r for r in rows if not r["baseline"]]
    baselines = [r for r in rows if r["baseline"]]
    n_seeds = max((r["n_seeds"] for r in rows), default=1)
    finite = [r for r in curves if r["epsilon"] is not None and math.isfinite(r["epsilon"])]
    ylabel = f"final test accuracy\n(mean ± std over {n_seeds} seed{'s' * (n_seeds > 1)})"
    if not finite:
        labels = [_describe_row(r, grid) for r in rows]
        ax.errorbar(
            range(len(rows)),
            [r["accuracy_mean"] for r in rows],
            yerr=[r["accuracy_std"] for r in rows],
            fmt="o",
            capsize=4,
        )
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=10)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        plt.close(fig)
        return

    names = ("clip norm", "client lr", "server lr", *grid)

    def key(r):
        return (r["clip_norm"], r["client_lr"], r["server_lr"], *(r[n] for n in grid))

    combos = sorted(
        {key(r) for r in curves}, key=lambda k: tuple(-1 if v is None else v for v in k)
    )
    varying = [name for j, name in enumerate(names) if len({k[j] for k in combos}) > 1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    inf_points = []
    for c, combo in enumerate(combos):
        mine = sorted((r for r in finite if key(r) == combo), key=lambda r: r["epsilon"])
        color = colors[c % len(colors)]
        label = ", ".join(
            f"{name} {combo[j]:g}" for j, name in enumerate(names) if name in varying
        ) or "DP" + (f" (clip norm {combo[0]:g})" if combo[0] is not None else "")
        if mine:
            ax.errorbar(
                [r["epsilon"] for r in mine],
                [r["accuracy_mean"] for r in mine],
                yerr=[r["accuracy_std"] for r in mine],
                fmt="o-",
                color=color,
                capsize=4,
                markersize=6,
                linewidth=1.8,
                label=label,
            )
            if len(combos) == 1:
                for r in mine:
                    ax.annotate(
                        f"σ={r['noise_multiplier']:.3g}",
                        (r["epsilon"], r["accuracy_mean"]),
                        textcoords="offset points",
                        xytext=(7, -14),
                        ha="left",
                        fontsize=9,
                        color="0.3",
                    )
        inf_points += [(r, color) for r in curves if key(r) == combo and r not in finite]
    # Baselines: one per learning-rate pair, dashed, with their +- std band.
    for b in baselines:
        lrs = (
            f" (client lr {b['client_lr']:g}, server lr {b['server_lr']:g}"
            + "".join(f", {n} {b[n]:g}" for n in grid)
            + ")"
            if len(baselines) > 1
            else ""
        )
        ax.axhline(
            b["accuracy_mean"],
            linestyle="--",
            color="0.25",
            linewidth=1.5,
            label=f"non-private baseline{lrs}: {b['accuracy_mean']:.3f} ± {b['accuracy_std']:.3f}",
        )
        ax.axhspan(
            b["accuracy_mean"] - b["accuracy_std"],
            b["accuracy_mean"] + b["accuracy_std"],
            color="0.5",
            alpha=0.15,
            linewidth=0,
        )
    ax.set_xscale("log")
    lo = min(r["epsilon"] for r in finite)
    hi = max(r["epsilon"] for r in finite)
    ax.set_xlim(lo / 1.6, hi * (4.0 if inf_points else 1.6))
    if inf_points:
        # epsilon = inf has no place on a log axis: a separate column right of a divider.
        x_inf = hi * 2.5
        ax.axvline(hi * 1.6, color="0.6", linestyle=":", linewidth=1.2)
        ax.text(
            x_inf,
            0.98,
            "σ = 0\n(ε = ∞)",
            transform=ax.get_xaxis_transform(),  # x in data, y in axes fraction
            ha="center",
            va="top",
            fontsize=10,
            color="0.3",
        )
        for k, (r, color) in enumerate(inf_points):
            ax.errorbar(
                [x_inf * 1.06 ** (k - (len(inf_points) - 1) / 2)],
                [r["accuracy_mean"]],
                yerr=[r["accuracy_std"]],
                fmt="D",
                color=color,
                capsize=4,
                markersize=6,
            )
        y_lo, y_hi = ax.get_ylim()  # headroom for the column's label
        ax.set_ylim(y_lo, y_hi + 0.1 * (y_hi - y_lo))
    ax.set_xlabel(epsilon_label)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="best", fontsize=10, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _describe_row(r: dict[str, Any], grid: Sequence[str] = ()) -> str:
    parts = [f"{n} {r[n]:g}" for n in grid]
    if r["baseline"]:
        return ", ".join(["baseline", *parts])
    parts = [f"client lr {r['client_lr']:g}", f"server lr {r['server_lr']:g}", *parts]
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the command


def run_sweep(cfg, *, write: bool = True, log: Callable[[str], Any] = print) -> SweepResult:
    """``fedjax-dp sweep``: trains the grid of ``cfg.sweep`` and writes its table and plot.

    Builds the simulation once and trains every point ``(setting, seed)`` for
    ``run.rounds`` rounds, all points of a group in one vmapped round (see the module
    docstring). Writes to ``cfg.sweep.output`` (default ``<run.output_dir>/sweep``):
    ``sweep.csv`` and ``sweep.json`` (one row per setting: hyper-parameters, epsilon at
    ``privacy.delta``, rounds, accuracy mean/std and per seed, test loss; ``sweep.json``
    also the ``privacy`` block of :func:`composition`: the neighbouring relation and the
    epsilon of releasing all points together), ``points.jsonl`` (one line per point, with its
    evaluation curve) and ``accuracy_vs_epsilon.png``; prints the table (its footer: that
    composed epsilon).

    Raises:
      ValueError: an option that cannot be swept or is inconsistent; the message names it
        and the fix.
    """
    from fedjax_dp.runner import experiment

    sweep = Sweep(cfg, log=log)
    train, sim, p = sweep.train_data, sweep.sim, cfg.privacy
    if sweep.unit is not None:
        experiment.warn_delta(p.delta, train.num_clients)
    vectorize = cfg.sweep.vectorize
    shape = sweep.group_shape()
    group = shape[0] * shape[1]
    n_groups = len(sweep._groups(shape))
    n_base = sum(st.baseline for st in sweep.settings)
    chunk = (sweep.vector_sim(group) if vectorize else sim).config.chunk_size
    log(
        f"sweep: {sim.config.name} on {train.num_clients} clients ({sim.sampler.sampling} cohort "
        f"~{sim.sampler.expected_cohort_size:g}), {cfg.run.rounds} rounds: "
        f"{len(sweep.settings) - n_base} settings"
        + (f" + {n_base} baseline" if n_base else "")
        + f" x {len(sweep.seeds)} seeds = {sweep.num_points} points, "
        + (
            f"vectorised in {n_groups} group{'s' * (n_groups > 1)} of {shape[0]} seeds x "
            f"{shape[1]} settings (chunk {chunk} clients per point"
            + ("; seeds in sequence)" if sweep.seeds_in_sequence and shape[0] > 1 else ")")
            if vectorize
            else f"one after another (chunk {chunk})"
        )
    )
    results, params, timing = sweep.train()
    epsilons = sweep.epsilons()
    if sweep.unit is None:  # a DP sweep does not release the overflow (it stays internal)
        experiment.warn_overflow(
            sum(r["cohort_overflow"] for r in results),
            "the sweep's runs",
            "cohort_overflow in points.jsonl",
        )
    privacy = composition(sweep)
    points = []
    for i, res in enumerate(results):
        s, seed = sweep.point(i)
        st = sweep.settings[s]
        points.append(
            {
                **dataclasses.asdict(st),
                "seed": seed,
                # What the round is called with in round 0 (e.g. the noise-cohort trick's).
                "hparams": dict(zip(sweep._names, sweep._table[0, s].tolist())),
                **{f"epsilon_{k}": v for k, v in epsilons[s].items()},
                **res,
            }
        )
    rows = summarize(
        sweep.settings,
        sweep.seeds,
        points,
        epsilons,
        unit=sweep.unit,
        delta=p.delta,
        rounds=cfg.run.rounds,
    )
    table = format_table(rows, delta=p.delta, privacy=privacy, grid=sweep.grid_names)
    out_dir = None
    if write:
        out_dir = pathlib.Path(cfg.sweep.output or pathlib.Path(cfg.run.output_dir) / "sweep")
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(out_dir / "sweep.csv", rows)
        doc = {
            "config": experiment.to_dict(cfg),
            "baseline": (
                f"the same algorithm with {sweep._noise_key} = 0 and every clip norm = "
                f"{BASELINE_CLIP_NORM:g} (clipping and noise are exact no-ops)"
                if n_base
                else None
            ),
            "seeds": sweep.seeds,
            "partition_seed": experiment.data_seed(cfg),
            "timing": timing,
            "privacy": privacy,
            "rows": rows,
        }
        (out_dir / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
        with open(out_dir / "points.jsonl", "w") as f:
            f.writelines(json.dumps(pt) + "\n" for pt in points)
        data_name = cfg.data.name if cfg.data.source == "tfds" else cfg.data.source
        title = (
            f"{data_name}: {sim.config.name}, {cfg.run.rounds} rounds, {train.num_clients} clients"
        )
        eps_label = (
            f"ε at δ = {p.delta:g} ({sweep.unit}-level, {p.accountant.upper()}), log scale"
            if sweep.unit
            else "epsilon"
        )
        plot(
            rows,
            out_dir / "accuracy_vs_epsilon.png",
            title=title,
            epsilon_label=eps_label,
            grid=sweep.grid_names,
        )
    log("")
    log(table)
    log(
        f"\ntrained {sweep.num_points} points x {cfg.run.rounds} rounds "
        f"({'vectorised' if vectorize else 'one after another'}) in {timing['train_s']:.1f} s: "
        f"{timing['first_round_s']:.1f} s for the first round (compilation included), then "
        f"{timing['point_rounds_per_s_after_first']:.0f} point-rounds/s"
    )
    if out_dir is not None:
        log(f"wrote {out_dir}/sweep.csv, sweep.json, points.jsonl, accuracy_vs_epsilon.png")
    return SweepResult(rows, points, params, timing, out_dir, privacy)
