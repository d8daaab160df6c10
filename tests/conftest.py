"""Test-session settings: compile less, without changing what is computed.

The suite is dominated by XLA compilation of small programs, many of them identical across
tests (the same tiny model and round built by several tests and by the CLI subprocesses).

* A persistent compilation cache in a fresh temporary folder for this session (shared by the
  xdist workers and the subprocesses they start, removed at the end): an identical program
  is compiled once per session. It starts empty, so nothing carries over between sessions.
* ``--xla_backend_optimization_level=0``: LLVM does not optimise the CPU code. The tests'
  programs are tiny, so this halves compile time and costs little at run time; XLA's own
  HLO passes (and so the semantics and float rounding of every op) are unchanged. Set
  ``XLA_FLAGS`` with an explicit ``--xla_backend_optimization_level`` to test another level.

Both are set before JAX is imported by any test module.
"""

import atexit
import os
import shutil
import tempfile

_OWNER = "FEDJAX_DP_TEST_CACHE" not in os.environ
if _OWNER and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="fedjax_dp_test_jax_cache_")
    os.environ["FEDJAX_DP_TEST_CACHE"] = _cache
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
