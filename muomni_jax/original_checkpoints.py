"""Whole checkpoints to and from the original μOmni's files (launch.convert).

original_format.py maps state_dict <-> params and reads and writes the files; checkpointing.py
writes the save_dir. This module joins them: one step of a save_dir -> a .pt/.safetensors file,
and such a file -> a new save_dir at step 0.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from etils import epath

from muomni_jax import checkpointing
from muomni_jax import loading
from muomni_jax import original_format
from muomni_jax import steps
from muomni_jax import storage
from muomni_jax import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.thinker import ThinkerConfig


def export_checkpoint(checkpoint_dir: str, output: str, step: int | None = None) -> list[str]:
    """One step of a save_dir (default: the newest) -> the original's format at `output`."""
    ckpt = loading.load(checkpoint_dir, step, need_tokenizer=False)
    config = ThinkerConfig.from_config(ckpt.config)
    warning = original_format.original_compatibility_warning(config)
    if warning:
        print(f'Warning: {warning}', file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return original_format.write_weights(output, ckpt.params, config)


def import_weights(source: str, save_dir: str, tokenizer_path: str, base_config: Any,
                   seed: int = 0) -> ThinkerConfig:
    """Makes a save_dir from the original's weights, as step 0 of a run with a fresh optimizer,
    so that launch.sample, launch.evaluate, the notebook and launch.stage_a (training further)
    all take it. base_config: a full training config (e.g. configs/tiny.py); its model fields
    supply what the file cannot show and are replaced by the file's."""
    storage.check_writable(save_dir)
    if epath.Path(save_dir).exists() and any(epath.Path(save_dir).iterdir()):
        raise UserError(f'save_dir {save_dir} is not empty: import into a new folder')
    if not tokenizer_path:
        raise UserError('an imported checkpoint needs the tokenizer.model the weights were '
                        'trained with: pass --tokenizer')
    tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
    base_fields = {k: base_config[k] for k in original_format.UNSEEN_FIELDS if k in base_config}
    model_config, params = original_format.read_weights(source, base_fields)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise UserError(f'{tokenizer_path} has {tokenizer.vocab_size} pieces but the weights have '
                        f'vocab_size {model_config.vocab_size}: pass the matching tokenizer')
    config = base_config.copy_and_resolve_references()
    config.update({k: getattr(model_config, k) for k in original_format.CONFIG_FIELDS})
    config.save_dir = save_dir
    # The optimizer's tree does not depend on the schedule.
    state = steps.state_from_params(params, steps.make_optimizer(config, 1), seed)
    checkpointing.write_step_zero(save_dir, state, config)
    tokenizer.save(os.path.join(save_dir, 'tokenizer.model'))
    return model_config
