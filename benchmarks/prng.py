"""Gaussian noise generation rate of JAX's PRNG implementations on this machine.

DP-SGD draws one normal per parameter per local step (R1-mlp: 203,530 per step, 814,120 per
client update), so the generator's rate bounds the client update rate. This times
``jax.random.normal`` (jitted, float32) for ``threefry2x32`` (JAX's default), ``rbg`` and
``unsafe_rbg`` at several sizes, round-robin so the implementations share the same load.

Usage::

    python -m benchmarks.prng                 # table + benchmarks/results/prng.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import r1

IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
SIZES = (203_530, 814_120, 4_000_000)
DEFAULT_OUT = Path("benchmarks") / "results" / "prng.json"


def measure(sizes=SIZES, reps: int = 20) -> list[dict]:
    import jax

    fns = {}
    for n in sizes:
        for impl in IMPLS:
            key = jax.random.key(0, impl=impl)
            f = jax.jit(lambda k, n=n: jax.random.normal(k, (n,)))
            f(key).block_until_ready()
            fns[(n, impl)] = (f, key)
    times = {k: [] for k in fns}
    for i in range(reps):
        for k, (f, key) in fns.items():
            t0 = time.perf_counter()
            f(jax.random.fold_in(key, i)).block_until_ready()
            times[k].append(time.perf_counter() - t0)
    return [
        {
            "impl": impl,
            "n": n,
            "median_s": statistics.median(times[(n, impl)]),
            "normals_per_s": n / statistics.median(times[(n, impl)]),
        }
        for (n, impl) in fns
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.prng", description=__doc__.split("\n")[0]
    )
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    rows = measure(reps=args.reps)
    lines = ["| impl | normals per call | M normals/s | ms per call |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['n']:,} | {r['normals_per_s'] / 1e6:.0f} | "
            f"{1e3 * r['median_s']:.2f} |"
        )
    print("\n".join(lines))
    out = args.out or r1.ROOT / DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.prng " + " ".join(sys.argv[1:] if argv is None else argv)
    out.write_text(
        json.dumps({"command": command, "machine": r1.machine(), "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
