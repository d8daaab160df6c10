"""The engine: one federated round as one jitted function, and the pieces it is built from.

* :mod:`~fedjax_dp.core.base`: stages (:class:`~fedjax_dp.RoundTransform`,
  :class:`~fedjax_dp.DPTransform`), chained optax style.
* :mod:`~fedjax_dp.core.contexts`: the round's contracts (cohort, client and round contexts,
  client results).
* :mod:`~fedjax_dp.core.sampling`: cohort samplers on device (real clients first).
* :mod:`~fedjax_dp.core.client`: client updates (local optax steps, DP-SGD inside).
* :mod:`~fedjax_dp.core.aggregators`: pluggable aggregators.
* :mod:`~fedjax_dp.core.round`: the round (chunks of vmapped clients, sharded with shard_map).
* :mod:`~fedjax_dp.core.systems`: stragglers, dropouts, a minimum cohort.
* :mod:`~fedjax_dp.core.memory`: the automatic chunk size.
* :mod:`~fedjax_dp.core.distributed`: multi-host meshes.
* :mod:`~fedjax_dp.core.algorithms`: named algorithms and :class:`~fedjax_dp.Simulation`.
* :mod:`~fedjax_dp.core.evaluation`: vectorised evaluation.

Core never imports :mod:`fedjax_dp.runner` (tested).
"""
