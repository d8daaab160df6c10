"""Host side: configs, the training loop, checkpoints, sweeps, host populations, the CLI.

* :mod:`~fedjax_dp.runner.loop`: the host loop over rounds and its callbacks (metrics,
  evaluation, checkpoints, progress, Ctrl-C), used by all of the below; subclass
  :class:`~fedjax_dp.runner.loop.Callback` to add your own.
* :mod:`~fedjax_dp.runner.experiment`: configuration files and ``fedjax-dp run``.
* :mod:`~fedjax_dp.runner.sweep`: privacy-utility sweeps as one vectorised simulation.
* :mod:`~fedjax_dp.runner.population`: populations larger than device memory.
* :mod:`~fedjax_dp.runner.checkpointing`: orbax checkpoints, bit-for-bit resume.
* :mod:`~fedjax_dp.runner.cli`: ``fedjax-dp run|sweep|audit``.
"""
