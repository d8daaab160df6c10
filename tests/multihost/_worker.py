"""One process of the two-process test: ``python -m tests.multihost._worker OUT COORD N ID``.

Joins the distributed run, builds the simulations over a mesh of all global devices, runs
:func:`simulate` and writes the final params of every algorithm to ``OUT/params_{ID}.npz``
(every process writes its own file so the test can compare them; a real run would write from
process 0 only).
"""

from __future__ import annotations

import sys

import jax
import numpy as np

import fedjax_dp

ALGORITHMS = ("dp_sgd_fedavg", "dp_fedavg")
ROUNDS = 2


def config(name: str) -> fedjax_dp.AlgorithmConfig:
    # 7 clients over 4 devices: padded, uneven shards.
    kw = dict(name=name, cohort_size=7, batch_size=3, client_lr=0.3, chunk_size=2)
    if name == "dp_fedavg":
        kw.update(clip_norm=0.1, noise_multiplier=0.7)
    else:
        kw.update(example_clip_norm=0.5, example_noise_multiplier=0.7)
    return fedjax_dp.AlgorithmConfig(**kw)


def simulate(mesh=None, rounds: int = ROUNDS) -> dict[str, np.ndarray]:
    """Final params of each algorithm after ``rounds`` rounds, keyed ``name/path``.

    Without ``mesh``: one process, one device. With ``mesh``: the inputs are replicated over
    it (:func:`fedjax_dp.distributed.replicate`) and the cohort is split over its devices.
    """
    from tests import _testing

    data = _testing.small_data(num_clients=20)
    model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=(5,))

    def put(tree):
        return tree if mesh is None else fedjax_dp.distributed.replicate(tree, mesh)

    dev = put(data.to_device() if mesh is None else data)
    out = {}
    for name in ALGORITHMS:
        sim = fedjax_dp.build_simulation(config(name), model, data, mesh=mesh)
        state = put(sim.init(jax.random.key(0)))
        hp = put(sim.make_hparams())
        for r in range(rounds):
            state, _ = sim.round_fn(state, dev, hp, put(jax.random.key(r)))
        params = fedjax_dp.distributed.to_host(state.params)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            out[f"{name}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return out


def main(out_dir: str, coordinator: str, num_processes: int, process_id: int) -> None:
    # All arguments are given: no SLURM/MPI auto-detection (it would still pick devices).
    fedjax_dp.distributed.initialize(
        coordinator, num_processes, process_id, cluster_detection_method="deactivate"
    )
    assert jax.process_count() == num_processes, jax.process_count()
    mesh = fedjax_dp.distributed.client_mesh()
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local, {jax.device_count()} global devices",
        file=sys.stderr,
    )
    params = simulate(mesh)
    np.savez(f"{out_dir}/params_{process_id}.npz", **params)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
