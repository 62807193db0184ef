"""Whole checkpoints to and from other formats (launch.convert): the original μOmni's files
and Hugging Face model folders.

original_format.py and hf_format.py map the weights and read and write the files;
checkpointing.py writes the save_dir. This module joins them: one step of a save_dir -> a
.pt/.safetensors file or a Hugging Face folder, and either of those -> a new save_dir at step 0.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.inference import loading
from muomni_jax.interop import hf_format, original_format
from muomni_jax.io import run_dir, storage
from muomni_jax.model.thinker import ThinkerConfig
from muomni_jax.training import checkpointing, run_plan, steps

FORMATS = ('original', 'hf')
_NEEDS_TOKENIZER = (
    'an imported checkpoint needs the tokenizer.model the weights were trained '
    'with: pass --tokenizer'
)


def export_checkpoint(
    checkpoint_dir: str,
    output: str,
    step: int | None = None,
    output_format: str | None = None,
    weights: str = 'auto',
) -> list[str]:
    """One step of a save_dir (default: the newest) -> `output`: the original's format (a .pt or
    .safetensors file) or a Hugging Face folder (output_format='hf'). Without output_format, an
    output that ends in / or is an existing folder is a Hugging Face one. weights: as
    loading.load's (auto: the moving average where the run kept one)."""
    if output_format is None:
        output_format = 'hf' if output.endswith('/') or os.path.isdir(output) else 'original'
    if output_format not in FORMATS:
        raise UserError(f'unknown format {output_format!r}: choose one of {", ".join(FORMATS)}')
    hf = output_format == 'hf'
    ckpt = loading.load(checkpoint_dir, step, need_tokenizer=hf, weights=weights)
    config = ThinkerConfig.from_config(ckpt.config)
    if hf:
        return hf_format.write_hf(output, ckpt.params, config, ckpt.tokenizer)
    warning = original_format.original_compatibility_warning(config)
    if warning:
        print(f'Warning: {warning}', file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return original_format.write_weights(output, ckpt.params, config)


def import_weights(
    source: str, save_dir: str, tokenizer_path: str | None, base_config: Any, seed: int = 0
) -> ThinkerConfig:
    """Makes a save_dir from the original's weights file or a Hugging Face folder (`source` a
    directory), as step 0 of a run with a fresh optimizer, so that launch.sample,
    launch.evaluate, the notebook and launch.stage_a (training further) all take it.
    base_config: a full training config (e.g. configs/tiny.py); its model fields supply what
    the source cannot show and are replaced by the source's. A Hugging Face folder's own
    tokenizer.model serves when tokenizer_path is empty."""
    storage.check_writable(save_dir)
    checkpointing.check_new_save_dir(save_dir)  # Before reading the weights, not after.
    hf = os.path.isdir(source)
    if not tokenizer_path and not hf:
        raise UserError(_NEEDS_TOKENIZER)
    base_fields = {k: base_config[k] for k in original_format.UNSEEN_FIELDS if k in base_config}
    tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path) if tokenizer_path else None
    if hf:
        model_config, params, found = hf_format.read_hf(source, base_fields)
        if tokenizer is None and found is None:
            raise UserError(f'{source} has no tokenizer.model: ' + _NEEDS_TOKENIZER)
        tokenizer_path = tokenizer_path or os.path.join(source, hf_format.TOKENIZER_FILE)
        tokenizer = tokenizer or found
    else:
        model_config, params = original_format.read_weights(source, base_fields)
    _check_config_describes(model_config, base_config, source)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise UserError(
            f'{tokenizer_path} has {tokenizer.vocab_size} pieces but the weights have '
            f'vocab_size {model_config.vocab_size}: pass the matching tokenizer'
        )
    config = base_config.copy_and_resolve_references()
    config.update({k: getattr(model_config, k) for k in original_format.CONFIG_FIELDS})
    config.save_dir = save_dir
    # The optimizer's tree does not depend on the schedule.
    state = steps.state_from_params(
        params, steps.make_optimizer(run_plan.resolve(config).optimizer, 1), seed
    )
    checkpointing.write_step_zero(save_dir, state, config)
    tokenizer.save(run_dir.tokenizer_path(save_dir))
    return model_config


def _check_config_describes(model_config: ThinkerConfig, base_config: Any, source: str) -> None:
    """Refuses weights whose model fields differ from --config's: a later run of launch.stage_a
    with the same --config would build another model than the one imported."""
    differ = {
        k: getattr(model_config, k)
        for k in original_format.CONFIG_FIELDS
        if k in base_config and base_config[k] != getattr(model_config, k)
    }
    if differ:
        found = ', '.join(f'{k} {v!r} (--config: {base_config[k]!r})' for k, v in differ.items())
        overrides = ' '.join(f'--config.{k}={v}' for k, v in differ.items())
        raise UserError(
            f'{source} holds a Thinker that --config does not describe: {found}. Give the same '
            f'overrides to this import and to launch.stage_a: {overrides}'
        )
