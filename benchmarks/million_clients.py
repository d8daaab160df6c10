"""A population larger than the device needs: 1,000,000 clients on the host, one cohort on device.

Workload (defaults):

- Data: synthetic Gaussian classification built directly in numpy, ``--features 16`` float32
  features, ``--classes 10`` classes, each client holding a uniform ``8..16`` examples
  (about 12 per client: 12M examples, ~730 MiB for 1M clients). Each class has a random mean;
  an example is its class mean plus standard normal noise. Labels are stored as uint8.
- Model: multinomial logistic regression (``--model mlp --hidden 32`` for a small MLP).
- Algorithm: ``dp_fedavg`` (clip 1.0, noise multiplier 1.0), Poisson sampling with rate
  ``cohort / clients`` (the cohort is padded to mean + 8 sd), 1 local epoch, batch 8, client
  lr 0.1. ``--sampling fixed`` draws exactly ``--cohort`` clients instead (note: the fixed-size
  sampler permutes the whole population on device each round, which is slow at 1M clients).
- Rounds: ``fedjax_dp.population.CohortPrefetcher``: a background thread samples round r+1's
  cohort with the round's own jitted sampler, gathers it on the host and moves it to the device
  while round r runs; the round runs on the gathered cohort
  (``round_fn(state, cohort_data, hparams, key, cohort)``).

Measured (after a warm-up round on another key that compiles the sampler and the round):
rounds/s and client updates/s (real, unmasked clients) from starting the prefetcher to the
end of the last round, host time to prepare a cohort, time the round loop waited for one,
peak RSS, current RSS after round 5, half-way and after the last round (their differences
show memory is bounded; the allocator still settles over the first ~15 rounds), the device's bytes in use when the backend reports it, and the bytes of live
JAX arrays (everything on the device; it stays cohort-sized).

Usage::

    python -m benchmarks.million_clients --clients 1000000 --rounds 20 --cohort 1000 \\
        --out benchmarks/results/million_clients.json
    python -m benchmarks.million_clients --clients 20000 --rounds 6 --cohort 100 --check-rounds 3
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "results" / "million_clients.json"
_GEN_CHUNK = 1 << 20  # examples generated at a time (bounds temporaries)


def make_population(clients, min_examples, max_examples, features, classes, seed):
    """The synthetic host population, built chunk by chunk with no float64 temporaries."""
    from fedjax_dp import population as pop_lib

    rng = np.random.default_rng(seed)
    counts = rng.integers(min_examples, max_examples + 1, size=clients, dtype=np.int32)
    n = int(counts.sum(dtype=np.int64))
    means = rng.standard_normal((classes, features), dtype=np.float32)
    y = rng.integers(0, classes, size=n, dtype=np.uint8 if classes <= 256 else np.int32)
    x = np.empty((n, features), np.float32)
    for start in range(0, n, _GEN_CHUNK):
        stop = min(start + _GEN_CHUNK, n)
        rng.standard_normal(out=x[start:stop], dtype=np.float32)
        x[start:stop] += means[y[start:stop]]
    return pop_lib.HostPopulation(x, y, counts, num_classes=classes)


def _rss_mib() -> float:
    """Current resident set size (VmRSS) in MiB, or nan where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _device_bytes_in_use():
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_in_use")


def _live_array_bytes() -> int:
    import jax

    return int(sum(a.nbytes for a in jax.live_arrays()))


def _config(args):
    import fedjax_dp

    kw = dict(
        name=args.algorithm,
        sampling=args.sampling,
        local_epochs=1,
        batch_size=args.batch_size,
        client_lr=0.1,
        server_lr=1.0,
        chunk_size=args.chunk_size,
    )
    if args.sampling == "poisson":
        kw.update(sampling_rate=args.cohort / args.clients, cohort_size=None)
    else:
        kw.update(cohort_size=args.cohort)
    if args.algorithm == "dp_fedavg":
        kw.update(clip_norm=1.0, noise_multiplier=1.0)
    return fedjax_dp.AlgorithmConfig(**kw)


def _build(args, population):
    import fedjax_dp

    model_kw = {"hidden": tuple(args.hidden)} if args.model == "mlp" else {}
    model = fedjax_dp.get_model(
        args.model, population.feature_shape, population.num_classes, **model_kw
    )
    return fedjax_dp.build_simulation(_config(args), model, population)


def run(args) -> dict:
    import jax

    import fedjax_dp

    t0 = time.perf_counter()
    population = make_population(
        args.clients, args.min_examples, args.max_examples, args.features, args.classes, args.seed
    )
    gen_s = time.perf_counter() - t0
    rss_data = _rss_mib()
    sim = _build(args, population)
    hp = sim.make_hparams()
    state = sim.init(jax.random.key(0))
    root = jax.random.key(args.seed + 1)
    keys = [jax.random.fold_in(root, r) for r in range(args.rounds)]

    # Warm-up (not timed): compile the sampler and the round on a cohort of another key.
    t0 = time.perf_counter()
    warm_key = jax.random.fold_in(root, args.rounds + 1)
    warm = sim.round.sample(warm_key)
    warm_data = jax.device_put(population.gather(np.asarray(warm.ids), np.asarray(warm.mask)))
    warm_state, _ = sim.round_fn(sim.init(jax.random.key(0)), warm_data, hp, warm_key, warm)
    jax.block_until_ready(warm_state)
    compile_s = time.perf_counter() - t0
    del warm, warm_data, warm_state

    rounds = []
    live_max = 0
    t_loop = time.perf_counter()
    with fedjax_dp.population.prefetch_cohorts(sim, population, keys, depth=args.depth) as cohorts:
        while True:
            t_wait = time.perf_counter()
            try:
                c = next(cohorts)
            except StopIteration:
                break
            t_round = time.perf_counter()
            state, metrics = sim.round_fn(state, c.data, hp, c.key, c.cohort)
            metrics = jax.device_get(metrics)  # waits for the round
            t_end = time.perf_counter()
            live = _live_array_bytes()
            live_max = max(live_max, live)
            rounds.append(
                {
                    "round": c.index + 1,
                    "wait_s": t_round - t_wait,
                    "round_s": t_end - t_round,
                    "prepare_s": c.prepare_s,
                    "end_s": t_end - t_loop,
                    "clients": int(metrics["num_clients"]),
                    "overflow": int(metrics["cohort_overflow"]),
                    "train_loss": float(metrics["train_loss"]),
                    "rss_mib": _rss_mib(),
                    "live_array_bytes": live,
                }
            )
            print(
                f"round {c.index + 1}: {rounds[-1]['clients']} clients, loss "
                f"{rounds[-1]['train_loss']:.4f}, round {rounds[-1]['round_s']:.3f} s, waited "
                f"{rounds[-1]['wait_s']:.3f} s, RSS {rounds[-1]['rss_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    total_s = rounds[-1]["end_s"]  # from starting the prefetcher to the end of the last round
    ref = rounds[min(5, len(rounds)) - 1]  # after round 5 (or the last, if fewer)
    mid = rounds[(len(rounds) - 1) // 2]
    result = {
        "benchmark": "million_clients",
        "command": "python -m benchmarks.million_clients " + " ".join(args.argv),
        "workload": {
            "clients": args.clients,
            "examples": population.num_examples,
            "examples_per_client": [args.min_examples, args.max_examples],
            "features": args.features,
            "classes": args.classes,
            "model": args.model if args.model != "mlp" else f"mlp{tuple(args.hidden)}",
            "config": repr(sim.config),
            "cohort_slots": sim.sampler.cohort_size,
            "expected_cohort": sim.sampler.expected_cohort_size,
            "prefetch_depth": args.depth,
            "rounds": args.rounds,
        },
        "host_data_mib": population.nbytes / 2**20,
        "cohort_data_mib": population.cohort_nbytes(sim.sampler.cohort_size) / 2**20,
        "generate_s": gen_s,
        "compile_s": compile_s,
        "total_s": total_s,
        "rounds_per_s": len(rounds) / total_s,
        "client_updates_per_s": sum(r["clients"] for r in rounds) / total_s,
        "median_round_s": statistics.median(r["round_s"] for r in rounds),
        "median_prepare_s": statistics.median(r["prepare_s"] for r in rounds),
        "median_wait_s": statistics.median(r["wait_s"] for r in rounds),
        "first_wait_s": rounds[0]["wait_s"],
        "rss_after_data_mib": rss_data,
        "peak_rss_mib": _maxrss_mib(),
        "rss_round_ref": ref["round"],
        "rss_after_ref_round_mib": ref["rss_mib"],
        "rss_after_last_round_mib": rounds[-1]["rss_mib"],
        "rss_growth_mib": rounds[-1]["rss_mib"] - ref["rss_mib"],
        "rss_half_round": mid["round"],
        "rss_growth_second_half_mib": rounds[-1]["rss_mib"] - mid["rss_mib"],
        "device_bytes_in_use": _device_bytes_in_use(),
        "max_live_array_mib": live_max / 2**20,
        "final_train_loss": rounds[-1]["train_loss"],
        "total_overflow": sum(r["overflow"] for r in rounds),
        "rounds_detail": rounds,
        "device": str(jax.devices()[0]),
        "loadavg_1min_end": os.getloadavg()[0],
    }
    if args.check_rounds:
        result["check"] = check_against_device_resident(sim, population, hp, keys, args)
    return result


def check_against_device_resident(sim, population, hp, keys, args) -> dict:
    """The first ``--check-rounds`` rounds again, host-resident and with the whole population
    on the device (``round_fn(state, data, hparams, key)``); max |difference| of the params."""
    import jax

    import fedjax_dp

    keys = keys[: args.check_rounds]
    dev = population.to_federated_data().to_device()
    state = sim.init(jax.random.key(0))
    for key in keys:
        state, _ = sim.round_fn(state, dev, hp, key)
    host, _ = fedjax_dp.population.run_rounds(
        sim, sim.init(jax.random.key(0)), population, hp, keys
    )
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(host.params))
    )
    return {"rounds": len(keys), "max_abs_param_diff": diff}


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": importlib.metadata.version("jax"),
        "jaxlib": importlib.metadata.version("jaxlib"),
    }


def _fmt_bytes(b):
    return "n/a (not reported)" if b is None else f"{b / 2**20:.1f} MiB"


def table(r: dict) -> str:
    w = r["workload"]
    rows = [
        ("population (clients)", f"{w['clients']:,}"),
        ("examples (features x classes)", f"{w['examples']:,} ({w['features']} x {w['classes']})"),
        ("host data MiB", f"{r['host_data_mib']:.1f}"),
        (
            "cohort (expected / slots)",
            f"{w['expected_cohort']:.0f} / {w['cohort_slots']} ({r['cohort_data_mib']:.2f} MiB)",
        ),
        ("model", w["model"]),
        ("rounds timed (compile s, not timed)", f"{w['rounds']} ({r['compile_s']:.1f})"),
        ("wall s of the timed rounds", f"{r['total_s']:.2f}"),
        ("rounds/s", f"{r['rounds_per_s']:.2f}"),
        ("client updates/s", f"{r['client_updates_per_s']:,.0f}"),
        (
            "median round s / prepare s / wait s",
            (f"{r['median_round_s']:.3f} / {r['median_prepare_s']:.3f} / {r['median_wait_s']:.3f}"),
        ),
        ("peak RSS MiB", f"{r['peak_rss_mib']:.0f}"),
        ("device memory in use", _fmt_bytes(r["device_bytes_in_use"])),
        ("max live JAX arrays", f"{r['max_live_array_mib']:.2f} MiB"),
        (
            f"RSS after round {r['rss_round_ref']} -> last round MiB",
            f"{r['rss_after_ref_round_mib']:.0f} -> {r['rss_after_last_round_mib']:.0f} "
            + f"({r['rss_growth_mib']:+.1f})",
        ),
        (
            f"RSS growth, round {r['rss_half_round']} -> last round MiB",
            f"{r['rss_growth_second_half_mib']:+.1f}",
        ),
        ("final train loss", f"{r['final_train_loss']:.4f}"),
    ]
    if "check" in r:
        c = r["check"]
        rows.append(
            (
                f"max abs param diff vs device-resident ({c['rounds']} rounds)",
                f"{c['max_abs_param_diff']:.3g}",
            )
        )
    out = ["| metric | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.million_clients", description=__doc__.split("\n")[0]
    )
    p.add_argument("--clients", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--cohort", type=int, default=1000, help="expected (poisson) or exact cohort")
    p.add_argument("--sampling", choices=("poisson", "fixed"), default="poisson")
    p.add_argument("--algorithm", choices=("dp_fedavg", "fedavg"), default="dp_fedavg")
    p.add_argument("--model", choices=("logistic", "mlp"), default="logistic")
    p.add_argument("--hidden", type=int, nargs="+", default=[32], help="mlp hidden widths")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--min-examples", type=int, default=8)
    p.add_argument("--max-examples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=None, help="clients per vmap chunk")
    p.add_argument("--depth", type=int, default=2, help="prefetch queue depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--check-rounds",
        type=int,
        default=0,
        help="afterwards, rerun this many rounds with the whole population on the device and "
        "compare (needs device memory for the population)",
    )
    p.add_argument("--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    args.argv = argv
    if not 1 <= args.min_examples <= args.max_examples:
        p.error("need 1 <= --min-examples <= --max-examples")
    if not 1 <= args.cohort <= args.clients:
        p.error("need 1 <= --cohort <= --clients")
    result = run(args)
    result["machine"] = machine()
    out = args.out or ROOT / DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
