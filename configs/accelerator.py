"""The tiny Thinker's shape for a GPU or TPU: bfloat16 compute and no dropout on the attention
probabilities, so a fused attention kernel can serve training (the residual dropout stays).

  python -m launch.stage_a --config=configs/accelerator.py [--config.attention_impl=pallas]
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.dtype = 'bfloat16'  # Matmuls and activations in bfloat16; params and Adam stay float32.
    config.attention_dropout = 0.0  # Fused kernels compute no dropout on the probabilities.
    config.save_dir = 'checkpoints/thinker_tiny_accelerator'  # Kept apart from the float32 run.
    return config
