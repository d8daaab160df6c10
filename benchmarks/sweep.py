"""Sweep benchmark: a privacy-utility grid as ONE vmapped simulation vs its runs one by one.

Workload (default): ``experiments/digits_sweep.toml``, the digits demo (user-level DP-FedAvg,
300 clients, Poisson q = 0.1 padded to 73 cohort slots, MLP 64-32-10, 2 local epochs of batch
8, 200 rounds, evaluation every 20 rounds) for 8 noise multipliers (0.3 .. 3) x 3 seeds = 24
points, without the non-private baseline (``sweep.baseline = false``).

Modes, side by side in one process, on the same :class:`fedjax_dp.sweep.Sweep` (same data,
grid, hyper-parameters and keys):

- ``vectorized``: all points in one jitted call per round (``Sweep.train(vectorize=True)``):
  ``vmap`` over settings of ``sim.round_fn`` for each seed, the seeds vmapped too or (on CPU,
  the default; ``--seeds``) one after another within the call (``lax.map``), the data shared
  by all points and each seed's keys by its settings; the evaluation vmapped too.
- ``sequential``: the same points one after another with the engine's compiled round
  (``Sweep.train(vectorize=False)``), exactly as ``fedjax-dp run`` drives it: one
  ``sim.round_fn`` call per round, compiled once and reused by all runs, evaluation every
  ``eval_every`` rounds, one host sync per evaluation.

With ``--cli``, also end to end as a user runs it: the ``fedjax-dp sweep`` command against
one ``fedjax-dp run`` process per point (each starting Python and JAX, loading the data and
compiling), final accuracies compared.

Each mode is compiled first (``Sweep.compile``, timed and reported apart), then trained
``--repeats`` times, the modes alternating; the table reports the median training time, the
point-rounds per second and the speed-up (sequential / vectorized). Chunk sizes: the engine's
automatic choice (the sequential mode's is the one ``fedjax-dp run`` uses; the vectorised
mode splits the memory budget over the points), or ``--seq-chunk-size`` /
``--vec-chunk-size``. The final accuracies and parameters of the two modes are compared.

Usage::

    python -m benchmarks.sweep                       # the default above, 200 rounds
    python -m benchmarks.sweep --rounds 50 --repeats 1
    python -m benchmarks.sweep --set algorithm.sampling=fixed --set algorithm.cohort_size=10
    python -m benchmarks.sweep --quick               # smoke test: tiny grid, 3 rounds
    python -m benchmarks.sweep --breakdown           # + round vs its client updates alone
    python -m benchmarks.sweep --cli                 # + fedjax-dp sweep vs one fedjax-dp run per point

Writes a markdown table (stdout) and a JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CONFIG = Path("experiments") / "digits_sweep.toml"
DEFAULT_OUT = Path("benchmarks") / "results" / "sweep.json"
QUICK_OUT = Path("benchmarks") / "results" / "sweep_quick.json"
QUICK = {
    "run.rounds": 3,
    "run.eval_every": 2,
    "data.num_clients": 40,
    "algorithm.sampling_rate": 0.2,
    "sweep.noise_multipliers": [0.5, 2.0],
    "sweep.seeds": [0, 1],
}


def _parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected section.option=value")
        out[key.strip()] = value.strip()
    return out


def _make_sweep(config: Path, overrides: dict, chunk: int, seeds_in_sequence=None):
    from fedjax_dp import experiment
    from fedjax_dp import sweep as sweep_lib

    cfg = experiment.load_config(
        config, {**overrides, "algorithm.chunk_size": chunk, "run.progress": False}
    )
    return sweep_lib.Sweep(cfg, log=lambda *_: None, seeds_in_sequence=seeds_in_sequence)


def run(args) -> dict:
    import jax

    overrides = {"sweep.baseline": False}
    if args.quick:
        overrides.update(QUICK)
    if args.rounds:
        overrides["run.rounds"] = args.rounds
    overrides.update(_parse_set(args.set))
    seq = _make_sweep(args.config, overrides, args.seq_chunk_size)
    seeds_in_sequence = {"auto": None, "sequence": True, "vmap": False}[args.seeds]
    vec = (
        seq
        if args.vec_chunk_size == args.seq_chunk_size and seeds_in_sequence is None
        else _make_sweep(args.config, overrides, args.vec_chunk_size, seeds_in_sequence)
    )
    cfg = seq.cfg
    compile_s = {
        "vectorized": vec.compile(vectorize=True),
        "sequential": seq.compile(vectorize=False),
    }
    times: dict[str, list[float]] = {"vectorized": [], "sequential": []}
    results, timing = {}, {}
    load = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        order = ("vectorized", "sequential") if rep % 2 == 0 else ("sequential", "vectorized")
        for mode in order:
            s = vec if mode == "vectorized" else seq
            res, params, t = s.train(vectorize=mode == "vectorized", progress=False)
            times[mode].append(t["train_s"])
            results[mode], timing[mode] = (res, params), t
            print(f"  {mode}: {t['train_s']:.2f} s", file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])
    (res_v, par_v), (res_s, par_s) = results["vectorized"], results["sequential"]
    acc_v = np.array([r["test_accuracy"] for r in res_v])
    acc_s = np.array([r["test_accuracy"] for r in res_s])
    param_diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(par_v), jax.tree.leaves(par_s), strict=True)
    )
    points, rounds = seq.num_points, cfg.run.rounds
    rows = []
    for mode in ("vectorized", "sequential"):
        med = statistics.median(times[mode])
        rows.append(
            {
                "mode": mode,
                "points": points,
                "rounds": rounds,
                "points_per_call": timing[mode]["points_per_group"],
                "chunk_size": timing[mode]["chunk_size"],
                "seeds_in_sequence": timing[mode]["seeds_in_sequence"],
                "compile_s": compile_s[mode],
                "train_s_median": med,
                "train_s_all": times[mode],
                "point_rounds_per_s": points * rounds / med,
                "total_s": med + compile_s[mode],
            }
        )
    speedup = rows[1]["train_s_median"] / rows[0]["train_s_median"]
    from benchmarks import r1

    return {
        "benchmark": "sweep",
        "command": "python -m benchmarks.sweep " + " ".join(args.argv),
        "config": str(args.config),
        "overrides": {k: v for k, v in overrides.items()},
        "grid": {
            "noise_multipliers": [st.noise_multiplier for st in seq.settings],
            "seeds": seq.seeds,
            "points": points,
            "rounds": rounds,
            "eval_every": cfg.run.eval_every,
        },
        "rows": rows,
        "speedup_train": speedup,
        "speedup_with_compile": rows[1]["total_s"] / rows[0]["total_s"],
        "final_accuracy": {"vectorized": acc_v.tolist(), "sequential": acc_s.tolist()},
        "max_abs_accuracy_diff": float(np.max(np.abs(acc_v - acc_s))),
        "mean_accuracy": {"vectorized": float(acc_v.mean()), "sequential": float(acc_s.mean())},
        "max_abs_param_diff": param_diff,
        "machine": {**r1.machine(), "device": str(jax.devices()[0])},
        "loadavg_1min": load,
    }


def cli_comparison(config: Path, overrides: dict) -> dict:
    """End to end, as a user runs it: ``fedjax-dp sweep`` against one ``fedjax-dp run`` per
    point, each a fresh process (start-up, data, compilation, training, evaluation, files).

    The runs get ``--run.seed``, the sweep's data seed, the point's noise multiplier and no
    checkpoints (the sweep writes none); their final accuracies are compared with the
    sweep's points. Grids of noise multipliers x seeds only.
    """
    import subprocess
    import tempfile

    from fedjax_dp import experiment

    sets = [f"--{k}={_cli_value(v)}" for k, v in overrides.items()]
    cfg = experiment.load_config(config, overrides)
    other_axes = [a for a in ("clip_norms", "client_lrs", "server_lrs") if getattr(cfg.sweep, a)]
    if other_axes or cfg.sweep.baseline:
        extra = ", ".join(f"sweep.{a}" for a in other_axes) or "sweep.baseline"
        raise SystemExit(f"--cli compares noise x seed grids only; this one also has {extra}")
    sets.append(f"--data.partition_seed={experiment.data_seed(cfg)}")
    cmd = [sys.executable, "-m", "fedjax_dp"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [*cmd, "sweep", str(config), *sets, "--run.progress=false", f"--sweep.output={tmp}"],
            check=True,
            capture_output=True,
        )
        sweep_s = time.perf_counter() - start
        lines = (Path(tmp) / "points.jsonl").read_text().splitlines()
        sweep_acc = {
            (p["noise_multiplier"], p["seed"]): p["test_accuracy"] for p in map(json.loads, lines)
        }
        runs_s, diffs = [], []
        for (noise, seed), acc in sweep_acc.items():
            out = Path(tmp) / f"run_{noise}_{seed}"
            start = time.perf_counter()
            subprocess.run(
                [
                    *cmd,
                    "run",
                    str(config),
                    *sets,
                    f"--run.seed={seed}",
                    f"--algorithm.noise_multiplier={noise}",
                    f"--run.output_dir={out}",
                    "--run.progress=false",
                    "--run.checkpoint_every=0",
                ],
                check=True,
                capture_output=True,
            )
            runs_s.append(time.perf_counter() - start)
            summary = json.loads((out / "summary.json").read_text())
            diffs.append(abs(summary["test_accuracy"] - acc))
            print(f"  run {len(runs_s)}/{len(sweep_acc)}: {runs_s[-1]:.1f} s", file=sys.stderr)
    return {
        "points": len(sweep_acc),
        "rounds": cfg.run.rounds,
        "sweep_command_s": sweep_s,
        "run_commands_s": sum(runs_s),
        "run_command_s_each": runs_s,
        "speedup": sum(runs_s) / sweep_s,
        "max_abs_accuracy_diff": max(diffs),
    }


def _cli_value(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def breakdown(sweep, reps: int = 200) -> dict:
    """Where a sequential round's time goes: the whole round vs its client updates alone.

    Times ``sim.round_fn`` (one point) and ``jit(vmap(sim.client.update))`` over as many slots
    as the round computes on average (its chunks up to the last real client: the real clients
    and the padding that shares their chunks) from the same parameters; then the
    same client updates for every point of the sweep in one call, the points' parameters
    stacked and the cohort's batches shared (as the settings of one seed share them in the
    vectorised sweep, which also chunks them). Vectorising over points saves the rest of the
    round and of the host loop, and whatever the batched client updates save per client.
    """
    import jax
    import jax.numpy as jnp

    sim, data = sweep.sim, sweep.train_data.to_device()
    chunk = sim.config.chunk_size
    active = []
    for r in range(reps):
        mask = np.asarray(sim.round.sample(jax.random.key(r)).mask)
        last = int(np.max(np.nonzero(mask)[0], initial=-1))
        active.append((last + chunk) // chunk * chunk)
    cohort = max(1, round(float(np.mean(active))))
    params = sim.model.init(jax.random.key(0))
    hp = sim.make_hparams()
    ids = jnp.arange(cohort) % sweep.train_data.num_clients
    keys = jax.random.split(jax.random.key(1), cohort)
    update = jax.jit(jax.vmap(sim.client.simple, in_axes=(None, None, 0, 0, None)))
    points = sweep.num_points
    many = jax.jit(
        jax.vmap(
            jax.vmap(sim.client.simple, in_axes=(None, None, 0, 0, None)),
            in_axes=(0, None, None, None, None),
        )
    )
    stacked = jax.tree.map(lambda x: jnp.stack([x] * points), params)

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / reps

    state = sim.init(jax.random.key(0))

    def round_only(state, r):
        return sim.round_fn(state, data, hp, jax.random.key(r))[0]

    state = jax.block_until_ready(round_only(state, 0))
    start = time.perf_counter()
    for r in range(reps):
        state = round_only(state, r)
    jax.block_until_ready(state)
    round_s = (time.perf_counter() - start) / reps
    update_s = timed(update, params, data, ids, keys, hp)
    vectorized_update_s = timed(many, stacked, data, ids, keys, hp) / points
    return {
        "cohort_slots": sim.sampler.cohort_size,
        "computed_slots": cohort,
        "chunk_size": chunk,
        "expected_cohort": float(sim.sampler.expected_cohort_size),
        "round_s": round_s,
        "client_updates_s": update_s,
        "client_updates_share": update_s / round_s,
        "vectorized_client_updates_s_per_point": vectorized_update_s,
    }


def table(result: dict) -> str:
    head = (
        "| mode | points | rounds | points per call | chunk | compile s | train s (median) "
        "| point-rounds/s | speed-up |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    base = result["rows"][1]["train_s_median"]
    for r in result["rows"]:
        out.append(
            f"| {r['mode']}{' (seeds in sequence)' * r['seeds_in_sequence']} "
            f"| {r['points']} | {r['rounds']} | {r['points_per_call']} "
            f"| {r['chunk_size']} | {r['compile_s']:.1f} | {r['train_s_median']:.2f} "
            f"| {r['point_rounds_per_s']:.0f} | {base / r['train_s_median']:.2f}x |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="sweep config file")
    p.add_argument("--rounds", type=int, default=0, help="rounds (0: the config's)")
    p.add_argument("--repeats", type=int, default=3, help="trainings per mode (median)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.OPTION=VALUE",
        help="config override, e.g. --set algorithm.cohort_size=10 (repeatable)",
    )
    p.add_argument(
        "--seq-chunk-size", type=int, default=0, help="sequential chunk size (0: the engine's)"
    )
    p.add_argument(
        "--vec-chunk-size",
        type=int,
        default=0,
        help="vectorised chunk size per point (0: the engine's budget split over the points)",
    )
    p.add_argument(
        "--seeds",
        choices=("auto", "sequence", "vmap"),
        default="auto",
        help="vectorised mode: seeds one after another in each call (lax.map) or vmapped "
        "(auto: in sequence on CPU, as fedjax-dp sweep does)",
    )
    p.add_argument(
        "--cli",
        action="store_true",
        help="also time fedjax-dp sweep against one fedjax-dp run process per point",
    )
    p.add_argument("--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 x 2 points, 3 rounds")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time a sequential round against its client updates alone",
    )
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.repeats = min(args.repeats, 1)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    start = time.perf_counter()
    result = run(args)
    if args.breakdown:
        result["breakdown"] = breakdown(_make_sweep(args.config, result["overrides"], 0))
    if args.cli:
        result["cli"] = cli_comparison(args.config, result["overrides"])
    result["wall_s"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(
        f"\nspeed-up (training, compile excluded): {result['speedup_train']:.2f}x; "
        f"with compile: {result['speedup_with_compile']:.2f}x"
    )
    print(
        f"final accuracy, mean over points: vectorized {result['mean_accuracy']['vectorized']:.4f}"
        f", sequential {result['mean_accuracy']['sequential']:.4f}; max |difference| per point "
        f"{result['max_abs_accuracy_diff']:.2g}; max |parameter difference| "
        f"{result['max_abs_param_diff']:.2g}"
    )
    if args.breakdown:
        b = result["breakdown"]
        print(
            f"breakdown: sequential round {1e3 * b['round_s']:.2f} ms, of which its client "
            f"updates (~{b['expected_cohort']:g} real clients; chunks of {b['chunk_size']} up "
            f"to the last one: ~{b['computed_slots']} of {b['cohort_slots']} slots) "
            f"{1e3 * b['client_updates_s']:.2f} ms ({b['client_updates_share']:.0%}); the same "
            f"updates for all {result['grid']['points']} points: "
            f"{1e3 * b['vectorized_client_updates_s_per_point']:.2f} ms per point (one call, "
            "unchunked, the cohort's batches shared)"
        )
    if args.cli:
        c = result["cli"]
        print(
            f"end to end: fedjax-dp sweep {c['sweep_command_s']:.1f} s vs {c['points']} "
            f"fedjax-dp run processes {c['run_commands_s']:.1f} s = {c['speedup']:.1f}x; max "
            f"|accuracy difference| {c['max_abs_accuracy_diff']:.2g}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
