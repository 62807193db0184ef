"""The layout of a save_dir: every file a run keeps there, and config.json's read and write.

A save_dir (local or gs://) holds:
  config.json         the run's config, written when a run starts and by launch.convert;
  tokenizer.model     the SentencePiece model the run's tokens come from;
  training_log.json   one record per logged step, evaluation and sample;
  run.lock            present while a run holds the folder (run.lock.json, a lease, on gs://);
  <step>/             Orbax checkpoints (training/checkpointing.py owns what is inside);
  plugins/profile/    jax.profiler traces; events.out.tfevents.*: TensorBoard scalars.
Everything else reaches these through this module, so a renamed file changes in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from etils import epath

from muomni_jax.errors import UserError, first_line
from muomni_jax.io.atomic_write import write_atomically

CONFIG = 'config.json'
TOKENIZER = 'tokenizer.model'
TRAINING_LOG = 'training_log.json'
LOCK = 'run.lock'
LEASE = 'run.lock.json'  # The lock of a gs:// save_dir.
PROFILE = 'plugins/profile'


def path(save_dir: str, name: str) -> str:
    """save_dir/name as a string (local path or gs:// URL)."""
    return str(epath.Path(save_dir) / name)


def config_path(save_dir: str) -> str:
    return path(save_dir, CONFIG)


def tokenizer_path(save_dir: str) -> str:
    return path(save_dir, TOKENIZER)


def training_log_path(save_dir: str) -> str:
    return path(save_dir, TRAINING_LOG)


def lock_path(save_dir: str) -> str:
    return path(save_dir, LOCK)


def profile_dir(save_dir: str) -> str:
    return path(save_dir, PROFILE)


def write_config(save_dir: str, fields: Mapping[str, Any]) -> None:
    """Writes config.json (sorted keys, one space of indent) in one atomic step."""
    write_atomically(config_path(save_dir), json.dumps(fields, indent=1, sort_keys=True))


def read_config(save_dir: str, *, if_damaged: str) -> dict[str, Any] | None:
    """config.json's fields, or None when save_dir has none.

    A file that is not a JSON object raises one UserError line that ends with `if_damaged`,
    the fix that suits the caller.
    """
    config = epath.Path(save_dir) / CONFIG
    if not config.exists():
        return None
    try:
        fields = json.loads(config.read_text())
        if not isinstance(fields, dict):
            raise ValueError('not a JSON object')
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f'{config} is damaged ({first_line(e, 200)}): {if_damaged}') from None
    return fields
