"""Token-cache build rate of the same text in several formats (launch.bench_formats)."""

import tempfile
import time

import numpy as np

from muomni_jax.data import input_pipeline, token_cache, tokenizer_setup
from muomni_jax.training import run_plan


def bench_cache_build(config, data_paths: dict[str, str], repeats: int) -> dict[str, dict]:
    """Token-cache build rate of the same text in several formats: {name: {'tokens',
    'seconds', 'tokens_per_s', 'ratio_to_first'}}, each the median of `repeats` builds into an
    empty cache. The formats take turns in every repeat, so a load that comes and goes on a
    shared machine falls on all of them alike; compare them by ratio.

    data_paths: {name: data_path}, e.g. {'text': 'corpus.txt', 'parquet': 'corpus.parquet'};
    the tokenizer is config's (tokenizer_path, else save_dir's, else trained on the first).
    """
    first = config.copy_and_resolve_references()
    first.data_path = next(iter(data_paths.values()))
    first.mixture = ''
    plan = run_plan.resolve(first)
    tokenizer = tokenizer_setup.load_or_train_tokenizer(plan.data, plan.output.save_dir)
    times = {name: [] for name in data_paths}
    tokens = {}
    for _ in range(repeats):
        for name, path in data_paths.items():
            with tempfile.TemporaryDirectory() as cache_dir:
                corpus = input_pipeline.CorpusSpec(
                    data_path=path, text_key=config.text_key, val_split=config.val_split
                )
                start = time.perf_counter()
                streams = token_cache.open_or_build(
                    cache_dir,
                    input_pipeline.DocumentSource(corpus),
                    tokenizer,
                    1,
                    [0],
                    log=lambda line: None,
                )
                times[name].append(time.perf_counter() - start)
                tokens[name] = sum(stream.num_tokens for stream in streams.values())
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    base = next(iter(data_paths))
    return {
        name: {
            'tokens': tokens[name],
            'seconds': seconds[name],
            'tokens_per_s': tokens[name] / seconds[name],
            'ratio_to_first': (tokens[name] / seconds[name]) / (tokens[base] / seconds[base]),
        }
        for name in data_paths
    }
