"""The pure training computation: state, optimizer, steps, and their layout on a mesh.

No I/O and no loop: `make_train_setup(plan, mesh, total_steps)` gives the state (or only its
abstract shape, to restore onto), its shardings and the jitted `train_step` / `eval_step`. The
trainer, the benchmark, weight import and the tests build their steps here, so a change to the
optimizer is made once; the loss itself is model/lm_loss.py's, which inference shares.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from muomni_jax.model import attention_kernels, lm_loss
from muomni_jax.model.thinker import Thinker, ThinkerConfig, abstract_model
from muomni_jax.parallel import partitioning
from muomni_jax.training import run_plan

# metrics['nonfinite_limit_step'] when the non-finite limit was not reached.
NO_STEP = np.iinfo(np.int32).max


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer updates done.
    params: nnx.State  # The Thinker's parameters, float32.
    opt_state: optax.OptState
    rng: jax.Array  # (2,) uint32 dropout key; each step folds in its step number.


@flax.struct.dataclass
class AveragedTrainState(TrainState):
    """The state of a run with ema_decay > 0. A class of its own, so the tree of a run without
    the average is exactly the tree every earlier checkpoint holds."""

    # The exponential moving average of params after each finite update (the initial params
    # at step 0); float32, laid out like params.
    ema_params: nnx.State


def with_average(state: TrainState, ema_params: Any) -> AveragedTrainState:
    return AveragedTrainState(
        step=state.step,
        params=state.params,
        opt_state=state.opt_state,
        rng=state.rng,
        ema_params=ema_params,
    )


def without_average(state: TrainState) -> TrainState:
    return TrainState(
        step=state.step, params=state.params, opt_state=state.opt_state, rng=state.rng
    )


# ----------------------------------------------------------------------------------------------
# Optimizer. A new optimizer goes in make_optimizer: the state tree follows from it.


def learning_rate_schedule(config: run_plan.OptimizerPlan, total_steps: int) -> optax.Schedule:
    """The rate of each update, as a function of the updates before it (optax's count): update k
    of k = 1..total_steps uses schedule(k - 1), and the log shows that rate at step k.

    A linear warmup from 0 over warmup_steps (update k: learning_rate * (k - 1) / warmup_steps,
    as the original's LambdaLR), then a decay towards min_lr_ratio * learning_rate:
    - 'cosine': a cosine over the updates after warmup that reaches the floor at count
      total_steps, one past the last update (the original's offset, kept so that the same steps
      give the same rates; the last update is slightly above the floor).
    - 'wsd' (warmup-stable-decay): the peak rate until the last decay_fraction of the steps,
      then a linear decay whose last update is exactly at the floor. A run can be extended or
      cut without changing its stable phase, and the decay can start from any step.
    A run no longer than warmup_steps + 1 ends in (or at the end of) its warmup and never
    decays, as the original's does; `short_run_note` says so at start-up.
    """
    warmup = config.warmup_steps
    peak, end = config.learning_rate, config.learning_rate * config.min_lr_ratio
    if config.lr_schedule == 'cosine':
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=end,
        )
    decay_start = max(warmup, total_steps - round(config.decay_fraction * total_steps))
    decay_updates = total_steps - 1 - decay_start  # Counts decay_start+1 .. total_steps-1.
    phases = [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)]
    boundaries = [warmup]
    if decay_updates > 0:
        phases.append(optax.linear_schedule(peak, end, decay_updates))
        boundaries.append(decay_start)
    return optax.join_schedules(phases, boundaries=boundaries)


def short_run_note(config: run_plan.OptimizerPlan, total_steps: int) -> str | None:
    """One line for a run too short to decay (total_steps <= warmup_steps + 1), else None."""
    if not config.warmup_steps or total_steps > config.warmup_steps + 1:
        return None
    last = float(learning_rate_schedule(config, total_steps)(total_steps - 1))
    return (
        f"Schedule: warmup_steps={config.warmup_steps} fills this run's {total_steps} "
        f'steps, so the rate rises to {last:.3g} (learning_rate {config.learning_rate:g}) '
        'and never decays; for a warmup and a decay, lower --config.warmup_steps (e.g. '
        f'{max(total_steps // 10, 1)}).'
    )


def weight_decay_mask(params: nnx.State) -> Any:
    """Decay matrices only: norm scales, biases and the token embedding are exempt."""

    def decays(path, x) -> bool:
        return x.ndim >= 2 and not any(getattr(k, 'key', None) == 'tok_emb' for k in path)

    return jax.tree.map_with_path(decays, params)


def is_muon_matrix(path, x) -> bool:
    """The block matrices Muon updates (attention and MLP kernels); not the embedding, the norms,
    the lm_head or an MoE router, which keep AdamW as in the Muon papers."""
    names = [getattr(k, 'key', None) for k in path]
    return 'blocks' in names and 'router' not in names and x.ndim == 2


def make_optimizer(
    config: run_plan.OptimizerPlan, total_steps: int
) -> optax.GradientTransformation:
    """clip -> AdamW (or Muon for the block matrices, AdamW for the rest), wrapped so a step with
    NaN/Inf gradients leaves params and moments as they were.

    apply_if_finite would apply updates again after max_consecutive_errors bad steps; we set it
    out of reach and let the training loop stop the run instead.
    """
    return _optimizer(config, learning_rate_schedule(config, total_steps))


def _optimizer(
    config: run_plan.OptimizerPlan, schedule: optax.Schedule
) -> optax.GradientTransformation:
    adamw = optax.adamw(
        schedule,
        b1=config.adam_b1,
        b2=config.adam_b2,
        weight_decay=config.weight_decay,
        mask=weight_decay_mask,
    )
    if config.optimizer == 'muon':
        # consistent_rms=0.2 scales each orthogonalized update to AdamW's typical RMS (Moonlight,
        # arXiv:2502.16982), so one learning rate and schedule serve both parts.
        muon = optax.contrib.muon(
            schedule,
            beta=config.muon_momentum,
            weight_decay=config.weight_decay,
            consistent_rms=0.2,
        )
        labels = lambda params: jax.tree.map_with_path(
            lambda path, x: 'muon' if is_muon_matrix(path, x) else 'adamw', params
        )
        adamw = optax.partition({'muon': muon, 'adamw': adamw}, labels)
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return optax.apply_if_finite(tx, max_consecutive_errors=2**30)


# ----------------------------------------------------------------------------------------------
# Pure steps


def init_state(
    rng: jax.Array, model_config: ThinkerConfig, tx: optax.GradientTransformation, ema: bool = False
) -> TrainState:
    params_rng, dropout_rng = jax.random.split(rng)
    _, params = nnx.split(Thinker(model_config, rngs=nnx.Rngs(params=params_rng)))
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_rng
    )
    return with_average(state, copy_tree(params)) if ema else state


def copy_tree(tree):
    """A copy with buffers of its own (the train step donates the state's)."""
    return jax.tree.map(jnp.copy, tree)


def state_from_params(
    params: nnx.State, tx: optax.GradientTransformation, seed: int = 0, ema: bool = False
) -> TrainState:
    """Step 0 of a run that starts from given params (an import) with a fresh optimizer."""
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )
    return with_average(state, copy_tree(params)) if ema else state


def _summed_gradients(
    state: TrainState,
    batch: dict[str, jax.Array],
    graphdef: nnx.GraphDef,
    accumulation_steps: int,
    deterministic: bool,
    loss_chunk_tokens: int,
    z_loss_weight: float,
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the summed (not averaged) loss over a (B, T) batch, in accumulation_steps
    micro-batches, with the sums {'loss_sum', 'weight_sum', 'z_sum'} (scalars)."""
    # Micro-batch j takes rows j, j + A, j + 2A, ...: every micro-batch spans every batch shard.
    micro = jax.tree.map(
        lambda x: x.reshape(-1, accumulation_steps, *x.shape[1:]).swapaxes(0, 1), batch
    )
    step_key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(lm_loss.batch_loss, has_aux=True)

    def accumulate(carry, xs):
        index, micro_batch = xs
        (_, sums), grads = grad_fn(
            state.params,
            micro_batch,
            jax.random.fold_in(step_key, index),
            graphdef,
            deterministic,
            loss_chunk_tokens,
            z_loss_weight,
        )
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = (
        jax.tree.map(jnp.zeros_like, state.params),
        {k: jnp.zeros(()) for k in ('loss_sum', 'weight_sum', 'z_sum')},
    )
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accumulation_steps), micro))
    return grads, sums


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    accumulation_steps: int,
    deterministic: bool,
    max_consecutive_nonfinite: int = 0,
    loss_chunk_tokens: int = 0,
    z_loss_weight: float = 0.0,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update over a global batch of (B, T) arrays, in accumulation_steps
    micro-batches.

    Gradients are summed over micro-batches and divided by the total weight, so the update equals
    the update on the whole batch at once. A step with NaN/Inf loss or gradients changes nothing
    but the step and the optimizer's non-finite counters; its loss and gradient norm count as 0 in
    the metrics. metrics['nonfinite_limit_step'] is the step number once max_consecutive_nonfinite
    such steps have come in a row (else NO_STEP), so the loop learns the exact step without
    reading the device every step.
    """
    grads, sums = _summed_gradients(
        state, batch, graphdef, accumulation_steps, deterministic, loss_chunk_tokens, z_loss_weight
    )
    loss_sum, weight_sum = sums['loss_sum'], sums['weight_sum']
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight_sum, 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = opt_state.last_finite
    streak_done = (max_consecutive_nonfinite > 0) & (
        opt_state.notfinite_count >= max_consecutive_nonfinite
    )
    metrics = {
        'loss_sum': jnp.where(finite, loss_sum, 0.0),
        'weight_sum': jnp.where(finite, weight_sum, 0.0),
        'grad_norm': jnp.where(finite, optax.tree.norm(grads), 0.0),
        'nonfinite': 1 - finite.astype(jnp.int32),
        'nonfinite_limit_step': jnp.where(streak_done, state.step + 1, NO_STEP),
        'steps': jnp.ones((), jnp.int32),
    }
    if z_loss_weight:  # The mean logsumexp^2 that the z-loss pulls toward 0.
        metrics['z_sum'] = jnp.where(finite, sums['z_sum'], 0.0)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if ema_decay:
        # A skipped (non-finite) step leaves params, hence the average, as they were.
        new_state = new_state.replace(
            ema_params=jax.tree.map(
                lambda e, p: jnp.where(finite, ema_decay * e + (1.0 - ema_decay) * p, e),
                state.ema_params,
                params,
            )
        )
    return new_state, metrics


def add_metrics(total, metrics):
    """Sums metrics over steps; nonfinite_limit_step keeps the earliest step instead."""
    if total is None:
        return metrics
    # A key the total lacks (z_sum, after a resume that turned z-loss on) starts at this step.
    return {
        k: (jnp.minimum if k == 'nonfinite_limit_step' else jnp.add)(total[k], v)
        if k in total
        else v
        for k, v in metrics.items()
    }


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ----------------------------------------------------------------------------------------------
# The steps laid out on a mesh


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What make_train_setup returns: the state and everything that runs it on the mesh."""

    state: TrainState | None  # Initialised from the plan's seed; None: asked for the shape only.
    abstract_state: TrainState  # ShapeDtypeStructs carrying state_shardings: restore onto it.
    state_shardings: TrainState  # NamedSharding per leaf (partitioning.state_shardings).
    graphdef: nnx.GraphDef
    total_steps: int  # The schedule's length.
    schedule: optax.Schedule  # The learning rate of update k + 1 at k (the log's lr column).
    tx: optax.GradientTransformation
    model_config: ThinkerConfig
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]  # (state, batch), jitted.
    eval_step: Callable[..., dict[str, jax.Array]]  # (params, batch), jitted.
    init: Callable[[jax.Array], TrainState]  # PRNG key -> state, jitted onto state_shardings.


def make_train_setup(
    plan: run_plan.RunPlan, mesh, total_steps: int | None = None, *, initialize: bool = True
) -> TrainSetup:
    """The Thinker's train state for a plan, laid out on the mesh, with its jitted steps.

    total_steps sets the learning-rate schedule (default: the plan's; the state's tree does not
    depend on it). initialize=False skips making the state: a resumed run restores onto
    abstract_state instead.
    """
    total_steps = plan.length.total_steps if total_steps is None else total_steps
    schedule = learning_rate_schedule(plan.optimizer, total_steps)
    tx = _optimizer(plan.optimizer, schedule)
    init = functools.partial(
        init_state, model_config=plan.model, tx=tx, ema=bool(plan.step.ema_decay)
    )
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = partitioning.state_shardings(mesh, abstract)
    graphdef, _ = abstract_model(plan.model)
    jitted_init = jax.jit(init, out_shardings=shardings)
    train, evaluate = _jit_steps(plan, mesh, graphdef, tx, shardings)
    return TrainSetup(
        state=jitted_init(jax.random.PRNGKey(plan.step.seed)) if initialize else None,
        abstract_state=jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        ),
        state_shardings=shardings,
        graphdef=graphdef,
        total_steps=total_steps,
        schedule=schedule,
        tx=tx,
        model_config=plan.model,
        train_step=train,
        eval_step=evaluate,
        init=jitted_init,
    )


def with_length(setup: TrainSetup, plan: run_plan.RunPlan, mesh) -> TrainSetup:
    """The setup for a plan of another length (a fitted one): the train step jitted again with
    its schedule. The state's shapes and shardings, eval_step and init are kept: none depends
    on the length (the optimizer's state is the same tree at any length)."""
    total_steps = plan.length.total_steps
    schedule = learning_rate_schedule(plan.optimizer, total_steps)
    tx = _optimizer(plan.optimizer, schedule)
    train, _ = _jit_steps(plan, mesh, setup.graphdef, tx, setup.state_shardings)
    return dataclasses.replace(
        setup, state=None, total_steps=total_steps, schedule=schedule, tx=tx, train_step=train
    )


def _jit_steps(
    plan: run_plan.RunPlan,
    mesh,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    state_sharding: Any,
) -> tuple[Any, Any]:
    """train_step and eval_step jitted over the mesh: state as laid out, batch rows split over
    every device, metrics replicated."""
    batch_sharding = partitioning.batch_sharding(mesh)
    metrics_sharding = partitioning.replicated(mesh)
    step = plan.step
    # on_mesh: the attention kernels are compiled for the mesh's devices and split its rows.
    p_train_step = jax.jit(
        attention_kernels.on_mesh(
            mesh,
            functools.partial(
                train_step,
                graphdef=graphdef,
                tx=tx,
                accumulation_steps=step.gradient_accumulation_steps,
                deterministic=plan.model.dropout == 0,
                max_consecutive_nonfinite=step.max_consecutive_nonfinite,
                loss_chunk_tokens=step.loss_chunk_tokens,
                z_loss_weight=step.z_loss_weight,
                ema_decay=step.ema_decay,
            ),
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metrics_sharding),
        donate_argnums=0,
    )
    p_eval_step = jax.jit(
        attention_kernels.on_mesh(
            mesh,
            functools.partial(
                lm_loss.eval_step, graphdef=graphdef, loss_chunk_tokens=step.loss_chunk_tokens
            ),
        ),
        in_shardings=(state_sharding.params, batch_sharding),
        out_shardings=metrics_sharding,
    )
    return p_train_step, p_eval_step
