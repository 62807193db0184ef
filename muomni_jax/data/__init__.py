"""Text to batches, on the host: documents, the train/validation split, the tokenizer, the token
cache, mixtures of sources and this process's rows of every global batch.

May import: muomni_jax.errors, muomni_jax.io and muomni_jax.parallel. Knows nothing of the model.
"""
