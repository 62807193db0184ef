"""cpu_demo's model, data and batch with a faster recipe: a warmup-stable-decay schedule at twice
the peak rate, three quarters of the steps.

Re-chosen by measurement on 2026-12-02 (BUILD_NOTES "configs/cpu_fast.py, re-chosen"), run one
after the other with cpu_demo on this 2-core CPU: cpu_demo ends at validation loss 4.456 after
its 600 steps (582 s of training); this recipe passes it at its last step, 450, ending at 4.401
(386 s). 400 steps end at 4.459, just short. The options of issue 24 were tried and left out:
an average of the params (ema_decay=0.9) is ahead mid-run but not after the decay (4.406), and
z-loss at 1e-4 changes nothing measurable in float32. Muon (optimizer='muon') takes fewer steps,
but each costs about 1.45x an AdamW step on a 2-core CPU; on an accelerator, prefer it. To fit
the run to a time budget instead of a step count, set --config.max_steps=0
--config.schedule_seconds=N.
"""

import ml_collections

from configs import cpu_demo


def get_config() -> ml_collections.ConfigDict:
    config = cpu_demo.get_config()
    config.learning_rate = (
        2e-3  # The best AdamW peak rate with WSD of those tried (1.5e-3 to 4e-3).
    )
    config.lr_schedule = 'wsd'  # Peak rate until the last 20% of the steps, then a linear decay.
    config.max_steps = 450  # The fewest steps tried that reach cpu_demo's final validation loss.
    config.eval_every = 150  # Validate three times.
    config.save_every = 150  # Checkpoint with each validation.
    config.save_dir = 'checkpoints/cpu_fast'  # Kept apart from the other runs.
    return config
