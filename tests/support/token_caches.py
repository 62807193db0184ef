"""Random documents, and a token cache of them opened as the trainer opens it."""

import numpy as np

from muomni_jax.data import input_pipeline, token_cache
from muomni_jax.training import run_plan

WORDS = 'the of and a to in is you that it he was for on are as with his they at be this'.split()


def random_documents(count, seed=0):
    """`count` documents of 1 to 59 common English words and a full stop."""
    rng = np.random.default_rng(seed)
    return [' '.join(rng.choice(WORDS, size=rng.integers(1, 60))) + '.' for _ in range(count)]


def corpus_spec(config) -> input_pipeline.CorpusSpec:
    """How a run with this config reads its one source."""
    data = run_plan.resolve(config).data
    return data.corpus(data.sources[0])


def corpus_source(config) -> input_pipeline.DocumentSource:
    """The documents of config's one source, as a run reads them."""
    return input_pipeline.DocumentSource(corpus_spec(config))


def open_cache(config, tokenizer, num_shards=1, shards=(0,), lines=None):
    """{(split, shard): stream} of config's corpus, built first if needed; `lines` collects
    what the build printed."""
    log = lines.append if lines is not None else lambda line: None
    return token_cache.open_or_build(
        run_plan.resolve(config).data.cache_dir,
        corpus_source(config),
        tokenizer,
        num_shards,
        list(shards),
        log=log,
    )
