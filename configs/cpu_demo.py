"""The tiny Thinker's shape with a smaller vocab, context and batch: a quick start on a laptop CPU.

On a 2-core CPU the loss falls visibly within minutes and samples become readable in about 10.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.vocab_size = 4096  # A small vocab keeps the lm_head and softmax cheap on a CPU.
    config.ctx_len = 128  # Short windows: attention cost and step time stay small.
    config.batch_size = 16  # Windows per step (2,048 tokens).
    config.num_epochs = 1  # One pass is enough to see the loss fall.
    config.max_steps = 600  # About 10 minutes on a 2-core CPU.
    config.warmup_steps = 50  # Short warmup for a short run.
    config.learning_rate = 1e-3  # A small model on a short run tolerates a higher peak rate.
    config.dropout = 0.0  # Under-fitting, not over-fitting, is the issue in a 10-minute run.
    config.log_every = 20  # Frequent progress lines.
    config.eval_every = 200  # Validate three times.
    config.eval_batches = 20  # A fixed slice of validation keeps evaluation fast.
    config.save_every = 200  # Checkpoint with each validation.
    config.save_dir = 'checkpoints/cpu_demo'  # Kept apart from the tiny run.
    return config
