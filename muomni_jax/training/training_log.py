"""training_log.json: one record per logged step, rewritten atomically so a crash never truncates it."""

import json
from typing import Any

from etils import epath

from muomni_jax.io.atomic_write import write_atomically


class TrainingLog:

    def __init__(self, path: str, resume_step: int = 0):
        """Loads an existing log, dropping records past `resume_step` (they will be trained again)."""
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.unwritten = False  # Whether records changed since the last write.
        if resume_step and epath.Path(path).exists():
            self.records = [r for r in json.loads(epath.Path(path).read_text())
                            if r['step'] <= resume_step]

    def add(self, step: int, **fields: Any) -> None:
        """Adds fields to the record of `step`, creating it if it is not the last one."""
        if not self.records or self.records[-1]['step'] != step:
            self.records.append({'step': step})
        self.records[-1].update(fields)
        self.unwritten = True

    def write(self) -> None:
        write_atomically(self.path, json.dumps(self.records, indent=1))
        self.unwritten = False
