"""Whole-file writes that a crash cannot leave half done, locally and on gs://."""

import os
import tempfile

from etils import epath

from muomni_jax.io import storage


def write_atomically(path: str, data: str | bytes) -> None:
    """Readers and a rerun after a crash see the old file or the new one, never a truncated one.

    Locally: a temporary file beside `path`, renamed over it. On gs://: one object upload, which
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
        f.write(data)
    os.replace(f.name, path)
