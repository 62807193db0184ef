"""Restore a trained Thinker for use: `load(checkpoint_dir)` -> (config, params, tokenizer).

Only the params subtree of a step's `state` item is read (an Orbax partial restore), so the
optimizer state, twice the size of the params, never leaves the disk. The params land on this
process's first device whatever mesh wrote them: a checkpoint from an 8-way fsdp pod run restores
on one CPU in a notebook. Needs no training data.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError, first_line
from muomni_jax.io import run_dir, storage
from muomni_jax.model.thinker import Thinker, ThinkerConfig
from muomni_jax.model.thinker import abstract_model as thinker_abstract_model


class Checkpoint(NamedTuple):
    """What `load` returns; unpacks as `config, params, tokenizer = load(...)`."""

    config: ml_collections.ConfigDict  # The run's whole config, as saved in config.json.
    params: nnx.State  # The Thinker's parameters, float32, on one device.
    tokenizer: tokenizer_lib.Tokenizer | None  # None only from load(..., need_tokenizer=False).

    def model(self) -> Thinker:
        """The Thinker with these params, ready to call or to sample from."""
        return nnx.merge(abstract_model(self.config)[0], self.params)


def abstract_model(config: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params as ShapeDtypeStructs) of the Thinker a config describes; no FLOPs."""
    model_config = ThinkerConfig.from_config(config)
    try:
        model_config.validate()
    except ValueError as e:
        raise UserError(f'the saved config is not a valid Thinker: {e}') from None
    return thinker_abstract_model(model_config)


def available_steps(checkpoint_dir: str) -> list[int]:
    """The complete checkpoint steps in a save_dir, oldest first.

    An unfinished save is not a step: locally Orbax writes it into a temporary folder, and on
    gs:// into the step's own folder, which it commits last with a commit_success.txt.
    """
    storage.check_supported(checkpoint_dir, 'checkpoint_dir')
    directory = epath.Path(checkpoint_dir)
    if not directory.is_dir():
        raise UserError(
            f'checkpoint_dir {checkpoint_dir} does not exist: point it at the '
            'save_dir of a launch.stage_a run'
        )
    return sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and (p / 'state').is_dir() and ocp.utils.is_checkpoint_finalized(p)
    )


def read_config(checkpoint_dir: str) -> ml_collections.ConfigDict:
    fields = run_dir.read_config(
        checkpoint_dir,
        if_damaged='restore it from the run that wrote it (launch.convert '
        '--input writes one for imported weights)',
    )
    if fields is None:
        raise UserError(
            f'{run_dir.config_path(checkpoint_dir)} is missing: checkpoint_dir must '
            'be a save_dir written by launch.stage_a or launch.convert'
        )
    return ml_collections.ConfigDict(fields)


WEIGHTS = ('auto', 'params', 'ema')


def has_average(checkpoint_dir: str, step: int) -> bool:
    """Whether the step holds the moving average of its params (a run with ema_decay > 0)."""
    path = epath.Path(checkpoint_dir) / str(step) / 'meta' / 'metadata'
    try:
        return bool(json.loads(path.read_text()).get('ema'))
    except (OSError, ValueError, AttributeError):
        return False  # Steps saved before the average existed have no such meta.


class StepDeleted(Exception):
    """The step was deleted while it was read (a live run keeps only max_to_keep steps)."""


def restore_params(
    checkpoint_dir: str,
    step: int,
    abstract_params: nnx.State,
    sharding: jax.sharding.Sharding,
    subtree: str = 'params',
) -> nnx.State:
    """Reads only `subtree` ('params', or 'ema_params': their average) from
    save_dir/<step>/state onto `sharding` (every leaf the same)."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_params
    )
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=sharding), target)
    path = epath.Path(storage.absolute(checkpoint_dir)) / str(step) / 'state'
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item={subtree: target},
                    restore_args={subtree: restore_args},
                    partial_restore=True,
                ),
            )
    except (ValueError, KeyError, OSError) as e:
        if not path.exists():
            raise StepDeleted(step) from None
        raise UserError(
            f'cannot restore the params of {path} ({first_line(e)}): is config.json '
            'the config it was trained with?'
        ) from None
    return restored[subtree]


def load(
    checkpoint_dir: str,
    step: int | None = None,
    *,
    need_tokenizer: bool = True,
    weights: str = 'auto',
) -> Checkpoint:
    """Restores the params of `step` (default: the newest) of a save_dir, with its config and
    tokenizer, onto this process's first device. Exporting weights needs no tokenizer: with
    need_tokenizer=False a save_dir without one loads too.

    weights: 'auto' (the default) gives the moving average of the params where the run kept
    one (ema_decay > 0: the user asked for it as the model; the run logged both validation
    losses), else the params; 'params' the trained params; 'ema' the average, or an error.
    """
    if weights not in WEIGHTS:
        raise UserError(f'weights={weights!r} is not one of {WEIGHTS}')
    steps = available_steps(checkpoint_dir)
    if not steps:
        raise UserError(
            f'checkpoint_dir {checkpoint_dir} holds no checkpoint steps: train with '
            'launch.stage_a first, or check the path'
        )
    asked_newest = step is None
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f'step {step} is not in {checkpoint_dir}: available steps are {steps}')
    config = read_config(checkpoint_dir)
    tokenizer_path = epath.Path(run_dir.tokenizer_path(checkpoint_dir))
    tokenizer = None
    if tokenizer_path.exists():
        tokenizer = tokenizer_lib.Tokenizer(tokenizer_path.read_bytes())
    elif need_tokenizer:
        raise UserError(
            f'{tokenizer_path} is missing: copy the tokenizer the model was trained with there'
        )
    _, abstract_params = abstract_model(config)
    # No lock: a live run may delete a step under this read (max_to_keep). The newest step is
    # then read again from a fresh listing; a named step is gone for good.
    while True:
        try:
            params = _read_weights(checkpoint_dir, step, abstract_params, weights)
            break
        except StepDeleted:
            now = available_steps(checkpoint_dir)
            if not asked_newest or not now:
                raise UserError(
                    f'step {step} of {checkpoint_dir} was deleted while it was read '
                    '(a live run keeps only its newest max_to_keep steps): available '
                    f'steps are now {now or "none"}'
                ) from None
            print(
                f'Checkpoint step {step} of {checkpoint_dir} was deleted while it was read (a '
                f'live run keeps its newest max_to_keep steps); reading step {now[-1]}.',
                file=sys.stderr,
            )
            step = now[-1]
    return Checkpoint(config=config, params=params, tokenizer=tokenizer)


def _read_weights(
    checkpoint_dir: str, step: int, abstract_params: nnx.State, weights: str
) -> nnx.State:
    """The params (or their average, as `weights` asks; see load) of one step, on this
    process's first device. Raises StepDeleted if the step is gone."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    average = has_average(checkpoint_dir, step)
    if weights == 'ema' and not average:
        if not (epath.Path(checkpoint_dir) / str(step)).exists():
            raise StepDeleted(step)
        raise UserError(
            f'step {step} of {checkpoint_dir} holds no moving average of its params '
            '(train with --config.ema_decay > 0): use weights=params or auto'
        )
    subtree = 'ema_params' if average and weights != 'params' else 'params'
    return restore_params(checkpoint_dir, step, abstract_params, sharding, subtree)
