"""Gaussian noise generation rate of JAX's PRNG implementations on this machine.

DP-SGD draws one normal per parameter per local step (R1-mlp: 203,530 per step, 814,120 per
client update), so the generator's rate bounds the client update rate. This times
``jax.random.normal`` (jitted, float32) for ``threefry2x32`` (JAX's default), ``rbg`` and
``unsafe_rbg`` at several sizes, round-robin so the implementations share the same load.

``--tails`` compares, at model-sized draws (100k and 1.6M floats), float32
``jax.random.normal`` / ``jax.random.laplace`` (bounded at 5.4 sigma / 16.6 scales) with the
samplers that draw fedjax_dp's DP noise (``fedjax_dp.mechanisms.noise``: support to 9.49 sigma /
44.4 scales), for the same three key implementations.

Usage::

    python -m benchmarks.prng                 # table + benchmarks/results/prng.json
    python -m benchmarks.prng --tails         # table + benchmarks/results/prng_tails.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks import r1

IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
SIZES = (203_530, 814_120, 4_000_000)
TAIL_SIZES = (100_000, 1_600_000)
# (old, new) pairs: what the DP noise used to be drawn with, and what draws it now.
TAIL_SAMPLERS = (
    ("jax.random.normal", "fedjax_dp gaussian"),
    ("jax.random.laplace", "fedjax_dp laplace"),
)
DEFAULT_OUT = Path("benchmarks") / "results" / "prng.json"
DEFAULT_TAILS_OUT = Path("benchmarks") / "results" / "prng_tails.json"


def _sampler_fns() -> dict:
    import jax

    from fedjax_dp.mechanisms import noise  # not public API: the samplers behind the DP stages

    return {
        "jax.random.normal": lambda k, n: jax.random.normal(k, (n,)),
        "jax.random.laplace": lambda k, n: jax.random.laplace(k, (n,)),
        "fedjax_dp gaussian": lambda k, n: noise.gaussian(k, (n,)),
        "fedjax_dp laplace": lambda k, n: noise.laplace(k, (n,)),
    }


def measure(
    sizes=SIZES, reps: int = 20, samplers=("jax.random.normal",), impls=IMPLS
) -> list[dict]:
    import jax

    sampler_fns = _sampler_fns()
    fns = {}
    for n in sizes:
        for impl in impls:
            for name in samplers:
                key = jax.random.key(0, impl=impl)
                f = jax.jit(lambda k, n=n, s=sampler_fns[name]: s(k, n))
                f(key).block_until_ready()
                fns[(n, impl, name)] = (f, key)
    times = {k: [] for k in fns}
    for i in range(reps):
        for k, (f, key) in fns.items():
            t0 = time.perf_counter()
            f(jax.random.fold_in(key, i)).block_until_ready()
            times[k].append(time.perf_counter() - t0)
    return [
        {
            "sampler": name,
            "impl": impl,
            "n": n,
            "median_s": statistics.median(times[(n, impl, name)]),
            "normals_per_s": n / statistics.median(times[(n, impl, name)]),
        }
        for (n, impl, name) in fns
    ]


def _table(rows: list[dict]) -> list[str]:
    lines = ["| impl | normals per call | M normals/s | ms per call |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['n']:,} | {r['normals_per_s'] / 1e6:.0f} | "
            f"{1e3 * r['median_s']:.2f} |"
        )
    return lines


def _tails_table(rows: list[dict]) -> list[str]:
    by = {(r["sampler"], r["impl"], r["n"]): r for r in rows}
    lines = [
        "| sampler | impl | samples per call | M samples/s | ms per call | x old |",
        "|---|---|---|---|---|---|",
    ]
    for old, new in TAIL_SAMPLERS:
        for n in sorted({r["n"] for r in rows}):
            for impl in IMPLS:
                for name in (old, new):
                    r = by.get((name, impl, n))
                    if r is None:
                        continue
                    ratio = r["normals_per_s"] / by[(old, impl, n)]["normals_per_s"]
                    lines.append(
                        f"| {name} | {impl} | {n:,} | {r['normals_per_s'] / 1e6:.0f} | "
                        f"{1e3 * r['median_s']:.2f} | {ratio:.2f} |"
                    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.prng", description=__doc__.split("\n")[0]
    )
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--tails",
        action="store_true",
        help="compare jax.random.normal/laplace with the DP noise samplers (real tails)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON file (default {DEFAULT_OUT}, {DEFAULT_TAILS_OUT} with --tails)",
    )
    args = p.parse_args(argv)
    load_start = os.getloadavg()[0]
    if args.tails:
        samplers = [s for pair in TAIL_SAMPLERS for s in pair]
        rows = measure(sizes=TAIL_SIZES, reps=args.reps, samplers=samplers)
        lines = _tails_table(rows)
        default_out = DEFAULT_TAILS_OUT
    else:
        rows = measure(reps=args.reps)
        lines = _table(rows)
        default_out = DEFAULT_OUT
    print("\n".join(lines))
    out = args.out or r1.ROOT / default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.prng " + " ".join(sys.argv[1:] if argv is None else argv)
    out.write_text(
        json.dumps(
            {
                "command": command,
                "machine": r1.machine(),
                "load_1min": [load_start, os.getloadavg()[0]],  # start, end (shared machine)
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
