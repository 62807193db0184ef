"""The Thinker at about 350M parameters.

Fits, by launch.preflight, on: v5e-32, h100x8 (BUILD_NOTES "The size ladder").

  python -m launch.preflight --config=configs/medium.py --target=v5e-32,h100x8
  python -m launch.stage_a --config=configs/medium.py --config.data_path=YOUR_CORPUS
"""

import ml_collections

from configs import small


def get_config() -> ml_collections.ConfigDict:
    config = small.get_config()  # small's fields and comments; only what grows differs.
    config.n_layers = 24  # Transformer blocks.
    config.d_model = 1024  # Residual stream width.
    config.n_heads = 16  # Attention heads (head dim 64).
    config.d_ff = 2816  # SwiGLU hidden width (about 8/3 of d_model).
    config.remat = (
        True  # Recompute each block in the backward pass: kept on for headroom (see BUILD_NOTES).
    )
    config.learning_rate = 0.0003  # Peak rate; smaller for wider models.
    config.save_dir = 'checkpoints/thinker_medium'  # Kept apart from the other sizes.
    return config
