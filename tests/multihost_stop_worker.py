"""One process of a two-process CPU run that stops on a signal; driven by test_fault_tolerance.

  python tests/multihost_stop_worker.py PORT PROCESS_ID

Prints `ready` once it has stepped a few times, then `stop <step> <why>` when StopSignals agrees.
"""

import os
import sys
import time

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muomni_jax.training import preemption


def main(port: str, process_id: str) -> None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id)
    )
    mesh = jax.make_mesh((2,), ('data',))
    sharding = NamedSharding(mesh, P('data'))
    # A collective per step keeps the processes in lockstep, as in training.
    total = jax.jit(jnp.sum)
    with preemption.StopSignals(sync_every=4) as stop:
        for step in range(1, 2000):
            x = jax.make_array_from_process_local_data(sharding, np.ones([1], np.float32))
            assert float(total(x)) == 2.0
            time.sleep(0.01)
            if step == 5:
                print('ready', flush=True)
            if stop.should_stop(step):
                print(f'stop {step} {stop.received}', flush=True)
                return
    print('never stopped', flush=True)


if __name__ == '__main__':
    main(*sys.argv[1:])
