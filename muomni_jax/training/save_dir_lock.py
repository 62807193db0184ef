"""save_dir's run lock held on every process of a run (run_lock.py is the lock itself)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from muomni_jax.parallel import distributed
from muomni_jax.training import run_lock


@contextlib.contextmanager
def locked(save_dir: str, is_main: bool, log: Callable[[str], None]) -> Iterator[None]:
    """Holds save_dir's run lock (taken by process 0) for the block, on every process: a second
    run on a live save_dir stops here, before it reads a checkpoint or loads data."""
    lock = run_lock.RunLock(save_dir, log=log) if is_main else None
    with distributed.fail_together():
        if lock is not None:
            lock.acquire()
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
