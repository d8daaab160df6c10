"""Multi-host (multi-process) runs: one process per host, one global device mesh.

Every process runs the same script. Each one calls :func:`initialize` before any other JAX
call, builds the same simulation over :func:`client_mesh` (all devices of all processes),
turns its inputs into global arrays with :func:`replicate`, and calls ``round_fn`` with
identical arguments. The cohort is split over the mesh axis ``"clients"`` and reduced across
processes; everything else (sampling, noise, server optimizer) is computed identically
everywhere, so every process ends with the same replicated state::

    fedjax_dp.distributed.initialize()  # args from SLURM / TPU / JAX_* env vars
    mesh = fedjax_dp.distributed.client_mesh()
    sim = fedjax_dp.build_simulation(config, model, data, mesh=mesh)
    rep = lambda t: fedjax_dp.distributed.replicate(t, mesh)
    state, data_g, hp = rep(sim.init(jax.random.key(0))), rep(data), rep(sim.make_hparams())
    for r in range(num_rounds):
        state, metrics = sim.round_fn(state, data_g, hp, rep(jax.random.key(r)))
    if fedjax_dp.distributed.is_main_process():
        save(fedjax_dp.distributed.to_host(state.params))

See ``docs/multihost.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

AXIS = "clients"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    **kwargs: Any,
) -> None:
    """Connects this process to the others; call it first, before any other JAX call.

    A thin wrapper of :func:`jax.distributed.initialize`. Arguments left ``None`` are taken,
    in order, from the environment variables ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of
    process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, then from JAX's cluster
    auto-detection (SLURM, Open MPI, Cloud TPU, Kubernetes): under ``srun`` or on a TPU pod
    ``initialize()`` with no arguments is enough.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable from every process; the
        same on all processes.
      num_processes: the number of processes.
      process_id: this process's index, in ``[0, num_processes)``.
      local_device_ids: restricts this process to these local accelerators (see
        :func:`jax.distributed.initialize`).
      cpu_collectives: cross-process collectives of the CPU backend, ``"gloo"`` (default,
        needs nothing installed) or ``"mpi"``; ``None`` leaves JAX's setting. Only matters
        when the devices are CPUs.
      **kwargs: passed on to :func:`jax.distributed.initialize` (e.g.
        ``initialization_timeout``, ``cluster_detection_method``).

    Raises:
      RuntimeError: if JAX already ran a computation or was already initialized.
      ValueError: if the coordinator, the process count or the process id cannot be found.
    """
    if jax.distributed.is_initialized():
        raise RuntimeError("fedjax_dp.distributed.initialize() was already called")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            local_device_ids=local_device_ids,
            **kwargs,
        )
    except ValueError as e:
        raise ValueError(
            f"{e} Pass coordinator_address, num_processes and process_id, or set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under "
            "SLURM / Open MPI / Cloud TPU; a single-process run needs no initialize()"
        ) from e


def client_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis ``"clients"`` over ``devices`` (default: all global devices).

    Pass it as ``build_simulation(..., mesh=mesh)``. Every process must build the same mesh
    (same devices, same order); the default, ``jax.devices()``, is the same everywhere.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one device")
    return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Copies every array leaf of ``tree`` to all devices of ``mesh`` as one global array.

    Each process passes its own copy of the same values (numpy or process-local JAX arrays,
    including typed PRNG keys); the result is a ``jax.Array`` per leaf, fully replicated over
    the mesh (``NamedSharding(mesh, PartitionSpec())``), which a jitted function over a mesh
    that spans several processes accepts. Works on any pytree, e.g. a
    :class:`fedjax_dp.FederatedData` (its static fields stay static), a ``ServerState`` or
    an hparams dict. Python scalars are left as they are. Leaves already replicated over
    ``mesh`` are returned unchanged.

    Why: ``jax.jit`` over a multi-process mesh rejects arrays committed to one local device
    ("incompatible devices"). Uncommitted local arrays (e.g. ``data.to_device()``) are
    accepted and treated as replicated, but copied to every device on each call; replicate
    the data once instead.

    The values are not checked across processes: if they differ, the processes silently
    compute different things (:func:`jax.experimental.multihost_utils.assert_equal` checks).
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def leaf(x):
        if isinstance(x, (bool, int, float, complex)):
            return x
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                impl = jax.random.key_impl(x)
                return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=impl)
            x = _local_value(x)
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    return jax.tree.map(leaf, tree)


def to_host(tree: Any) -> Any:
    """Every array leaf of ``tree`` as a numpy array holding its full (global) value.

    Replicated global arrays (e.g. the state returned by ``round_fn``) are read from a
    local device; arrays sharded across processes are all-gathered, so every process must
    call this at the same point. Typed PRNG keys come back as process-local key arrays.
    The result can be used in process-local computations (e.g. :func:`fedjax_dp.evaluate`
    on process 0 only).
    """

    def leaf(x):
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=impl)
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(leaf, tree)


def is_main_process() -> bool:
    """True on process 0, the one that should write files and logs."""
    return jax.process_index() == 0


def _local_value(x: jax.Array) -> np.ndarray:
    """The value of a JAX array that this process can read in full."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    raise ValueError(
        f"cannot replicate an array of shape {x.shape} sharded as {x.sharding} across "
        "processes; pass process-local values"
    )
