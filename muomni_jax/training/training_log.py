"""training_log.json: one record per logged step, rewritten atomically so a crash never
truncates it."""

import json
import sys
import time
from typing import Any

from etils import epath

from muomni_jax.errors import first_line
from muomni_jax.io.atomic_write import write_atomically


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a training_log.json; ValueError if it is not a list of records with an
    integer "step" (empty, truncated, edited by hand, another file)."""
    records = json.loads(epath.Path(path).read_text())
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get('step'), int) for r in records
    ):
        raise ValueError('not a list of records with an integer "step"')
    return records


class TrainingLog:
    def __init__(self, path: str, resume_step: int = 0, set_aside_damaged: bool = True):
        """Loads an existing log, dropping records past `resume_step` (they will be trained again).

        A log that does not parse cannot be continued, but the run can: it is renamed to
        training_log.json.damaged-<time> (by the one process that writes it, set_aside_damaged)
        with a warning, and the log starts again from this step.
        """
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.unwritten = False  # Whether records changed since the last write.
        if not resume_step or not epath.Path(path).exists():
            return
        try:
            self.records = [r for r in read_records(path) if r['step'] <= resume_step]
        except (ValueError, UnicodeDecodeError) as e:
            if not set_aside_damaged:
                return
            damaged = f'{path}.damaged-{int(time.time())}'
            epath.Path(path).rename(damaged)
            print(
                f'Warning: {path} is damaged ({first_line(e, 200)}); moved it to {damaged} and '
                f'started the log again at step {resume_step}.',
                file=sys.stderr,
            )

    def add(self, step: int, **fields: Any) -> None:
        """Adds fields to the record of `step`, creating it if it is not the last one."""
        if not self.records or self.records[-1]['step'] != step:
            self.records.append({'step': step})
        self.records[-1].update(fields)
        self.unwritten = True

    def write(self) -> None:
        write_atomically(self.path, json.dumps(self.records, indent=1))
        self.unwritten = False
