"""A new algorithm: DP-FedAvg whose clients send top-k sparsified updates (a client stage).

A stage is two pure functions (init, update), like an optax transformation. build_simulation
runs your client stages BEFORE the config's clipping, so the DP guarantee still holds."""

import jax
import jax.numpy as jnp

import fedjax_dp


def top_k(fraction: float) -> fedjax_dp.RoundTransform:
    """Keeps each client's ``fraction`` largest-magnitude coordinates, zeroes the rest."""

    def update(deltas, state, *, key, mask, hparams):
        flat = jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(deltas)], 1)
        k = max(1, int(fraction * flat.shape[1]))
        threshold = jax.lax.top_k(jnp.abs(flat), k)[0][:, -1]  # one per client

        def keep(x):
            return jnp.where(jnp.abs(x) >= threshold.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)

        return jax.tree.map(keep, deltas), state

    return fedjax_dp.RoundTransform(lambda params: fedjax_dp.EmptyState(), update)


def main(rounds: int = 200, fraction: float = 0.1) -> tuple[float, float]:
    (x, y), (x_test, y_test) = fedjax_dp.load_digits(seed=0)
    data = fedjax_dp.from_arrays(x, y, fedjax_dp.partition(y, num_clients=300, seed=0))
    model = fedjax_dp.get_model("mlp", data.feature_shape, data.num_classes, hidden=[32])
    config = fedjax_dp.AlgorithmConfig(
        name="dp_fedavg", sampling="poisson", sampling_rate=0.1, local_epochs=2, batch_size=8,
        client_lr=0.2, clip_norm=0.5, noise_multiplier=1.0,
    )  # fmt: skip
    sim = fedjax_dp.build_simulation(config, model, data, client_stages=[top_k(fraction)])
    state, hparams, device_data = sim.init(jax.random.key(0)), sim.make_hparams(), data.to_device()
    key = jax.random.key(1)
    for r in range(rounds):  # one jitted round per step; the host loop is over rounds only
        state, _ = sim.round_fn(state, device_data, hparams, jax.random.fold_in(key, r))
    accuracy = fedjax_dp.evaluate(model, state.params, x_test, y_test)["accuracy"]
    (privacy,) = sim.round_privacy(hparams)  # the config's clip + noise, unchanged by top_k
    epsilon = fedjax_dp.accounting.epsilon(privacy, rounds=rounds, delta=1e-4)
    print(f"top-{fraction:.0%} DP-FedAvg: accuracy {accuracy:.4f}, epsilon {epsilon:.3f}")
    return accuracy, epsilon


if __name__ == "__main__":
    main()
