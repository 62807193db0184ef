"""The run's tokenizer: tokenizer_path's, else the one save_dir holds, else one trained on the
training text of every source (tokenizer_documents); process 0 does the work and every process
gets the same model. The tokenizer is copied into save_dir, so save_dir alone is enough to
sample, evaluate and resume.
"""

import itertools
from collections.abc import Iterator

import numpy as np
from etils import epath

from muomni_jax.data import data_plan, input_pipeline
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.io import run_dir
from muomni_jax.parallel import distributed


def tokenizer_documents(data: data_plan.DataPlan) -> Iterator[str]:
    """The training documents the tokenizer learns from, drawn by the mixture's weights.

    A single source gives all its documents, in order. In a mixture of D training documents,
    source s gives about weight_s x D: each of its documents repeated or skipped at random
    (seeded), so SentencePiece's own sample of tokenizer_sample_size sentences follows the
    weights. Counting the documents costs one extra read of the text, on the first run only.
    """
    corpora = [data.corpus(source) for source in data.sources]
    if len(corpora) == 1:
        return input_pipeline.documents(corpora[0], 'train')
    counts = [sum(1 for _ in input_pipeline.document_bytes(corpus, 'train')) for corpus in corpora]
    for source, count in zip(data.sources, counts):
        if not count:
            raise UserError(data.no_text_message(source))

    def draw():
        for i, (source, corpus, count) in enumerate(zip(data.sources, corpora, counts)):
            whole, fraction = divmod(source.weight * sum(counts) / count, 1.0)
            rng = np.random.default_rng([data.seed, i])
            for doc in input_pipeline.documents(corpus, 'train'):
                for _ in range(int(whole) + int(rng.random() < fraction)):
                    yield doc

    return draw()


def load_or_train_tokenizer(data: data_plan.DataPlan, save_dir: str) -> tokenizer_lib.Tokenizer:
    """tokenizer_path's model, else save_dir's, else one trained on the training text."""
    saved = run_dir.tokenizer_path(save_dir)
    saved_exists = epath.Path(saved).exists()
    path = data.tokenizer_path or (saved if saved_exists else '')
    if path:
        tokenizer = tokenizer_lib.Tokenizer.load(path)
        if (
            path != saved
            and saved_exists
            and (tokenizer_lib.Tokenizer.load(saved).model_proto != tokenizer.model_proto)
        ):
            raise UserError(
                f'save_dir {save_dir} holds a run with another tokenizer than '
                f'tokenizer_path {path}: use a new --config.save_dir, or drop '
                'tokenizer_path to resume with the saved one'
            )
    else:
        # All the training text, not one shard: the vocabulary must not depend on the processes.
        texts = tokenizer_documents(data)
        first = next(texts, None)
        if first is None:
            raise UserError(data.no_text_message(data.sources[0]))
        print(f'Training a {data.vocab_size}-piece BPE tokenizer on the training text...')
        tokenizer = tokenizer_lib.train_tokenizer(
            itertools.chain([first], texts),
            data.vocab_size,
            data.tokenizer_sample_size,
            seed=data.seed,
        )
    if tokenizer.vocab_size != data.vocab_size:
        raise UserError(
            f'tokenizer {path} has {tokenizer.vocab_size} pieces but vocab_size is '
            f'{data.vocab_size}: set --config.vocab_size={tokenizer.vocab_size} or '
            'use a new save_dir'
        )
    return tokenizer


def shared_tokenizer(data: data_plan.DataPlan, save_dir: str) -> tokenizer_lib.Tokenizer:
    """Process 0 loads or trains the tokenizer and every process gets its model."""
    proto = distributed.run_on_main(lambda: load_or_train_tokenizer(data, save_dir).model_proto)
    return tokenizer_lib.Tokenizer(proto)


def keep_in_save_dir(save_dir: str, tokenizer: tokenizer_lib.Tokenizer) -> None:
    """Copies the tokenizer into save_dir (also one from tokenizer_path), so that save_dir alone
    is enough to sample, evaluate and resume."""
    path = run_dir.tokenizer_path(save_dir)
    if not epath.Path(path).exists():
        tokenizer.save(path)
