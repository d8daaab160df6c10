"""Multi-device tests run in their own process with 8 forced host devices.

`make test` runs them as `XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest
tests/multidevice`; the flag is also set here in case this directory is run on its own
(it only works if JAX has not been initialised yet in this process).
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
