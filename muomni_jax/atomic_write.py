"""Whole-file writes that a crash cannot leave half done."""

import os
import tempfile


def write_atomically(path: str, data: str | bytes) -> None:
    """Writes a temporary file beside `path`, then renames it over `path`: readers and a rerun
    after a crash see the old file or the new one, never a truncated one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = 'wb' if isinstance(data, bytes) else 'w'
    with tempfile.NamedTemporaryFile(mode, dir=directory, delete=False, suffix='.tmp') as f:
        f.write(data)
    os.replace(f.name, path)
