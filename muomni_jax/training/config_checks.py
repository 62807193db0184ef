"""Checks of a planned run against what it meets: a save_dir that holds another model shape or
optimizer, and devices that cannot run its attention kernel. (The config's own fields are
checked by run_plan.resolve.)
"""

import json

from etils import epath

from muomni_jax.errors import UserError, first_line
from muomni_jax.io import run_dir
from muomni_jax.model import attention_kernels
from muomni_jax.model.thinker import SHAPE_FIELDS, ThinkerConfig


def check_same_model(model: ThinkerConfig, optimizer: str, save_dir: str) -> None:
    """A save_dir written with another model shape or optimizer must not be resumed into this."""
    path = epath.Path(run_dir.config_path(save_dir))
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError('not a JSON object')
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f'{path} is damaged ({first_line(e, 200)}), so this run cannot check '
            'that save_dir holds its model shape: restore it, or move it aside to '
            'resume without that check (the run writes it again)'
        ) from None
    differ = [
        f'{k} {saved.get(k)!r} -> {getattr(model, k)!r}'
        for k in SHAPE_FIELDS
        if k in saved and saved[k] != getattr(model, k)
    ]
    if differ:
        raise UserError(
            f'save_dir {save_dir} holds a run with another model shape '
            f'({", ".join(differ)}): use a new --config.save_dir or the saved values'
        )
    # Another optimizer has another state tree: its checkpoints cannot restore into this one.
    if saved.get('optimizer', 'adamw') != optimizer:
        raise UserError(
            f'save_dir {save_dir} was trained with optimizer '
            f'{saved.get("optimizer", "adamw")!r}, not {optimizer!r}: resume '
            'with the saved optimizer or use a new --config.save_dir'
        )


def check_platform(model_config: ThinkerConfig, platform: str) -> None:
    """The attention kernel must run on the devices of the run ('cudnn' needs a GPU, ...)."""
    try:
        attention_kernels.check_platform(model_config.attention_impl, platform)
    except ValueError as e:
        raise UserError(str(e)) from None
