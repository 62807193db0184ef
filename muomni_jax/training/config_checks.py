"""Checks of a training config that run before anything is written: every field's range, the
names it picks from, and a save_dir that holds another model shape or optimizer.
"""

import json

from etils import epath

from muomni_jax.data import mixture
from muomni_jax.errors import UserError, first_line
from muomni_jax.io import storage
from muomni_jax.model import attention_kernels
from muomni_jax.model.thinker import SHAPE_FIELDS, ThinkerConfig
from muomni_jax.training import reporting
from muomni_jax.training import steps


def validate_config(config) -> ThinkerConfig:
    """Checks every training field up front, so a bad value fails before anything is written."""
    try:
        model_config = ThinkerConfig.from_config(config)
        model_config.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    positive = ('batch_size', 'num_epochs', 'gradient_accumulation_steps', 'log_every',
                'eval_every', 'save_every', 'max_consecutive_nonfinite')
    for name in positive:
        if config[name] <= 0:
            raise UserError(f'{name} ({config[name]}) must be positive')
    if not config.learning_rate > 0:
        raise UserError(f'learning_rate ({config.learning_rate}) must be > 0, e.g. 3e-4')
    if config.max_steps < 0 or config.warmup_steps < 0 or config.eval_batches < 0:
        raise UserError('max_steps, warmup_steps and eval_batches must be >= 0 (0 means unset)')
    if not 0 <= config.val_split < 1:
        raise UserError(f'val_split ({config.val_split}) must be in [0, 1)')
    if config.tokenizer_sample_size <= 100:
        raise UserError(f'tokenizer_sample_size ({config.tokenizer_sample_size}) must be > 100 '
                        '(a SentencePiece limit)')
    if config.loss_chunk_tokens < 0 or config.peak_flops_per_device < 0:
        raise UserError('loss_chunk_tokens and peak_flops_per_device must be >= 0 (0: plain loss, '
                        'and the peak from the device table or a measurement)')
    for name, allowed in (('optimizer', steps.OPTIMIZERS), ('lr_schedule', steps.SCHEDULES)):
        if config[name] not in allowed:
            raise UserError(f'{name} {config[name]!r} is not one of {", ".join(allowed)}')
    if not 0 < config.decay_fraction <= 1:
        raise UserError(f'decay_fraction ({config.decay_fraction}) must be in (0, 1]')
    if config.max_train_seconds < 0:
        raise UserError(f'max_train_seconds ({config.max_train_seconds}) must be >= 0 (0: no '
                        'time budget)')
    schedule_seconds = config.get('schedule_seconds', 0)
    if schedule_seconds < 0:
        raise UserError(f'schedule_seconds ({schedule_seconds}) must be >= 0 (0: the schedule '
                        'follows max_steps or num_epochs)')
    if schedule_seconds and config.lr_schedule == 'cosine' and config.warmup_steps < 3:
        raise UserError(f'schedule_seconds times steps during warmup, so that a cosine schedule '
                        f'fitted afterwards gives exactly the rates those steps used: set '
                        f'warmup_steps >= 3 (it is {config.warmup_steps}), or '
                        "lr_schedule='wsd'")
    if not 0 <= config.get('ema_decay', 0.0) < 1:
        raise UserError(f'ema_decay ({config.ema_decay}) must be in [0, 1), e.g. 0.999 (0: no '
                        'average)')
    if config.get('z_loss_weight', 0.0) < 0:
        raise UserError(f'z_loss_weight ({config.z_loss_weight}) must be >= 0, e.g. 1e-4')
    if config.max_grad_norm <= 0:
        raise UserError(f'max_grad_norm ({config.max_grad_norm}) must be > 0')
    if reporting.parse_profile_steps(config.profile_steps) and storage.is_url(config.save_dir):
        # jax.profiler writes its trace with local file calls.
        raise UserError('profile_steps needs a local save_dir (jax.profiler cannot write to '
                        f'{config.save_dir}): profile a short run with a local save_dir')
    storage.check_supported(config.tokenizer_path, 'tokenizer_path')
    reporting.check_wandb_installed(config.wandb_project)
    if storage.is_url(config.cache_dir):
        raise UserError(f'cache_dir {config.cache_dir} must be a local folder (the token cache is '
                        'memory-mapped): give a local path, or leave it empty for the default')
    mixture.sources(config)  # A mixture string that does not parse fails here.
    return model_config


def check_same_model(config, save_dir: str) -> None:
    """A save_dir written with another model shape or optimizer must not be resumed into this."""
    path = epath.Path(save_dir) / 'config.json'
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError('not a JSON object')
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f'{path} is damaged ({first_line(e, 200)}), so this run cannot check '
                        'that save_dir holds its model shape: restore it, or move it aside to '
                        'resume without that check (the run writes it again)') from None
    differ = [f'{k} {saved.get(k)!r} -> {config[k]!r}' for k in SHAPE_FIELDS
              if k in saved and saved[k] != config[k]]
    if differ:
        raise UserError(f'save_dir {save_dir} holds a run with another model shape '
                        f'({", ".join(differ)}): use a new --config.save_dir or the saved values')
    # Another optimizer has another state tree: its checkpoints cannot restore into this one.
    if saved.get('optimizer', 'adamw') != config.optimizer:
        raise UserError(f'save_dir {save_dir} was trained with optimizer '
                        f'{saved.get("optimizer", "adamw")!r}, not {config.optimizer!r}: resume '
                        'with the saved optimizer or use a new --config.save_dir')


def check_platform(model_config: ThinkerConfig, platform: str) -> None:
    """The attention kernel must run on the devices of the run ('cudnn' needs a GPU, ...)."""
    try:
        attention_kernels.check_platform(model_config.attention_impl, platform)
    except ValueError as e:
        raise UserError(str(e)) from None
