"""muomni-jax: Stage A of μOmni (the Thinker) in JAX.

`muomni_jax.load(checkpoint_dir, step=None)` restores a trained Thinker's config, params and
tokenizer (see muomni_jax/loading.py).
"""


def __getattr__(name):
    # Lazy, so that `from muomni_jax import tokenizer` does not pay for Orbax and Flax.
    if name == 'load':
        from muomni_jax.loading import load
        return load
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
