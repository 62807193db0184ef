"""Random documents, and a token cache of them opened as the trainer opens it."""

import numpy as np

from muomni_jax.data import input_pipeline
from muomni_jax.data import token_cache

WORDS = 'the of and a to in is you that it he was for on are as with his they at be this'.split()


def random_documents(count, seed=0):
    """`count` documents of 1 to 59 common English words and a full stop."""
    rng = np.random.default_rng(seed)
    return [' '.join(rng.choice(WORDS, size=rng.integers(1, 60))) + '.' for _ in range(count)]


def open_cache(config, tokenizer, num_shards=1, shards=(0,), lines=None):
    """{(split, shard): stream} of config's corpus, built first if needed; `lines` collects
    what the build printed."""
    source = input_pipeline.DocumentSource(config)
    log = (lines.append if lines is not None else lambda line: None)
    return token_cache.open_or_build(config, source, tokenizer, num_shards, list(shards), log=log,
                                     verbose=False)
