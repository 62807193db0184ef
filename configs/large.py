"""The Thinker at about 1B parameters.

Fits, by launch.preflight, on: v5p-64, h100x8 (BUILD_NOTES "The size ladder").

  python -m launch.preflight --config=configs/large.py --target=v5p-64,h100x8
  python -m launch.stage_a --config=configs/large.py --config.data_path=YOUR_CORPUS
"""

import ml_collections

from configs import small


def get_config() -> ml_collections.ConfigDict:
    config = small.get_config()  # small's fields and comments; only what grows differs.
    config.n_layers = 20  # Transformer blocks.
    config.d_model = 2048  # Residual stream width.
    config.n_heads = 16  # Attention heads (head dim 128).
    config.d_ff = 5632  # SwiGLU hidden width (about 8/3 of d_model).
    config.ctx_len = 2048  # Tokens per packed window.
    config.remat = (
        True  # Recompute each block in the backward pass: kept on for headroom (see BUILD_NOTES).
    )
    config.learning_rate = 0.0002  # Peak rate; smaller for wider models.
    config.save_dir = 'checkpoints/thinker_large'  # Kept apart from the other sizes.
    return config
