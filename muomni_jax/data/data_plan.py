"""The data part of a run's plan: its sources and how they are read, tokenized, sharded and batched.

training/run_plan.py fills it from the config once; the data layer reads only this.
"""

from __future__ import annotations

import dataclasses

from muomni_jax.data import input_pipeline, mixture


@dataclasses.dataclass(frozen=True)
class DataPlan:
    # The mixture's sources, weights normalized; a single data_path (or TFDS split) is a mixture
    # of one source named 'data'.
    sources: tuple[mixture.Source, ...]
    is_mixture: bool  # Set by config.mixture (even of one source): report each source apart.
    text_key: str  # The record field of sources that name none of their own.
    val_split: float  # Fraction of each source's documents held out for validation.
    tfds_data_dir: str  # '': the TFDS default.
    cache_dir: str  # The token cache's root; '': token_cache.default_dir().
    num_shards: int  # Data shards, a multiple of the processes; each fills rows_per_shard rows.
    batch_size: int  # Global rows per step.
    ctx_len: int  # Tokens per window.
    eval_batches: int  # Validation batches per source and shard; 0: the whole split.
    seed: int  # The data order's (and the tokenizer's sample's) seed.
    tokenizer_path: str  # An existing SentencePiece model; '': save_dir's, else trained.
    tokenizer_sample_size: int  # Sentences SentencePiece samples to train on.
    vocab_size: int  # The tokenizer's pieces (the model's vocabulary).

    @property
    def rows_per_shard(self) -> int:
        return self.batch_size // self.num_shards

    @property
    def mixture_record(self) -> str | None:
        """The mixture as a checkpoint records it; None for a single data_path."""
        return mixture.canonical(self.sources) if self.is_mixture else None

    def corpus(self, source: mixture.Source) -> input_pipeline.CorpusSpec:
        """How one source's documents are read."""
        return input_pipeline.CorpusSpec(
            data_path=source.data_path,
            tfds_name=source.tfds_name,
            tfds_split=source.tfds_split,
            tfds_text_key=source.tfds_text_key,
            tfds_data_dir=self.tfds_data_dir,
            text_key=source.text_key or self.text_key,
            val_split=self.val_split,
            label=f'mixture source {source.name!r}' if self.is_mixture else 'data_path',
        )

    def describe(self) -> str:
        """'data/text/corpus.txt', or 'a mixture of 2 sources: web 70% (...), ...'."""
        if not self.is_mixture:
            return self.sources[0].describe()
        return f'a mixture of {len(self.sources)} sources: ' + ', '.join(
            f'{s.name} {s.weight:.0%} ({s.describe()})' for s in self.sources
        )

    def no_text_message(self, source: mixture.Source) -> str:
        return mixture.no_text_message(source, self.is_mixture)
