"""One live run per save_dir: a lock that the run's process 0 holds from its first write to its
end, so a second launch on the same save_dir (a "rerun to resume" while the old job still
trains) stops at once with one line naming the holder, instead of both writing checkpoints, logs
and deleting each other's steps.

Local folders and NFS: save_dir/run.lock, locked with fcntl.lockf (POSIX record locks, which NFS
carries to the server). The kernel (or the NFS server, once a lost client's lease expires) frees
the lock when its process dies however it dies, so a lock left by kill -9 or a lost VM is simply
free; the file still names the dead holder, and the run that takes it over says so. A run that
ends removes the file (and save_dir, if the lock created it and nothing else was written), so a
run refused by a later check leaves no trace; a run that locked a file just removed locks again.

The lock is taken before anything reads or writes save_dir's checkpoints, tokenizer, config or
log. Readers (launch.sample, launch.evaluate, checkpointing.load) take no lock: they read only
committed steps, and skip a step that is deleted under them.

gs://: objects have no locks, so the lock is a lease object, save_dir/run.lock.json, created
only if absent and refreshed (a heartbeat every HEARTBEAT_S) only if unchanged since this run
wrote it: google-cloud-storage's generation preconditions make each of those an atomic
compare-and-set. A lease not refreshed for LEASE_S belongs to a dead run and is taken over, at
once when its holder was on this host and its process is gone (a rerun after kill -9). A
run that finds its lease taken (it stalled past LEASE_S) warns; the newer run then holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time

from muomni_jax.errors import UserError, first_line
from muomni_jax.io import run_dir, storage

HEARTBEAT_S = 30.0
LEASE_S = 120.0  # Four heartbeats missed: the holder is gone.


def _holder() -> dict:
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}


def _describe(holder: dict) -> str:
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
    return f'pid {holder.get("pid")} on host {holder.get("host")} (since {started})'


def _in_use(save_dir: str, holder: dict) -> UserError:
    return UserError(
        f'save_dir {save_dir} is in use by another run: {_describe(holder)}. Wait '
        'for it to end, or stop it (kill -TERM sends it to save and exit), then '
        'rerun; or train into another --config.save_dir'
    )


class RunLock:
    """Held by one process (the run's process 0); `acquire` raises UserError if it is taken."""

    def __init__(self, save_dir: str, log=print):
        self.save_dir = save_dir
        self._log = log
        self._fd = None
        self._lease = None
        self._created_dir = False

    def acquire(self) -> None:
        if storage.is_url(self.save_dir):
            self._lease = _Lease(self.save_dir, self._log)
            self._lease.acquire()
            return
        self._created_dir = not os.path.isdir(self.save_dir)
        os.makedirs(self.save_dir, exist_ok=True)
        path = run_dir.lock_path(self.save_dir)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd)
                os.close(fd)
                raise _in_use(self.save_dir, holder) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # The holder ended and removed the file we locked: lock the new one.
        previous = _read(fd)
        if previous.get('pid'):
            self._log(
                f'Took over the lock of save_dir {self.save_dir} from '
                f'{_describe(previous)}, which is no longer running.'
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Frees the lock and removes its file, so the next run takes it without a word."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._fd is not None:
            # Removed while still locked: a run that opened the old file sees it is gone.
            _remove(run_dir.lock_path(self.save_dir))
            os.close(self._fd)  # Closing the file frees its POSIX lock.
            self._fd = None
            if self._created_dir:
                try:
                    os.rmdir(self.save_dir)  # Only if empty: a run that wrote nothing.
                except OSError:
                    pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read(fd: int) -> dict:
    """The holder a lock file names ({} when empty or unreadable). Read through the locking
    descriptor: closing any other descriptor of the file would free this process's lock."""
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or '{}')
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _dead_here(holder: dict) -> bool:
    """A holder on this host whose process is gone (kill -9): no need to wait out its lease."""
    if holder.get('host') != socket.gethostname() or not isinstance(holder.get('pid'), int):
        return False
    try:
        os.kill(holder['pid'], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Lease:
    """The gs:// lease: an object created if absent and refreshed if unchanged."""

    def __init__(self, save_dir: str, log):
        from google.cloud import storage as gcs

        bucket, _, prefix = save_dir[len('gs://') :].partition('/')
        name = f'{prefix.rstrip("/")}/{run_dir.LEASE}' if prefix.strip('/') else run_dir.LEASE
        self.save_dir = save_dir
        self._bucket = gcs.Client().bucket(bucket)
        self._name = name
        self._blob = self._bucket.blob(name)
        self._log = log
        self._generation = None
        self._stop = threading.Event()
        self._thread = None

    def _write(self, if_generation_match: int) -> bool:
        from google.api_core import exceptions

        body = json.dumps({**_holder(), 'heartbeat': time.time()})
        try:
            self._blob.upload_from_string(
                body, content_type='application/json', if_generation_match=if_generation_match
            )
        except exceptions.PreconditionFailed:
            return False
        self._generation = self._blob.generation
        return True

    def acquire(self) -> None:
        from google.api_core import exceptions

        try:
            if not self._write(if_generation_match=0):  # 0: only if there is no such object.
                # A fresh handle: its download reads the holder and that version's generation.
                current = self._bucket.blob(self._name)
                holder = json.loads(current.download_as_bytes())
                if time.time() - holder.get('heartbeat', 0) < LEASE_S and not _dead_here(holder):
                    raise _in_use(self.save_dir, holder)
                if not self._write(if_generation_match=current.generation):
                    raise _in_use(self.save_dir, holder)  # Another run took it first.
                why = (
                    'which is no longer running'
                    if _dead_here(holder)
                    else f'whose heartbeat stopped {time.time() - holder.get("heartbeat", 0):.0f} '
                    's ago'
                )
                self._log(
                    f'Took over the lease of save_dir {self.save_dir} from '
                    f'{_describe(holder)}, {why}.'
                )
        except exceptions.GoogleAPIError as e:
            raise UserError(
                f'cannot take the lease {run_dir.LEASE} of save_dir {self.save_dir} '
                f'({first_line(e, 200)}): check access to the bucket'
            ) from None
        self._thread = threading.Thread(target=self._beat, daemon=True, name='run-lease')
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._write(if_generation_match=self._generation):
                    print(
                        f'Warning: the lease of save_dir {self.save_dir} was taken by another '
                        'run after this one stalled; stop one of them.',
                        file=sys.stderr,
                    )
                    return
            except Exception as e:
                # A missed beat is retried at the next; LEASE_S allows for three of them.
                print(f'Warning: lease heartbeat failed ({first_line(e, 200)}).', file=sys.stderr)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self._blob.delete(if_generation_match=self._generation)
        except Exception:
            pass  # Taken over, or gone: either way, no longer ours.
