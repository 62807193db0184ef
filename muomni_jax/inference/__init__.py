"""Using a trained Thinker: restoring a save_dir (`loading.load`), sampling with a KV cache,
scoring text, and plotting a run's curves.

May import: muomni_jax.errors, io, parallel, model and data. Never the training layer, so a
notebook that samples loads no optimizer, loop or checkpoint writer.
"""
