"""Runs that span several processes: one per TPU VM worker or GPU node, all running one command.

JAX does the work. `jax.distributed` joins the processes, and the collectives of
`jax.experimental.multihost_utils` let them agree. Everything here is a no-op for one process.

A process that fails alone would leave the others waiting in the next collective, so inputs
that can differ between hosts (files, data shards) are checked under `fail_together`, and work
done by process 0 alone reaches the others through `run_on_main`, errors included.
"""

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

from muomni_jax.errors import UserError, first_line


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
        process_id = (
            settings.process_id if settings.process_id >= 0 else _env_int('JAX_PROCESS_ID', -1)
        )
        if not 0 <= process_id < num_processes:
            raise UserError(
                f'a run with coordinator_address {address} needs num_processes >= 1 '
                f'and 0 <= process_id < num_processes (got {num_processes} and '
                f'{process_id}): set --config.distributed.num_processes and '
                '--config.distributed.process_id, or JAX_NUM_PROCESSES and '
                'JAX_PROCESS_ID'
            )
        try:
            jax.distributed.initialize(
                address, num_processes, process_id, initialization_timeout=timeout
            )
        except Exception as e:
            raise UserError(
                f'process {process_id} could not join {num_processes} processes at '
                f'{address} within {timeout}s ({first_line(e, 200)}): start '
                'every process with the same coordinator address, reachable from '
                'all hosts'
            ) from None
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
    return (
        f'Process {jax.process_index()}/{jax.process_count()}: {len(local)} local {kind} '
        f'devices (ids {ids}) of {mesh.devices.size}; mesh {axes}'
    )


# ----------------------------------------------------------------------------------------------
# Agreement, through the coordinator's key-value store rather than device collectives: every
# wait has a deadline, so a process that died or hangs is named instead of hanging the others.

# Long enough for what one process may do while the others wait for it (process 0 training the
# tokenizer, a host building its shards of a large token cache).
AGREE_TIMEOUT_S = 3600.0
_agreements = itertools.count()  # Every process agrees in the same order, so the same numbers.


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _waited(what: str, timeout_s: float) -> UserError:
    return UserError(
        f'process {jax.process_index()} waited {timeout_s:g} s for {what}, which '
        'failed or hangs: see its log; every process of a run must run the same '
        'command'
    )


def allgather_bytes(payload: bytes, timeout_s: float = AGREE_TIMEOUT_S) -> list[bytes]:
    """Every process's payload, in process order, on every process."""
    if jax.process_count() == 1:
        return [payload]
    key = f'muomni_jax/agree/{next(_agreements)}'
    client = _client()
    client.key_value_set_bytes(f'{key}/{jax.process_index()}', payload)
    gathered = []
    for index in range(jax.process_count()):
        try:
            gathered.append(
                client.blocking_key_value_get_bytes(f'{key}/{index}', int(timeout_s * 1000))
            )
        except Exception:
            raise _waited(f'process {index}', timeout_s) from None
    return gathered


def broadcast_bytes(payload: bytes, timeout_s: float = AGREE_TIMEOUT_S) -> bytes:
    """Process 0's payload on every process (the others' argument is ignored)."""
    if jax.process_count() == 1:
        return payload
    key = f'muomni_jax/broadcast/{next(_agreements)}'
    client = _client()
    if jax.process_index() == 0:
        client.key_value_set_bytes(key, payload)
        return payload
    try:
        return client.blocking_key_value_get_bytes(key, int(timeout_s * 1000))
    except Exception:
        raise _waited('process 0', timeout_s) from None


def barrier(name: str, timeout_s: float = AGREE_TIMEOUT_S) -> None:
    """Waits until every process is here; one line naming the wait if one never comes."""
    if jax.process_count() == 1:
        return
    try:
        _client().wait_at_barrier(f'muomni_jax/{name}/{next(_agreements)}', int(timeout_s * 1000))
    except Exception:
        raise _waited(f'every process at "{name}"', timeout_s) from None


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable value, in process order (no int32 limits on counts)."""
    return [json.loads(b) for b in allgather_bytes(json.dumps(value).encode())]


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Raises on every process if the block raised on any: a UserError as it is, any other
    exception (a full disk, a bug) as one line naming the process, while the process it came
    from keeps its own traceback.

    The block must not itself agree with the others: a process that raised early would skip it.
    """
    error = ''
    try:
        yield
    except Exception as e:
        if jax.process_count() == 1:
            raise
        error = str(e) if isinstance(e, UserError) else first_line(e)
        allgather_bytes(error.encode())  # The others learn of it; this process keeps its own.
        raise
    if jax.process_count() > 1:
        errors = [m.decode() for m in allgather_bytes(error.encode())]
        failed = [i for i, m in enumerate(errors) if m]
        if failed:
            raise UserError(f'process {failed[0]}: {errors[failed[0]]}')


def run_on_main(fn: Callable[[], bytes]) -> bytes:
    """Runs fn on process 0 alone and hands its result to every process.

    Any exception fn raises is raised on every process (the others get one line naming it), so
    none waits for a result that never comes.
    """
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:
            # U: a UserError, said as it is; E: anything else, said as process 0's failure.
            kind = b'U' if isinstance(e, UserError) else b'E'
            broadcast_bytes(kind + (str(e) if kind == b'U' else first_line(e)).encode())
            raise
        broadcast_bytes(b'R' + result)
        return result
    message = broadcast_bytes(b'')
    if message[:1] == b'U':
        raise UserError(message[1:].decode())
    if message[:1] == b'E':
        raise UserError(f'process 0: {message[1:].decode()}')
    return message[1:]
