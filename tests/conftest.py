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


# The longest tests (each half a minute to two minutes on 2 cores), started first: pytest-xdist
# hands tests out in collection order, so a long test collected last would leave the other
# worker idle at the end of the session. Only the order changes; every test still runs.
_LONG_FIRST = (
    "tests/multihost/multihost_test.py::MultiHostTest",
    "tests/mechanisms_test.py::AdaptiveClippingTest::test_round_equals_python_loop",
    "tests/contract_test.py::ContractTest::test_jit_equals_op_by_op_adaptive_clipping",
    "tests/clipping_test.py::GhostClippingTest::test_round_with_ghost_equals_per_example_round",
    "tests/experiment_test.py::ReleasesTest::test_dp_run_releases_only_what_epsilon_covers",
    "tests/checkpoint_test.py::test_sigkill_mid_run_then_resume_is_bit_for_bit",
    "tests/calibration_test.py::ExperimentTest::test_plan_calibrates_and_schedules_user_level",
    "tests/calibration_test.py::ExperimentTest::test_run_calibrates_a_schedule_with_the_noise",
    "tests/sweep_test.py::SweepTest",
    "tests/checkpoint_test.py::test_checkpoint_round_trip_and_resume_with_more_rounds",
    "tests/contract_test.py::ContractTest::test_checkpoint_round_trip_continues_bit_for_bit",
    "tests/calibration_test.py::CalibrateTest::test_tighter_accounting_needs_less_noise",
    "tests/experiment_test.py::CliTest::test_bad_input_is_one_clear_line",
)


def _long_rank(nodeid: str) -> int:
    for rank, prefix in enumerate(_LONG_FIRST):
        if nodeid.startswith(prefix):
            return rank
    return len(_LONG_FIRST)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: _long_rank(item.nodeid))  # stable: the rest keep their order
