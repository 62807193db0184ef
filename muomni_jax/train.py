"""Stage A: pretrain the Thinker by next-token prediction (the shape of Flax's lm1b train.py).

`train_step` and `eval_step` are pure functions of (state, batch), jitted once with explicit
shardings over the mesh. `train_and_evaluate(config)` is the loop around them; the launcher and a
notebook call the same function.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import tempfile
import time
from typing import Any, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from muomni_jax import checkpointing
from muomni_jax import distributed
from muomni_jax import flops
from muomni_jax import host_data
from muomni_jax import input_pipeline
from muomni_jax import lm_loss
from muomni_jax import partitioning
from muomni_jax import preemption
from muomni_jax import reporting
from muomni_jax import sampling
from muomni_jax import tokenizer as tokenizer_lib
from muomni_jax import training_log
from muomni_jax.atomic_write import write_atomically
from muomni_jax.errors import UserError
from muomni_jax.thinker import Thinker, ThinkerConfig, count_params

# Fields that fix the shape of the saved parameters; a resumed run must match them.
MODEL_SHAPE_FIELDS = ('vocab_size', 'n_layers', 'd_model', 'n_heads', 'd_ff', 'use_gqa',
                      'kv_groups', 'use_swiglu', 'use_moe', 'num_experts')
# metrics['nonfinite_limit_step'] when the non-finite limit was not reached.
NO_STEP = np.iinfo(np.int32).max


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


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


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


def _loss_fn(params, batch, dropout_key, graphdef, deterministic: bool,
             loss_chunk_tokens: int = 0):
    """(loss sum, weight sum); loss_chunk_tokens > 0 fuses lm_head and loss (lm_loss.py)."""
    model = nnx.merge(graphdef, params)
    inputs = dict(segment_ids=batch['segment_ids'], positions=batch['positions'],
                  deterministic=deterministic, rngs=nnx.Rngs(dropout=dropout_key))
    if loss_chunk_tokens:
        hidden = model.hidden_states(batch['inputs'], **inputs)
        return lm_loss.chunked_cross_entropy(hidden, model.lm_head.kernel[...], batch['targets'],
                                             batch['weights'], loss_chunk_tokens)
    logits = model(batch['inputs'], **inputs)
    return cross_entropy(logits, batch['targets'], batch['weights'])


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, accumulation_steps: int, deterministic: bool,
               max_consecutive_nonfinite: int = 0, loss_chunk_tokens: int = 0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update over a global batch of (B, T) arrays, in accumulation_steps micro-batches.

    Gradients are summed over micro-batches and divided by the total weight, so the update equals
    the update on the whole batch at once. A step with NaN/Inf loss or gradients changes nothing
    but the step and the optimizer's non-finite counters; its loss and gradient norm count as 0 in
    the metrics. metrics['nonfinite_limit_step'] is the step number once max_consecutive_nonfinite
    such steps have come in a row (else NO_STEP), so the loop learns the exact step without
    reading the device every step.
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
            deterministic, loss_chunk_tokens)
        return jax.tree.map(jnp.add, carry, (grads, loss_sum, weight_sum)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
    (grads, loss_sum, weight_sum), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(accumulation_steps), micro))
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight_sum, 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = opt_state.last_finite
    streak_done = (max_consecutive_nonfinite > 0) & (
        opt_state.notfinite_count >= max_consecutive_nonfinite)
    metrics = {
        'loss_sum': jnp.where(finite, loss_sum, 0.0),
        'weight_sum': jnp.where(finite, weight_sum, 0.0),
        'grad_norm': jnp.where(finite, optax.tree.norm(grads), 0.0),
        'nonfinite': 1 - finite.astype(jnp.int32),
        'nonfinite_limit_step': jnp.where(streak_done, state.step + 1, NO_STEP),
        'steps': jnp.ones((), jnp.int32),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
              loss_chunk_tokens: int = 0) -> dict[str, jax.Array]:
    loss_sum, weight_sum = _loss_fn(params, batch, jax.random.key(0), graphdef, True,
                                    loss_chunk_tokens)
    return {'loss_sum': loss_sum, 'weight_sum': weight_sum}


def _add_metrics(total, metrics):
    """Sums metrics over steps; nonfinite_limit_step keeps the earliest step instead."""
    if total is None:
        return metrics
    return {k: (jnp.minimum if k == 'nonfinite_limit_step' else jnp.add)(total[k], v)
            for k, v in metrics.items()}


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
    if config.max_grad_norm <= 0:
        raise UserError(f'max_grad_norm ({config.max_grad_norm}) must be > 0')
    reporting.parse_profile_steps(config.profile_steps)
    return model_config


def _check_writable(path: str) -> None:
    """Fails unless save_dir can be created and written; leaves no trace when it can."""
    if '://' in path:
        raise UserError(f'save_dir {path} is a URL, which is not supported: give a local path, or '
                        'mount the bucket (e.g. with gcsfuse) at the same path on every host')
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f'save_dir {path} cannot be created: {existing} is a file, not a '
                        'directory; choose another --config.save_dir')
    try:
        # A real write, not os.access: it also catches read-only mounts, and root ignores modes.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f'save_dir {path} is not writable ({existing}: {e.strerror}): choose '
                        'another --config.save_dir') from None


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


def load_or_train_tokenizer(config) -> tokenizer_lib.Tokenizer:
    """tokenizer_path's model, else save_dir's, else one trained on the training text."""
    saved = os.path.join(config.save_dir, 'tokenizer.model')
    path = config.tokenizer_path or (saved if os.path.exists(saved) else '')
    if path:
        tokenizer = tokenizer_lib.Tokenizer.load(path)
        if path != saved and os.path.exists(saved) and (
                tokenizer_lib.Tokenizer.load(saved).model_proto != tokenizer.model_proto):
            raise UserError(f'save_dir {config.save_dir} holds a run with another tokenizer than '
                            f'tokenizer_path {path}: use a new --config.save_dir, or drop '
                            'tokenizer_path to resume with the saved one')
    else:
        # All the training text, not one shard: the vocabulary must not depend on the processes.
        texts = input_pipeline.documents(config, 'train')
        first = next(texts, None)
        if first is None:
            raise UserError(_no_text_message(config))
        print(f'Training a {config.vocab_size}-piece BPE tokenizer on the training text...')
        tokenizer = tokenizer_lib.train_tokenizer(
            itertools.chain([first], texts), config.vocab_size, config.tokenizer_sample_size,
            seed=config.seed)
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f'tokenizer {path} has {tokenizer.vocab_size} pieces but vocab_size is '
                        f'{config.vocab_size}: set --config.vocab_size={tokenizer.vocab_size} or '
                        'use a new save_dir')
    return tokenizer


def _no_text_message(config) -> str:
    source = f'TFDS {config.tfds_name}/{config.tfds_split}' if config.tfds_name else config.data_path
    return (f'{source} holds no training text (empty, blank lines only, or all in validation): '
            'point data_path at a text file with one document per line')


def _shared_tokenizer(config) -> tokenizer_lib.Tokenizer:
    """Process 0 loads or trains the tokenizer and every process gets its model."""
    proto = distributed.run_on_main(lambda: load_or_train_tokenizer(config).model_proto)
    return tokenizer_lib.Tokenizer(proto)


def _format_duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f'{hours}h {rest // 60:02d}m {rest % 60:02d}s'


def _devices_line(mesh) -> str:
    devices = list(mesh.devices.flat)
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
    data: host_data.HostData
    steps_per_epoch: int
    total_steps: int
    p_train_step: Any
    p_eval_step: Any
    batch_sharding: Any
    sampler: Any  # params -> sample lines to print after validation, or None.
    flops_per_step: float  # Model FLOPs of one optimizer step (flops.py).
    peak_flops: float | None  # Peak FLOP/s of all devices, for MFU; None: MFU not logged.


def train_and_evaluate(config, devices: list[jax.Device] | None = None) -> dict[str, float]:
    """Runs Stage A as configured; resumes from save_dir if it holds checkpoints.

    Args:
      config: a configs/tiny.py-style ConfigDict.
      devices: the devices to train on; default all. A multi-process run (after
        distributed.initialize, which the launcher calls) must use all of them.
    Returns the final train and validation metrics.
    """
    start_time = time.time()
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    # Every check that can reject the input runs before save_dir is touched, and a check that
    # fails on one host stops them all.
    with distributed.fail_together():
        model_config = validate_config(config)
        save_dir = config.save_dir
        _check_writable(save_dir)
        _check_same_model(config, save_dir)
        mesh = partitioning.make_mesh(config.mesh, devices)
        partitioning.check_batch_size(config.batch_size, mesh, config.gradient_accumulation_steps)
        host_data.num_shards(config)

    source = f'TFDS {config.tfds_name}/{config.tfds_split}' if config.tfds_name else config.data_path
    log(f'Loading data from {source}...')
    tokenizer = _shared_tokenizer(config)
    log(f'Vocab size: {tokenizer.vocab_size}')
    sampler = sampling.training_sampler(config, model_config, tokenizer)
    data = host_data.load(config, tokenizer, log)
    totals = data.totals
    log(f'Training samples: {totals["train_documents"]:,} documents '
        f'({totals["train_tokens"]:,} tokens); validation: {totals["validation_documents"]:,} '
        f'documents ({totals["validation_tokens"]:,} tokens)')
    steps_per_epoch = data.steps_per_epoch
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
    if jax.process_count() > 1:
        print(distributed.describe(mesh), flush=True)

    checkpointer = checkpointing.Checkpointer(save_dir, max_to_keep=config.max_to_keep)
    restored = checkpointer.restore_latest(
        checkpointing.abstract_with_shardings(abstract_state, state_sharding), config.restore_step)
    if restored is None:
        state = jax.jit(functools.partial(init_state, model_config=model_config, tx=tx),
                        out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
        start_step, interval = 0, None
    else:
        state, meta = restored
        start_step, interval = int(meta['step']), meta.get('interval_metrics')
        # Step 0 (an imported checkpoint, see launch.convert) has no data position to keep.
        if start_step and meta.get('steps_per_epoch') != steps_per_epoch:
            raise UserError(f'the checkpoint in {save_dir} was trained with '
                            f'{meta.get("steps_per_epoch")} steps per epoch, this data and '
                            f'batch_size give {steps_per_epoch}: '
                            'resume with the same data, batch_size and data_shards (0 means one '
                            'per process), or use a new save_dir')
        log(f'Resuming from checkpoint step {start_step} (epoch {meta["epoch"] + 1}).')
    if is_main:
        os.makedirs(save_dir, exist_ok=True)
        _keep_tokenizer(save_dir, tokenizer)
        write_atomically(os.path.join(save_dir, 'config.json'),
                          config.to_json_best_effort(indent=1, sort_keys=True))
    checkpointer.start_writing(start_step)

    p_train_step, p_eval_step = jit_steps(config, model_config, mesh, graphdef, tx,
                                          state_sharding)
    flops_per_token = flops.flops_per_token(model_config)['total']
    peak_flops, peak_source = flops.system_peak_flops(config.peak_flops_per_device,
                                                      devices=list(mesh.devices.flat))
    if peak_flops:
        log(f'Model FLOPs: {flops_per_token / 1e6:.1f} MFLOP/token; MFU against '
            f'{peak_flops / 1e12:.3g} TFLOP/s ({peak_source})')
    run = _Run(config=config, mesh=mesh, data=data, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, p_train_step=p_train_step, p_eval_step=p_eval_step,
               batch_sharding=partitioning.batch_sharding(mesh), sampler=sampler,
               flops_per_step=flops_per_token * config.batch_size * config.ctx_len,
               peak_flops=peak_flops)
    reporter = reporting.Reporter(
        save_dir, total_steps=total_steps, start_step=start_step, enabled=is_main,
        profile_steps=reporting.parse_profile_steps(config.profile_steps))
    try:
        summary, stopped_by = _train_loop(run, state, start_step, interval, checkpointer,
                                          reporter, is_main)
    finally:
        reporter.close()
        checkpointer.close()
    if stopped_by:
        return summary
    log(f'Training complete! Time: {_format_duration(time.time() - start_time)}')
    if 'val_ppl' in summary:
        log(f'Final validation PPL: {summary["val_ppl"]:.2f}')
    return summary


def prepare_data(config) -> dict[str, int]:
    """The tokenizer and token cache of a run, without training (launch.prepare_data).

    On one machine with the later run's data_shards it builds every shard, so a pod only opens
    the cache; on every host of a pod it builds each host's own shards. Returns the split totals.
    """
    with distributed.fail_together():
        validate_config(config)
        _check_writable(config.save_dir)
        host_data.num_shards(config)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    tokenizer = _shared_tokenizer(config)
    data = host_data.load(config, tokenizer, log)
    if is_main:  # Last, so a bad input leaves save_dir untouched.
        _keep_tokenizer(config.save_dir, tokenizer)
    totals = data.totals
    log(f'Ready: {totals["train_tokens"]:,} training and {totals["validation_tokens"]:,} '
        f'validation tokens in {host_data.num_shards(config)} data shard(s); the tokenizer is in '
        f'{config.save_dir}.')
    return totals


def _keep_tokenizer(save_dir: str, tokenizer: tokenizer_lib.Tokenizer) -> None:
    """Copies the tokenizer into save_dir (also one from tokenizer_path), so that save_dir alone
    is enough to sample, evaluate and resume."""
    path = os.path.join(save_dir, 'tokenizer.model')
    if not os.path.exists(path):
        tokenizer.save(path)


def jit_steps(config, model_config: ThinkerConfig, mesh, graphdef: nnx.GraphDef,
              tx: optax.GradientTransformation, state_sharding: Any) -> tuple[Any, Any]:
    """train_step and eval_step jitted over the mesh: state as laid out, batch rows split over
    every device, metrics replicated."""
    batch_sharding = partitioning.batch_sharding(mesh)
    metrics_sharding = partitioning.replicated(mesh)
    p_train_step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx,
                          accumulation_steps=config.gradient_accumulation_steps,
                          deterministic=model_config.dropout == 0,
                          max_consecutive_nonfinite=config.max_consecutive_nonfinite,
                          loss_chunk_tokens=config.loss_chunk_tokens),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metrics_sharding),
        donate_argnums=0)
    p_eval_step = jax.jit(functools.partial(eval_step, graphdef=graphdef,
                                            loss_chunk_tokens=config.loss_chunk_tokens),
                          in_shardings=(state_sharding.params, batch_sharding),
                          out_shardings=metrics_sharding)
    return p_train_step, p_eval_step


def _batches(run: _Run, epoch: int, start: int) -> Iterator[dict[str, jax.Array]]:
    batches = run.data.train_batches(run.config.seed, epoch, start)
    yield from prefetch((partitioning.global_batch(batch, run.batch_sharding) for batch in batches),
                        _PREFETCH_BATCHES)


# Batches placed on the devices ahead of the step that reads them; transfers are asynchronous.
_PREFETCH_BATCHES = 2


def prefetch(iterator: Iterator[Any], size: int) -> Iterator[Any]:
    """Yields the iterator's items while keeping `size` more already made (device-placed)."""
    queue = collections.deque()
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def evaluate(run: _Run, params: nnx.State) -> dict[str, float]:
    """Mean loss and perplexity over the validation windows (all, or eval_batches per shard)."""
    total = None
    for batch in run.data.validation_batches():
        total = _add_metrics(total, run.p_eval_step(params, partitioning.global_batch(
            batch, run.batch_sharding)))
    if total is None or float(total['weight_sum']) == 0:
        return {}
    loss = float(total['loss_sum']) / float(total['weight_sum'])
    return {'val_loss': loss, 'val_ppl': perplexity(loss)}


def _train_loop(run: _Run, state: TrainState, start_step: int, interval: dict | None,
                checkpointer, reporter: reporting.Reporter, is_main: bool
                ) -> tuple[dict[str, float], str | None]:
    """Trains from start_step to run.total_steps, or until a signal asks to stop.

    `interval` is the restored metric sums of a log interval cut by the checkpoint, so logged
    losses after a resume equal those of an uninterrupted run. Returns the final metrics and
    the name of the signal that stopped the run (None when it ran to the end).
    """
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
    # Replicated like the step's metrics, so multi-process runs add global arrays to global arrays.
    interval_metrics = None if interval is None else {
        k: jax.device_put(np.asarray(v, np.int32 if isinstance(v, int) else np.float32),
                          partitioning.replicated(run.mesh))
        for k, v in interval.items()}
    interval_start, interval_steps, run_start = time.time(), 0, time.time()
    epoch = step // run.steps_per_epoch
    with preemption.StopSignals(sync_every=config.log_every) as signals:
        while step < run.total_steps:
            log(f'Epoch {epoch + 1}/{config.num_epochs}:')
            for batch in _batches(run, epoch, step - epoch * run.steps_per_epoch):
                state, metrics = run.p_train_step(state, batch)
                interval_metrics = _add_metrics(interval_metrics, metrics)
                step += 1
                interval_steps += 1
                reporter.advance(step, state)
                stop = signals.should_stop(step)
                if step % config.log_every == 0 or step == run.total_steps:
                    m = jax.device_get(interval_metrics)
                    _check_nonfinite_limit(m, config, last_saved)
                    elapsed = time.time() - interval_start
                    record = _interval_record(m, epoch, tokens_per_step * interval_steps / elapsed,
                                              float(schedule(step - 1)), time.time() - run_start)
                    record['tokens'] = step * tokens_per_step  # Seen so far: plots against data.
                    summary = {'loss': record['loss'], 'ppl': record['ppl']}
                    mfu = ''
                    if run.peak_flops:
                        record['mfu'] = (run.flops_per_step * interval_steps / elapsed
                                         / run.peak_flops)
                        mfu = f' | MFU {100 * record["mfu"]:.1f}%'
                    history.add(step, **record)
                    reporter.write_scalars(step, record)
                    history_changed = True
                    skipped = (f' | {record["nonfinite_steps"]} non-finite steps skipped'
                               if record['nonfinite_steps'] else '')
                    log(f'[Step {step}/{run.total_steps}] loss={record["loss"]:.3f} '
                        f'ppl={record["ppl"]:.1f} lr={record["lr"]:.5f} | '
                        f'{elapsed / interval_steps:.2f}s/step | '
                        f'{record["tokens_per_s"]:,.0f} tok/s{mfu}{skipped}')
                    interval_metrics, interval_start, interval_steps = None, time.time(), 0
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
                    if run.sampler:  # Every process joins: the params may span them all.
                        samples = run.sampler(state.params)
                        for line in samples:
                            log(line)
                        reporter.write_texts(step, {f'samples/{i}': line.strip()
                                                    for i, line in enumerate(samples)})
                    # Validation time is not training time: keep it out of s/step and tokens/s.
                    interval_start += time.time() - eval_start
                if is_main and history_changed:
                    # Before any save: a checkpoint is never ahead of the log it resumes.
                    history.write()
                    history_changed = False
                if step % config.save_every == 0 or step == run.total_steps or stop:
                    interval = (None if interval_metrics is None
                                else jax.device_get(interval_metrics))
                    if interval is not None:
                        _check_nonfinite_limit(interval, config, last_saved)
                    if not bool(_all_finite(state.params)):
                        raise UserError(f'the params became NaN/Inf at step {step}, so it was not '
                                        f'saved (newest checkpoint: step {last_saved}): lower '
                                        'learning_rate or max_grad_norm')
                    checkpointer.save(step, state, {
                        'step': step, 'epoch': step // run.steps_per_epoch,
                        'step_in_epoch': step % run.steps_per_epoch,
                        'steps_per_epoch': run.steps_per_epoch,
                        'interval_metrics': None if interval is None else {
                            k: v.item() for k, v in interval.items()}})
                    last_saved = step
                    path = os.path.join(config.save_dir, str(step))
                    if stop:
                        checkpointer.wait()
                        log(f'✓ Saved checkpoint: step {step} ({path})')
                        log(f'Stopped by {signals.received} after step {step}/{run.total_steps}. '
                            'Rerun the same command to resume from this checkpoint.')
                        return summary, signals.received
                    log(f'✓ Saved checkpoint: step {step} ({path})')
                if step >= run.total_steps:
                    break
            epoch += 1
    return summary, None


def _interval_record(m: dict[str, Any], epoch: int, tokens_per_s: float, lr: float,
                     elapsed_s: float) -> dict[str, Any]:
    """A training_log record from the summed metrics of one log interval (host values)."""
    loss = float(m['loss_sum']) / max(float(m['weight_sum']), 1.0)
    finite_steps = max(int(m['steps']) - int(m['nonfinite']), 1)
    return dict(epoch=epoch + 1, loss=loss, ppl=perplexity(loss), lr=lr,
                grad_norm=float(m['grad_norm']) / finite_steps, tokens_per_s=tokens_per_s,
                elapsed_s=elapsed_s, nonfinite_steps=int(m['nonfinite']))


def _check_nonfinite_limit(m: dict[str, Any], config, last_saved: int) -> None:
    """Stops the run once max_consecutive_nonfinite steps in a row were NaN/Inf (host metrics)."""
    limit_step = int(m['nonfinite_limit_step'])
    if limit_step != NO_STEP:
        first = limit_step - config.max_consecutive_nonfinite + 1
        raise UserError(
            f'steps {first}-{limit_step} all had NaN/Inf loss or gradients '
            f'(max_consecutive_nonfinite={config.max_consecutive_nonfinite}); they were skipped '
            f'and nothing after them was saved (newest checkpoint: step {last_saved}): lower '
            'learning_rate, check the data, or raise max_consecutive_nonfinite')


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
