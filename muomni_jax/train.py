"""Stage A: pretrain the Thinker by next-token prediction (the shape of Flax's lm1b train.py).

`train_step` and `eval_step` are pure functions of (state, batch), jitted once with explicit
shardings over the mesh. `train_and_evaluate(config)` is the loop around them; the launcher and a
notebook call the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from muomni_jax import checkpointing
from muomni_jax import input_pipeline
from muomni_jax import partitioning
from muomni_jax import reporting
from muomni_jax import tokenizer as tokenizer_lib
from muomni_jax import training_log
from muomni_jax.errors import UserError
from muomni_jax.thinker import Thinker, ThinkerConfig, count_params

# Fields that fix the shape of the saved parameters; a resumed run must match them.
MODEL_SHAPE_FIELDS = ('vocab_size', 'n_layers', 'd_model', 'n_heads', 'd_ff', 'use_gqa',
                      'kv_groups', 'use_swiglu', 'use_moe', 'num_experts')


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer updates done.
    params: nnx.State  # The Thinker's parameters, float32.
    opt_state: optax.OptState
    rng: jax.Array  # (2,) uint32 dropout key; each step folds in its step number.


# ----------------------------------------------------------------------------------------------
# Optimizer and loss


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warmup to learning_rate, then cosine decay to min_lr_ratio * learning_rate."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.learning_rate * config.min_lr_ratio)


def weight_decay_mask(params: nnx.State) -> Any:
    """Decay matrices only: norm scales, biases and the token embedding are exempt."""

    def decays(path, x) -> bool:
        return x.ndim >= 2 and not any(getattr(k, 'key', None) == 'tok_emb' for k in path)

    return jax.tree.map_with_path(decays, params)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """clip -> AdamW, wrapped so a step with NaN/Inf gradients leaves params and moments as they were.

    apply_if_finite would apply updates again after max_consecutive_errors bad steps; we set it
    out of reach and let the training loop stop the run instead.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(learning_rate_schedule(config, total_steps), b1=config.adam_b1,
                    b2=config.adam_b2, weight_decay=config.weight_decay, mask=weight_decay_mask))
    return optax.apply_if_finite(tx, max_consecutive_errors=2**30)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Masked next-token loss in float32.

    Args:
      logits: (B, T, V); targets: (B, T) int; weights: (B, T) float, 0 where masked.
    Returns:
      (sum of weighted token losses, sum of weights), both () float32.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(losses * weights), jnp.sum(weights)


# ----------------------------------------------------------------------------------------------
# Pure steps


def init_state(rng: jax.Array, model_config: ThinkerConfig, tx: optax.GradientTransformation
               ) -> TrainState:
    params_rng, dropout_rng = jax.random.split(rng)
    _, params = nnx.split(Thinker(model_config, rngs=nnx.Rngs(params=params_rng)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=dropout_rng)


def _loss_fn(params, batch, dropout_key, graphdef, deterministic: bool):
    model = nnx.merge(graphdef, params)
    logits = model(batch['inputs'], segment_ids=batch['segment_ids'],
                   positions=batch['positions'], deterministic=deterministic,
                   rngs=nnx.Rngs(dropout=dropout_key))
    return cross_entropy(logits, batch['targets'], batch['weights'])


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, accumulation_steps: int, deterministic: bool
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update over a global batch of (B, T) arrays, in accumulation_steps micro-batches.

    Gradients are summed over micro-batches and divided by the total weight, so the update equals
    the update on the whole batch at once.
    """
    # Micro-batch j takes rows j, j + A, j + 2A, ...: every micro-batch spans every batch shard.
    micro = jax.tree.map(
        lambda x: x.reshape(-1, accumulation_steps, *x.shape[1:]).swapaxes(0, 1), batch)
    step_key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)

    def accumulate(carry, xs):
        index, micro_batch = xs
        (loss_sum, weight_sum), grads = grad_fn(
            state.params, micro_batch, jax.random.fold_in(step_key, index), graphdef,
            deterministic)
        return jax.tree.map(jnp.add, carry, (grads, loss_sum, weight_sum)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
    (grads, loss_sum, weight_sum), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(accumulation_steps), micro))
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight_sum, 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss_sum': loss_sum,
        'weight_sum': weight_sum,
        'grad_norm': optax.tree.norm(grads),
        'nonfinite': 1 - opt_state.last_finite.astype(jnp.int32),
        'steps': jnp.ones((), jnp.int32),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
              ) -> dict[str, jax.Array]:
    loss_sum, weight_sum = _loss_fn(params, batch, jax.random.key(0), graphdef, True)
    return {'loss_sum': loss_sum, 'weight_sum': weight_sum}


def _add_metrics(total, metrics):
    return metrics if total is None else jax.tree.map(jnp.add, total, metrics)


# ----------------------------------------------------------------------------------------------
# The loop


def validate_config(config) -> ThinkerConfig:
    """Checks every training field up front, so a bad value fails before anything is written."""
    try:
        model_config = ThinkerConfig.from_config(config)
        model_config.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    positive = ('batch_size', 'num_epochs', 'gradient_accumulation_steps', 'log_every',
                'eval_every', 'save_every')
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
    if config.max_grad_norm <= 0:
        raise UserError(f'max_grad_norm ({config.max_grad_norm}) must be > 0')
    reporting.parse_profile_steps(config.profile_steps)
    return model_config


def _check_writable(path: str) -> None:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'save_dir {path} is not writable ({existing} denies writes): choose '
                        'another --config.save_dir')


def _check_same_model(config, save_dir: str) -> None:
    """A save_dir written with another model shape must not be resumed into this one."""
    path = os.path.join(save_dir, 'config.json')
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    differ = [f'{k} {saved.get(k)!r} -> {config[k]!r}' for k in MODEL_SHAPE_FIELDS
              if k in saved and saved[k] != config[k]]
    if differ:
        raise UserError(f'save_dir {save_dir} holds a run with another model shape '
                        f'({", ".join(differ)}): use a new --config.save_dir or the saved values')


def _load_or_train_tokenizer(config, train_docs) -> tuple[tokenizer_lib.Tokenizer, bool]:
    """Returns (tokenizer, whether it was newly trained and still needs saving)."""
    saved = os.path.join(config.save_dir, 'tokenizer.model')
    path = config.tokenizer_path or (saved if os.path.exists(saved) else '')
    if path:
        tokenizer = tokenizer_lib.Tokenizer.load(path)
        trained = False
    else:
        print(f'Training a {config.vocab_size}-piece BPE tokenizer on the training text...')
        tokenizer = tokenizer_lib.train_tokenizer(
            input_pipeline.document_texts(train_docs), config.vocab_size,
            config.tokenizer_sample_size)
        trained = True
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f'tokenizer {path} has {tokenizer.vocab_size} pieces but vocab_size is '
                        f'{config.vocab_size}: set --config.vocab_size={tokenizer.vocab_size} or '
                        'use a new save_dir')
    return tokenizer, trained


def _format_duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f'{hours}h {rest // 60:02d}m {rest % 60:02d}s'


def _devices_line(mesh) -> str:
    devices = jax.devices()
    kind = devices[0].platform if devices[0].platform == 'cpu' else devices[0].device_kind
    count = f'{len(devices)} device{"s" if len(devices) > 1 else ""}'
    if jax.process_count() > 1:
        count += f' over {jax.process_count()} processes'
    axes = ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())
    return f'Using device: {kind} ({count}); mesh {axes}'


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once by train_and_evaluate."""
    config: Any
    mesh: Any
    train_split: input_pipeline.PackedSplit
    val_split: input_pipeline.PackedSplit
    steps_per_epoch: int
    total_steps: int
    p_train_step: Any
    p_eval_step: Any
    batch_sharding: Any


def train_and_evaluate(config) -> dict[str, float]:
    """Runs Stage A as configured; resumes from save_dir if it holds checkpoints.

    Returns the final train and validation metrics.
    """
    start_time = time.time()
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    model_config = validate_config(config)
    save_dir = config.save_dir
    _check_writable(save_dir)
    _check_same_model(config, save_dir)

    # Data: everything that can reject the input runs before save_dir is touched.
    source = f'TFDS {config.tfds_name}/{config.tfds_split}' if config.tfds_name else config.data_path
    log(f'Loading data from {source}...')
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_docs = input_pipeline.documents(config, 'train', **shard)
    tokenizer, tokenizer_is_new = _load_or_train_tokenizer(config, train_docs)
    log(f'Vocab size: {tokenizer.vocab_size}')
    train_split = input_pipeline.pack(train_docs, tokenizer, config.ctx_len)
    val_split = input_pipeline.pack(
        input_pipeline.documents(config, 'validation', **shard), tokenizer, config.ctx_len)
    if train_split.num_documents == 0:
        raise UserError(f'{source} holds no training text (empty, blank lines only, or all in '
                        'validation): point data_path at a text file with one document per line')
    log(f'Training samples: {train_split.num_documents:,} documents ({train_split.num_tokens:,} '
        f'tokens); validation: {val_split.num_documents:,} documents '
        f'({val_split.num_tokens:,} tokens)')

    mesh = partitioning.make_mesh(config.mesh)
    partitioning.check_batch_size(config.batch_size, mesh, config.gradient_accumulation_steps)
    local_batch = config.batch_size // jax.process_count()
    steps_per_epoch = input_pipeline.steps_per_epoch(train_split, local_batch)
    if steps_per_epoch == 0:
        raise UserError(f'the training split packs into {train_split.num_windows} windows of '
                        f'{config.ctx_len} tokens, fewer than one batch of {local_batch}: lower '
                        'batch_size or ctx_len, or add text')
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    # Model and optimizer state, laid out on the mesh.
    tx = make_optimizer(config, total_steps)
    abstract_state = jax.eval_shape(
        functools.partial(init_state, model_config=model_config, tx=tx), jax.random.PRNGKey(0))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Thinker(model_config, rngs=nnx.Rngs(0))))
    state_sharding = partitioning.state_shardings(mesh, abstract_state)
    log(f'Initializing Thinker ({count_params(abstract_state.params) / 1e6:.1f}M parameters)...')
    log(_devices_line(mesh))

    checkpointer = checkpointing.Checkpointer(save_dir, max_to_keep=config.max_to_keep)
    restored = checkpointer.restore_latest(
        checkpointing.abstract_with_shardings(abstract_state, state_sharding), config.restore_step)
    if restored is None:
        state = jax.jit(functools.partial(init_state, model_config=model_config, tx=tx),
                        out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
        start_step = 0
    else:
        state, meta = restored
        start_step = int(meta['step'])
        if meta.get('steps_per_epoch') != steps_per_epoch:
            raise UserError(f'the checkpoint in {save_dir} was trained with {meta.get("steps_per_epoch")} '
                            f'steps per epoch, this data and batch_size give {steps_per_epoch}: '
                            'resume with the same data and batch_size, or use a new save_dir')
        log(f'Resuming from checkpoint step {start_step} (epoch {meta["epoch"] + 1}).')
    if is_main:
        os.makedirs(save_dir, exist_ok=True)
        if tokenizer_is_new:
            tokenizer.save(os.path.join(save_dir, 'tokenizer.model'))
        with open(os.path.join(save_dir, 'config.json'), 'w') as f:
            f.write(config.to_json_best_effort(indent=1, sort_keys=True))

    batch_sharding = partitioning.batch_sharding(mesh)
    p_train_step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx,
                          accumulation_steps=config.gradient_accumulation_steps,
                          deterministic=model_config.dropout == 0),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, partitioning.replicated(mesh)),
        donate_argnums=0)
    p_eval_step = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                          in_shardings=(state_sharding.params, batch_sharding))
    run = _Run(config=config, mesh=mesh, train_split=train_split, val_split=val_split,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               p_train_step=p_train_step, p_eval_step=p_eval_step, batch_sharding=batch_sharding)
    reporter = reporting.Reporter(
        save_dir, total_steps=total_steps, start_step=start_step, enabled=is_main,
        profile_steps=reporting.parse_profile_steps(config.profile_steps))
    try:
        summary = _train_loop(run, state, start_step, checkpointer, reporter, is_main)
    finally:
        reporter.close()
        checkpointer.close()
    log(f'Training complete! Time: {_format_duration(time.time() - start_time)}')
    if 'val_ppl' in summary:
        log(f'Final validation PPL: {summary["val_ppl"]:.2f}')
    return summary


def _batches(run: _Run, epoch: int, start: int) -> Iterator[dict[str, jax.Array]]:
    local = input_pipeline.train_batches(
        run.train_split, run.config.batch_size // jax.process_count(), seed=run.config.seed,
        epoch=epoch, start_step=start, num_steps=run.steps_per_epoch)
    for batch in local:
        yield partitioning.global_batch(batch, run.batch_sharding)


def evaluate(run: _Run, params: nnx.State) -> dict[str, float]:
    """Mean loss and perplexity over the validation windows (all, or the first eval_batches)."""
    local_batch = run.config.batch_size // jax.process_count()
    num_batches = -(-run.val_split.num_windows // local_batch)
    if run.config.eval_batches:
        num_batches = min(num_batches, run.config.eval_batches)
    total = None
    for batch in input_pipeline.eval_batches(run.val_split, local_batch, num_batches):
        total = _add_metrics(total, run.p_eval_step(params, partitioning.global_batch(
            batch, run.batch_sharding)))
    if total is None or float(total['weight_sum']) == 0:
        return {}
    loss = float(total['loss_sum']) / float(total['weight_sum'])
    return {'val_loss': loss, 'val_ppl': math.exp(min(loss, 50.0))}


def _train_loop(run: _Run, state: TrainState, start_step: int, checkpointer,
                reporter: reporting.Reporter, is_main: bool) -> dict[str, float]:
    config = run.config
    log = reporter.log
    schedule = learning_rate_schedule(config, run.total_steps)
    history = training_log.TrainingLog(os.path.join(config.save_dir, 'training_log.json'),
                                       resume_step=start_step)
    tokens_per_step = config.batch_size * config.ctx_len
    step, summary, last_saved, history_changed = start_step, {}, start_step, False
    if step >= run.total_steps:
        log(f'Nothing to do: save_dir is already at step {step} of {run.total_steps}.')
    log('Starting training...')
    interval_metrics, interval_start, run_start = None, time.time(), time.time()
    epoch = step // run.steps_per_epoch
    while step < run.total_steps:
        log(f'Epoch {epoch + 1}/{config.num_epochs}:')
        for batch in _batches(run, epoch, step - epoch * run.steps_per_epoch):
            state, metrics = run.p_train_step(state, batch)
            interval_metrics = _add_metrics(interval_metrics, metrics)
            step += 1
            reporter.advance(step, state)
            if step % config.log_every == 0 or step == run.total_steps:
                m = jax.device_get(interval_metrics)
                elapsed = time.time() - interval_start
                loss = float(m['loss_sum']) / max(float(m['weight_sum']), 1.0)
                summary = {'loss': loss, 'ppl': math.exp(min(loss, 50.0))}
                record = dict(
                    epoch=epoch + 1, loss=loss, ppl=summary['ppl'], lr=float(schedule(step - 1)),
                    grad_norm=float(m['grad_norm']) / int(m['steps']),
                    tokens=step * tokens_per_step,
                    tokens_per_s=tokens_per_step * int(m['steps']) / elapsed,
                    elapsed_s=time.time() - run_start, nonfinite_steps=int(m['nonfinite']))
                history.add(step, **record)
                reporter.write_scalars(step, record)
                history_changed = True
                log(f'[Step {step}/{run.total_steps}] loss={loss:.3f} ppl={summary["ppl"]:.1f} '
                    f'lr={record["lr"]:.5f} | {elapsed / int(m["steps"]):.2f}s/step | '
                    f'{record["tokens_per_s"]:,.0f} tok/s')
                consecutive = int(jax.device_get(state.opt_state.notfinite_count))
                if consecutive >= config.max_consecutive_nonfinite:
                    raise UserError(
                        f'{consecutive} consecutive steps had NaN/Inf loss or gradients (params '
                        f'were left unchanged; last checkpoint: step {last_saved}): lower '
                        'learning_rate or check the data')
                interval_metrics, interval_start = None, time.time()
            if step % config.eval_every == 0 or step == run.total_steps:
                eval_start = time.time()
                val = evaluate(run, state.params)
                if val:
                    summary.update(val)
                    history.add(step, **val)
                    reporter.write_scalars(step, val)
                    prefix = 'Final validation' if step == run.total_steps else 'Validation'
                    log(f'→ {prefix}: loss={val["val_loss"]:.3f} ppl={val["val_ppl"]:.1f}')
                    history_changed = True
                # Validation time is not training time: keep it out of s/step and tokens/s.
                interval_start += time.time() - eval_start
            if step % config.save_every == 0 or step == run.total_steps:
                checkpointer.save(step, state, {
                    'step': step, 'epoch': step // run.steps_per_epoch,
                    'step_in_epoch': step % run.steps_per_epoch,
                    'steps_per_epoch': run.steps_per_epoch})
                last_saved = step
                log(f'✓ Saved checkpoint: step {step} ({os.path.join(config.save_dir, str(step))})')
            if is_main and history_changed:
                history.write()
                history_changed = False
            if step >= run.total_steps:
                break
        epoch += 1
    return summary
