"""Runs that span several processes: one per TPU VM worker or GPU node, all running one command.

JAX does the work. `jax.distributed` joins the processes, and the collectives of
`jax.experimental.multihost_utils` let them agree. Everything here is a no-op for one process.

A process that fails alone would leave the others waiting in the next collective, so inputs
that can differ between hosts (files, data shards) are checked under `fail_together`, and work
done by process 0 alone reaches the others through `run_on_main`, errors included.
"""

import contextlib
import json
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from muomni_jax.errors import UserError


def initialize(config) -> None:
    """Joins this process to a multi-process run, if it is one. Call before any other JAX use.

    With config.distributed.coordinator_address (or JAX_COORDINATOR_ADDRESS) set, the process
    count and index come from the config or from JAX_NUM_PROCESSES and JAX_PROCESS_ID. Without
    it, JAX reads a TPU pod slice, SLURM or Open MPI from the environment; anywhere else the run
    is a single process. CPU processes then talk over gloo, JAX's default CPU collectives.
    """
    if jax.distributed.is_initialized():
        return
    settings = config.distributed
    address = settings.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
    timeout = int(settings.timeout_s)
    if address:
        num_processes = settings.num_processes or _env_int('JAX_NUM_PROCESSES', 0)
        process_id = (settings.process_id if settings.process_id >= 0
                      else _env_int('JAX_PROCESS_ID', -1))
        if not 0 <= process_id < num_processes:
            raise UserError(f'a run with coordinator_address {address} needs num_processes >= 1 '
                            f'and 0 <= process_id < num_processes (got {num_processes} and '
                            f'{process_id}): set --config.distributed.num_processes and '
                            '--config.distributed.process_id, or JAX_NUM_PROCESSES and '
                            'JAX_PROCESS_ID')
        try:
            jax.distributed.initialize(address, num_processes, process_id,
                                       initialization_timeout=timeout)
        except Exception as e:  # pylint: disable=broad-except
            raise UserError(f'process {process_id} could not join {num_processes} processes at '
                            f'{address} within {timeout}s ({str(e).splitlines()[0][:200]}): start '
                            'every process with the same coordinator address, reachable from '
                            'all hosts') from None
    else:
        try:
            jax.distributed.initialize(initialization_timeout=timeout)
        except ValueError:
            return  # No cluster in the environment: one process.


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, '')
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f'{name}={value!r} is not an integer') from None


def describe(mesh) -> str:
    """One line naming this process, its devices and the mesh, e.g. for each host's log."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    kind = local[0].platform if local[0].platform == 'cpu' else local[0].device_kind
    ids = ','.join(str(d.id) for d in local)
    axes = ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())
    return (f'Process {jax.process_index()}/{jax.process_count()}: {len(local)} local {kind} '
            f'devices (ids {ids}) of {mesh.devices.size}; mesh {axes}')


# ----------------------------------------------------------------------------------------------
# Agreement


def broadcast_bytes(payload: bytes) -> bytes:
    """Process 0's payload on every process (the others' argument is ignored)."""
    if jax.process_count() == 1:
        return payload
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    if length == 0:
        return b''
    buffer = np.zeros(length, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = np.frombuffer(payload, np.uint8)
    return multihost_utils.broadcast_one_to_all(buffer).tobytes()


def allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's payload, in process order, on every process."""
    if jax.process_count() == 1:
        return [payload]
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(payload)))).reshape(-1)
    buffer = np.zeros(max(int(lengths.max()), 1), np.uint8)
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buffer))
    return [row[:n].tobytes() for row, n in zip(gathered, lengths)]


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable value, in process order (no int32 limits on counts)."""
    return [json.loads(b) for b in allgather_bytes(json.dumps(value).encode())]


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Raises on every process if the block raised UserError on any.

    The block must not itself use collectives: a process that raised early would skip them.
    """
    error = ''
    try:
        yield
    except UserError as e:
        if jax.process_count() == 1:
            raise
        error = str(e)
    if jax.process_count() > 1:
        errors = [e.decode() for e in allgather_bytes(error.encode())]
        failed = [i for i, e in enumerate(errors) if e]
        if failed:
            message = errors[failed[0]]
            raise UserError(message if error == message else f'process {failed[0]}: {message}')


def run_on_main(fn: Callable[[], bytes]) -> bytes:
    """Runs fn on process 0 alone and hands its result to every process.

    A UserError raised by fn is raised on every process, so none waits for a result that
    never comes.
    """
    result, error = b'', ''
    if jax.process_index() == 0:
        try:
            result = fn()
        except UserError as e:
            if jax.process_count() == 1:
                raise
            error = str(e)
    if jax.process_count() == 1:
        return result
    message = broadcast_bytes((b'E' + error.encode()) if error else (b'R' + result))
    if message[:1] == b'E':
        raise UserError(message[1:].decode())
    return message[1:]
