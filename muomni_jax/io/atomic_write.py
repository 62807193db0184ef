"""Whole-file writes that a crash cannot leave half done, locally and on gs://."""

import os
import tempfile

from etils import epath

from muomni_jax.io import storage


def write_atomically(path: str, data: str | bytes) -> None:
    """Readers and a rerun after a crash see the old file or the new one, never a truncated one.

    Locally: a temporary file beside `path`, fsynced, renamed over it, and the folder fsynced,
    so a power loss too leaves one whole file. On gs://: one object upload, which
    GCS makes visible all at once or not at all (a rename there would be a copy and a delete).
    """
    if storage.is_url(path):
        target = epath.Path(path)
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = 'wb' if isinstance(data, bytes) else 'w'
    with tempfile.NamedTemporaryFile(mode, dir=directory, delete=False, suffix='.tmp') as f:
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # The data is on disk before the name points at it...
        except BaseException:
            f.close()
            os.remove(f.name)
            raise
    os.replace(f.name, path)
    fsync_directory(directory)  # ...and the new name survives a power loss too.


def fsync_directory(directory: str) -> None:
    """Makes a rename or a new file in `directory` durable (a no-op where folders cannot be
    opened, as on some network filesystems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
