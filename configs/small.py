"""The Thinker at about 125M parameters.

Fits, by launch.preflight, on: v5e-16, h100x8 (BUILD_NOTES "The size ladder").

  python -m launch.preflight --config=configs/small.py --target=v5e-16,h100x8
  python -m launch.stage_a --config=configs/small.py --config.data_path=YOUR_CORPUS
"""

import ml_collections

from configs import accelerator


def get_config() -> ml_collections.ConfigDict:
    config = accelerator.get_config()
    # --- Model: the Thinker's architecture (GQA, SwiGLU, RoPE), grown ---
    config.vocab_size = 32000  # SentencePiece BPE pieces, as tiny.
    config.n_layers = 12  # Transformer blocks.
    config.d_model = 768  # Residual stream width.
    config.n_heads = 12  # Attention heads (head dim 64).
    config.kv_groups = 4  # Key/value groups (GQA).
    config.d_ff = 2048  # SwiGLU hidden width (about 8/3 of d_model).
    config.ctx_len = 1024  # Tokens per packed window.
    config.dropout = 0.0  # Pretraining on far more tokens than parameters needs none.
    config.remat = (
        False  # Recompute each block in the backward pass: not needed on the targets below.
    )
    config.scan_layers = True  # One lax.scan over the blocks: compile time flat in n_layers.
    # --- Training: batch 256 x 1024 = 262,144 tokens a step ---
    config.batch_size = 256  # Global windows per optimizer step.
    config.learning_rate = 0.0006  # Peak rate; smaller for wider models.
    config.warmup_steps = 2000  # Linear warmup.
    config.lr_schedule = 'wsd'  # Warmup-stable-decay: extend or cut a long run freely.
    config.num_epochs = 1  # One pass over a large corpus.
    config.save_every = 2000  # Checkpoint every N steps.
    config.eval_every = 2000  # Validate every N steps.
    config.log_every = 50  # Print and record metrics every N steps.
    config.mesh.data = 1  # Every device shards the params and Adam moments (FSDP) ...
    config.mesh.fsdp = -1  # ... and takes its own rows of the batch.
    config.save_dir = 'checkpoints/thinker_small'  # Kept apart from the other sizes.
    return config
