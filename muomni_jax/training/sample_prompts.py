"""The training loop's samples: a greedy continuation of each of config.sample_prompts, printed
after each evaluation (periodic_actions.Evaluate) from the params being trained.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.inference import sampling
from muomni_jax.model.thinker import ThinkerConfig, abstract_model


def parse_prompts(text: str) -> list[str]:
    """'The cat sat on the|Python is a' -> ['The cat sat on the', 'Python is a']."""
    return [p.strip() for p in text.split('|') if p.strip()]


def training_sampler(
    sample_prompts: str,
    sample_max_new_tokens: int,
    model_config: ThinkerConfig,
    tokenizer: tokenizer_lib.Tokenizer,
) -> Callable[[nnx.State], list[str]] | None:
    """For the training loop: params -> console lines with a greedy continuation of each of
    sample_prompts ('|'-separated), or None when there are none.

    Generates sample_max_new_tokens, or fewer where the context ends first. Checks the prompts
    against the context now, before anything is written.
    """
    prompts = parse_prompts(sample_prompts)
    if not prompts:
        return None
    prompt_ids = [sampling.encode_prompt(tokenizer, p) for p in prompts]
    longest = max(len(p) for p in prompt_ids)
    # Diagnostics should not stop a run with a short context: generate what fits.
    max_new_tokens = min(sample_max_new_tokens, model_config.ctx_len - longest)
    if max_new_tokens < 1:
        raise UserError(
            f'sample_prompts need {longest} tokens, which leaves no room to generate '
            f'within ctx_len ({model_config.ctx_len}) (or sample_max_new_tokens < 1): '
            "shorten them, or turn them off with --config.sample_prompts=''"
        )
    graphdef, _ = abstract_model(model_config)

    def sample(params: nnx.State) -> list[str]:
        ids = sampling.generate_ids(
            nnx.merge(graphdef, params), prompt_ids, max_new_tokens=max_new_tokens, temperature=0.0
        )
        return [
            f'  Sample: {p!r} → {tokenizer.decode_continuation(p_ids, row)!r}'
            for p, p_ids, row in zip(prompts, prompt_ids, ids)
        ]

    return sample
