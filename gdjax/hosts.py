"""Several hosts (jax.distributed): who writes files, and host copies of replicated arrays.

In a multi-process run every process executes the same program on its own devices, and
the workdir is shared. Process 0 alone writes files (checkpoints, metric rows, PNGs,
params); every process reads them. Orbax is told to treat each process as a world of its
own (`local_orbax_options`), so a write by process 0 never waits on a barrier the others
do not enter. With one process all of this is a no-op.
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp


def is_writer() -> bool:
    """True on the process that writes the run's files (process 0)."""
    return jax.process_index() == 0


def local_orbax_options() -> ocp.options.MultiprocessingOptions:
    """Orbax options under which this process saves or restores alone."""
    i = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=i, active_processes={i})


def barrier(name: str) -> None:
    """Waits until every process reaches `name` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def host_copy(x) -> np.ndarray:
    """A numpy copy of a fully addressable or fully replicated array (any process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise NotImplementedError(
                "an array sharded across processes cannot be copied to one host; gdjax "
                "replicates parameters and optimizer state")
        x = x.addressable_data(0)
    return np.array(x, copy=True)
