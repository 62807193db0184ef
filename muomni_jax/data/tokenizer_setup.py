"""The run's tokenizer: tokenizer_path's, else the one save_dir holds, else one trained on the
training text of every source (mixture.tokenizer_documents); process 0 does the work and every
process gets the same model. The tokenizer is copied into save_dir, so save_dir alone is enough
to sample, evaluate and resume.
"""

import itertools
import os

from etils import epath

from muomni_jax.data import mixture
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.parallel import distributed


def load_or_train_tokenizer(config) -> tokenizer_lib.Tokenizer:
    """tokenizer_path's model, else save_dir's, else one trained on the training text."""
    saved = os.path.join(config.save_dir, 'tokenizer.model')
    saved_exists = epath.Path(saved).exists()
    path = config.tokenizer_path or (saved if saved_exists else '')
    if path:
        tokenizer = tokenizer_lib.Tokenizer.load(path)
        if path != saved and saved_exists and (
                tokenizer_lib.Tokenizer.load(saved).model_proto != tokenizer.model_proto):
            raise UserError(f'save_dir {config.save_dir} holds a run with another tokenizer than '
                            f'tokenizer_path {path}: use a new --config.save_dir, or drop '
                            'tokenizer_path to resume with the saved one')
    else:
        # All the training text, not one shard: the vocabulary must not depend on the processes.
        texts = mixture.tokenizer_documents(config)
        first = next(texts, None)
        if first is None:
            raise UserError(mixture.no_text_message(config, mixture.sources(config)[0]))
        print(f'Training a {config.vocab_size}-piece BPE tokenizer on the training text...')
        tokenizer = tokenizer_lib.train_tokenizer(
            itertools.chain([first], texts), config.vocab_size, config.tokenizer_sample_size,
            seed=config.seed)
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f'tokenizer {path} has {tokenizer.vocab_size} pieces but vocab_size is '
                        f'{config.vocab_size}: set --config.vocab_size={tokenizer.vocab_size} or '
                        'use a new save_dir')
    return tokenizer


def shared_tokenizer(config) -> tokenizer_lib.Tokenizer:
    """Process 0 loads or trains the tokenizer and every process gets its model."""
    proto = distributed.run_on_main(lambda: load_or_train_tokenizer(config).model_proto)
    return tokenizer_lib.Tokenizer(proto)


def keep_in_save_dir(save_dir: str, tokenizer: tokenizer_lib.Tokenizer) -> None:
    """Copies the tokenizer into save_dir (also one from tokenizer_path), so that save_dir alone
    is enough to sample, evaluate and resume."""
    path = os.path.join(save_dir, 'tokenizer.model')
    if not epath.Path(path).exists():
        tokenizer.save(path)
