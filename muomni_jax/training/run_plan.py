"""A run, planned once: `resolve(config)` checks the config and returns a frozen, typed RunPlan.

The launcher parses the ConfigDict (configs/*.py and --config.* flags); this is the one place
that reads it. Every layer below gets its own part of the plan: the model its ThinkerConfig, the
data layer its DataPlan, the steps the optimizer and step parts. The defaults are the config
files' (configs/tiny.py), so every field is read as given.

The run's length needs the data: `with_steps_per_epoch` fills it in once the data is loaded, and
a length fitted to schedule_seconds (schedule_fit.py) or read back from a checkpoint gives a new
plan through `with_total_steps`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from muomni_jax.data import data_plan, host_data, mixture
from muomni_jax.errors import UserError
from muomni_jax.io import storage
from muomni_jax.model.thinker import ThinkerConfig
from muomni_jax.training import reporting

SCHEDULES = ('cosine', 'wsd')
OPTIMIZERS = ('adamw', 'muon')


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
    """The optimizer and its learning-rate schedule (steps.make_optimizer)."""

    optimizer: str  # One of OPTIMIZERS.
    learning_rate: float  # Peak rate.
    lr_schedule: str  # One of SCHEDULES.
    decay_fraction: float  # WSD: the last fraction of the steps that decays.
    warmup_steps: int
    min_lr_ratio: float  # The decay's floor, a fraction of learning_rate.
    weight_decay: float
    adam_b1: float
    adam_b2: float
    muon_momentum: float
    max_grad_norm: float


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one training step computes, besides the model and the optimizer."""

    batch_size: int  # Global windows per optimizer step.
    gradient_accumulation_steps: int  # Micro-batches per step.
    loss_chunk_tokens: int  # Fused lm_head and loss over chunks of about this many tokens.
    z_loss_weight: float
    ema_decay: float  # 0: no average of the params.
    max_consecutive_nonfinite: int  # NaN/Inf steps in a row that stop the run.
    seed: int  # Parameter init and dropout (the data order's is DataPlan.seed, the same).


@dataclasses.dataclass(frozen=True)
class LengthPlan:
    """How long the run trains. steps_per_epoch and total_steps are 0 until the data is loaded."""

    num_epochs: int
    max_steps: int  # 0: no limit but num_epochs.
    max_train_seconds: float  # One launch's time budget; 0: none.
    schedule_seconds: float  # The whole run's time the schedule is fitted to; 0: off.
    steps_per_epoch: int = 0
    total_steps: int = 0  # The schedule's length: num_epochs, max_steps or the fitted length.
    fitted: bool = False  # total_steps was fitted to schedule_seconds (checkpoints keep it).


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """What a run writes and shows: logs, validations, samples, checkpoints and the profile."""

    save_dir: str
    log_every: int
    eval_every: int
    save_every: int
    max_to_keep: int
    restore_step: int  # 0: the newest complete checkpoint.
    sample_prompts: str  # '|'-separated; '' for none.
    sample_max_new_tokens: int
    profile_steps: tuple[int, int] | None  # The first and last step traced, or None.
    wandb_project: str  # '': off.
    peak_flops_per_device: float  # 0: from the device table, or measured on a CPU.
    compilation_cache: bool
    compilation_cache_dir: str  # '': JAX's setting, else the default.


@dataclasses.dataclass(frozen=True)
class RunPlan:
    model: ThinkerConfig
    data: data_plan.DataPlan
    optimizer: OptimizerPlan
    step: StepPlan
    length: LengthPlan
    output: OutputPlan
    mesh: Mapping[str, int]  # Axis sizes, e.g. {'data': -1, 'fsdp': 1}; -1 fills.
    # The config as given, for config.json and W&B (never read by the run itself).
    config_fields: Mapping[str, Any]


# Long as a table is long: one statement per plan section, each copying its fields.
def resolve(config) -> RunPlan:
    """Checks every field up front, so a bad value fails before anything is written; the plan.

    Raises UserError naming the field and a fix. Needs jax.distributed initialized (the data
    shards are checked against the processes).
    """
    try:
        model = ThinkerConfig.from_config(config)
        model.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    _check_fields(config)
    if config.mixture:
        sources = tuple(mixture.parse(config.mixture))  # A string that does not parse fails here.
    else:
        sources = (
            mixture.Source(
                'data',
                1.0,
                data_path=config.data_path,
                tfds_name=config.tfds_name,
                tfds_split=config.tfds_split,
                tfds_text_key=config.tfds_text_key,
            ),
        )
    data = data_plan.DataPlan(
        sources=sources,
        is_mixture=bool(config.mixture),
        text_key=config.text_key,
        val_split=config.val_split,
        tfds_data_dir=config.tfds_data_dir,
        cache_dir=config.cache_dir,
        num_shards=host_data.num_shards(config.data_shards, config.batch_size),
        batch_size=config.batch_size,
        ctx_len=model.ctx_len,
        eval_batches=config.eval_batches,
        seed=config.seed,
        tokenizer_path=config.tokenizer_path,
        tokenizer_sample_size=config.tokenizer_sample_size,
        vocab_size=model.vocab_size,
    )
    optimizer = OptimizerPlan(
        **{field.name: config[field.name] for field in dataclasses.fields(OptimizerPlan)}
    )
    step = StepPlan(**{field.name: config[field.name] for field in dataclasses.fields(StepPlan)})
    length = LengthPlan(
        num_epochs=config.num_epochs,
        max_steps=config.max_steps,
        max_train_seconds=config.max_train_seconds,
        schedule_seconds=config.schedule_seconds,
    )
    output = OutputPlan(
        **{
            field.name: config[field.name]
            for field in dataclasses.fields(OutputPlan)
            if field.name != 'profile_steps'
        },
        profile_steps=reporting.parse_profile_steps(config.profile_steps),
    )
    return RunPlan(
        model=model,
        data=data,
        optimizer=optimizer,
        step=step,
        length=length,
        output=output,
        mesh={axis: config.mesh[axis] for axis in config.mesh.keys()},
        config_fields=config.to_dict(),
    )


def with_steps_per_epoch(plan: RunPlan, steps_per_epoch: int) -> RunPlan:
    """The plan once the data is loaded: its epochs' length, and the run's (num_epochs, cut at
    max_steps)."""
    total_steps = steps_per_epoch * plan.length.num_epochs
    if plan.length.max_steps:
        total_steps = min(total_steps, plan.length.max_steps)
    return dataclasses.replace(
        plan,
        length=dataclasses.replace(
            plan.length, steps_per_epoch=steps_per_epoch, total_steps=total_steps
        ),
    )


def with_total_steps(plan: RunPlan, total_steps: int) -> RunPlan:
    """The plan with its length fitted to schedule_seconds (now, or by an earlier launch)."""
    return dataclasses.replace(
        plan, length=dataclasses.replace(plan.length, total_steps=total_steps, fitted=True)
    )


# A list of independent checks, one per field or pair of fields, read top to bottom.
def _check_fields(config) -> None:
    """Every training field's range and the names it picks from."""
    positive = (
        'batch_size',
        'num_epochs',
        'gradient_accumulation_steps',
        'log_every',
        'eval_every',
        'save_every',
        'max_consecutive_nonfinite',
    )
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
        raise UserError(
            f'tokenizer_sample_size ({config.tokenizer_sample_size}) must be > 100 '
            '(a SentencePiece limit)'
        )
    if config.loss_chunk_tokens < 0 or config.peak_flops_per_device < 0:
        raise UserError(
            'loss_chunk_tokens and peak_flops_per_device must be >= 0 (0: plain loss, '
            'and the peak from the device table or a measurement)'
        )
    for name, allowed in (('optimizer', OPTIMIZERS), ('lr_schedule', SCHEDULES)):
        if config[name] not in allowed:
            raise UserError(f'{name} {config[name]!r} is not one of {", ".join(allowed)}')
    if not 0 < config.decay_fraction <= 1:
        raise UserError(f'decay_fraction ({config.decay_fraction}) must be in (0, 1]')
    if config.max_train_seconds < 0:
        raise UserError(
            f'max_train_seconds ({config.max_train_seconds}) must be >= 0 (0: no time budget)'
        )
    if config.schedule_seconds < 0:
        raise UserError(
            f'schedule_seconds ({config.schedule_seconds}) must be >= 0 (0: the '
            'schedule follows max_steps or num_epochs)'
        )
    if config.schedule_seconds and config.lr_schedule == 'cosine' and config.warmup_steps < 3:
        raise UserError(
            f'schedule_seconds times steps during warmup, so that a cosine schedule '
            f'fitted afterwards gives exactly the rates those steps used: set '
            f'warmup_steps >= 3 (it is {config.warmup_steps}), or '
            "lr_schedule='wsd'"
        )
    if not 0 <= config.ema_decay < 1:
        raise UserError(
            f'ema_decay ({config.ema_decay}) must be in [0, 1), e.g. 0.999 (0: no average)'
        )
    if config.z_loss_weight < 0:
        raise UserError(f'z_loss_weight ({config.z_loss_weight}) must be >= 0, e.g. 1e-4')
    if config.max_grad_norm <= 0:
        raise UserError(f'max_grad_norm ({config.max_grad_norm}) must be > 0')
    if reporting.parse_profile_steps(config.profile_steps) and storage.is_url(config.save_dir):
        # jax.profiler writes its trace with local file calls.
        raise UserError(
            'profile_steps needs a local save_dir (jax.profiler cannot write to '
            f'{config.save_dir}): profile a short run with a local save_dir'
        )
    storage.check_supported(config.tokenizer_path, 'tokenizer_path')
    reporting.check_wandb_installed(config.wandb_project)
    if storage.is_url(config.cache_dir):
        raise UserError(
            f'cache_dir {config.cache_dir} must be a local folder (the token cache is '
            'memory-mapped): give a local path, or leave it empty for the default'
        )
