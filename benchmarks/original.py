"""The original's training step (torch_reference, written from the spec) timed beside ours on
the same batch, interleaved: what launch.bench and launch.device_check report as the speed-up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from muomni_jax.model.thinker import ThinkerConfig
from muomni_jax.parallel import partitioning


@dataclasses.dataclass
class OriginalFigures:
    """The original's training step (torch_reference, written from the spec) timed beside ours,
    A B A B in one run, on the same batch: forward, loss, backward, clipping and AdamW."""

    available: bool
    reason: str = ''  # Why not, when unavailable (e.g. torch is not installed).
    torch: str = ''
    step_s: list[float] = dataclasses.field(default_factory=list)  # The original's steps.
    ours_step_s: list[float] = dataclasses.field(default_factory=list)  # Ours, interleaved.
    tokens_per_s: float = 0.0  # The original's, from its median step.
    ours_tokens_per_s: float = 0.0
    speedup: float = 0.0  # ours_tokens_per_s / tokens_per_s.
    recipe: dict = dataclasses.field(default_factory=dict)  # OriginalRecipe, as a dict.


@dataclasses.dataclass(frozen=True)
class OriginalRecipe:
    """How the original trains: on the CPU in float32 eager mode, or with its GPU recipe
    (thinker_tiny.json's use_amp, use_flash and use_compile)."""

    device: str = 'cpu'
    autocast_bfloat16: bool = False  # use_amp: torch.autocast(dtype=bfloat16).
    sdpa: bool = False  # use_flash: F.scaled_dot_product_attention.
    compile: bool = False  # use_compile: torch.compile of the model.

    @classmethod
    def gpu(cls) -> OriginalRecipe:
        return cls(device='cuda', autocast_bfloat16=True, sdpa=True, compile=True)


def compare_with_original(
    config,
    batch: dict[str, np.ndarray],
    state: Any,
    step: Callable,
    repeats: int,
    recipe: OriginalRecipe = OriginalRecipe(),
) -> tuple[OriginalFigures, Any]:
    """Times the original's training step and ours alternately, `repeats` times each; returns
    the figures and our state after its steps (the step donates the state it is given).

    The original is torch_reference.ThinkerLM with torch's AdamW (foreach) and gradient
    clipping, with the config's dropout, trained as `recipe` says (by default float32 on one
    process using every core, as its train_text.py trains on a CPU). Interleaving A B A B lets
    a shared machine's load fall on both alike. One idea, kept whole (65 lines): the original's
    step is built here so its closure is timed against ours in the same loop.
    """
    try:
        import torch

        from muomni_jax.interop import torch_reference
    except ImportError:
        return OriginalFigures(available=False, reason='torch is not installed'), state
    if recipe.device == 'cuda' and not torch.cuda.is_available():
        return OriginalFigures(available=False, reason='torch sees no CUDA device'), state
    model_config = ThinkerConfig.from_config(config)  # run_benchmark validated it.
    if model_config.kv_groups != model_config.n_heads // 2 and model_config.use_gqa:
        return OriginalFigures(
            available=False, reason='the original always uses n_heads // 2 kv groups'
        ), state
    torch.manual_seed(config.seed)
    model = torch_reference.ThinkerLM(model_config, use_sdpa=recipe.sdpa).to(recipe.device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_b1, config.adam_b2),
        weight_decay=config.weight_decay,
    )
    forward = torch.compile(model) if recipe.compile else model
    inputs, targets = (
        torch.from_numpy(np.asarray(batch[k], np.int64)).to(recipe.device)
        for k in ('inputs', 'targets')
    )

    def original_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(recipe.device, dtype=torch.bfloat16, enabled=recipe.autocast_bfloat16):
            logits = forward(inputs)
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten()
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        return loss.item()  # Waits for the device, as block_until_ready does for ours.

    mesh = partitioning.make_mesh(config.mesh)
    device_batch = partitioning.global_batch(batch, partitioning.batch_sharding(mesh))
    for _ in range(2):  # Warm-up: compilation, allocations and the first AdamW state.
        original_step()
    ours, theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, device_batch)
        jax.block_until_ready(metrics)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        original_step()
        theirs.append(time.perf_counter() - start)
    tokens = config.batch_size * config.ctx_len
    figures = OriginalFigures(
        available=True,
        torch=torch.__version__,
        step_s=theirs,
        ours_step_s=ours,
        tokens_per_s=tokens / float(np.median(theirs)),
        ours_tokens_per_s=tokens / float(np.median(ours)),
        recipe=dataclasses.asdict(recipe),
    )
    figures.speedup = figures.ours_tokens_per_s / figures.tokens_per_s
    return figures, state
