"""DP mechanisms the round is built from: clipping, noise and the DP stages.

* :mod:`~fedjax_dp.mechanisms.aggregation`: per-client clipping (whole update, per layer,
  adaptive), central Gaussian and Laplace noise, local Gaussian noise: each a
  :class:`~fedjax_dp.DPTransform` that states its sensitivity and neighbouring relation.
* :mod:`~fedjax_dp.mechanisms.clipping`: per-example gradient clipping (ghost clipping or the
  per-example reference) for DP-SGD inside clients.
* :mod:`~fedjax_dp.mechanisms.noise`: Gaussian and Laplace samplers whose support reaches the
  far tail in float32.
"""
