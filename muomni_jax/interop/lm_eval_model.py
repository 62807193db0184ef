"""lm-eval-harness tasks on the JAX Thinker itself, with no export: an lm-eval `LM`.

Requests are tokenized as lm-eval's `--model hf` tokenizes them on our exported folder (whose
tokenizer prepends BOS): a context encodes as [BOS] + pieces, and lm-eval's TemplateLM moves a
context's trailing spaces to the continuation and splits the whole encoding after the context's.
So loglikelihood requests score the same numbers here and on the export. Rolling loglikelihoods
(perplexity tasks) score [BOS] + pieces with BOS as the only context. Needs lm-eval
(pip install "lm-eval==0.4.13"), imported here: import this module only when it is wanted.

Shapes: B requests per batch, T padded tokens, V vocab.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError, first_line
from muomni_jax.inference import sampling
from muomni_jax.model.thinker import Thinker

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
except ImportError:
    raise UserError('lm-eval tasks need lm-eval: pip install "lm-eval==0.4.13"') from None

# Padded lengths are rounded up to a multiple of this, so requests share compiled programs.
_LENGTH_BUCKET = 16


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _score(params, inputs, targets, *, graphdef):
    """inputs, targets (B, T) int -> each target's log-probability after its inputs (B, T) and
    whether it is the most likely token there (B, T)."""
    logits = nnx.merge(graphdef, params)(inputs)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return target_logprobs, jnp.argmax(logits, axis=-1) == targets


class ThinkerLM(TemplateLM):
    """lm-eval's LM on a Thinker and its SentencePiece tokenizer: loglikelihood,
    loglikelihood_rolling and generate_until (greedy unless a task asks for a temperature)."""

    def __init__(self, model: Thinker, tokenizer: tokenizer_lib.Tokenizer, batch_size: int = 16):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._graphdef, self._params = nnx.split(model)

    @property
    def eot_token_id(self) -> int:
        return tokenizer_lib.EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return tokenizer_lib.BOS_ID

    @property
    def max_length(self) -> int:
        return self.model.config.ctx_len

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        del kwargs
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [tokenizer_lib.BOS_ID] + ids

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        del kwargs
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (summed log-probability of the
        continuation, whether greedy decoding gives it), the context cut on the left to fit."""
        del disable_tqdm, kwargs
        results = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            rows = [
                (list(context) + list(continuation))[-(self.max_length + 1) :]
                for _, context, continuation in batch
            ]
            length = min(
                -(-max(len(r) - 1 for r in rows) // _LENGTH_BUCKET) * _LENGTH_BUCKET,
                self.max_length,
            )
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            for i, row in enumerate(rows):
                inputs[i, : len(row) - 1] = row[:-1]
                targets[i, : len(row) - 1] = row[1:]
            logprobs, greedy = jax.device_get(
                _score(self._params, inputs, targets, graphdef=self._graphdef)
            )
            for i, (row, (_, _, continuation)) in enumerate(zip(rows, batch)):
                # A continuation longer than the context window is scored on what fits.
                scored = slice(max(0, len(row) - 1 - len(continuation)), len(row) - 1)
                results.append(
                    (
                        float(np.sum(logprobs[i, scored], dtype=np.float64)),
                        bool(np.all(greedy[i, scored])),
                    )
                )
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability: its pieces in windows of ctx_len, each window
        conditioned on the tokens before it, the first on BOS."""
        del disable_tqdm
        windows, owners = [], []
        for index, (string,) in enumerate(r.args for r in requests):
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continues each context until one of its `until` strings, EOS or max_gen_toks."""
        del disable_tqdm
        outputs = []
        for context, gen_kwargs in (r.args for r in requests):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get('until') or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = max(1, min(int(gen_kwargs.get('max_gen_toks', 256)), self.max_length - 1))
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :]
            temperature = (
                float(gen_kwargs.get('temperature', 1.0))
                if gen_kwargs.get('do_sample', False)
                else 0.0
            )
            ids = sampling.generate_ids(
                self.model, [prompt], max_new_tokens=max_new, temperature=temperature
            )[0]
            text = self.tokenizer.decode_continuation(prompt, ids)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            outputs.append(text)
        return outputs


def evaluate_tasks(
    model: Thinker,
    tokenizer: tokenizer_lib.Tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    include_defaults: bool = True,
    limit: int | None = None,
    batch_size: int = 16,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm_eval.simple_evaluate on the Thinker: tasks by name, lm-eval's own (unless
    include_defaults is false: indexing them takes seconds) or YAML files under include_path;
    limit: at most this many documents per task. Returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path:
        _check_include_path(include_path)
    manager = TaskManager(include_path=include_path or None, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f'unknown lm-eval task {", ".join(unknown)}: see `lm_eval --tasks list`, '
            'or pass the folder of its YAML as --lm_eval_include_path'
        )
    try:
        return lm_eval.simple_evaluate(
            model=ThinkerLM(model, tokenizer, batch_size),
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            log_samples=log_samples,
        )
    except ConnectionError as e:  # datasets' "Couldn't reach ..." (no network, offline mode).
        raise UserError(
            f'the data of lm-eval task {", ".join(tasks)} could not be fetched '
            f'({first_line(e, 200)}): run where the Hugging Face Hub is reachable, or use a '
            'local task with --lm_eval_include_path (e.g. tests/fixtures/lm_eval_tiny)'
        ) from None


def _check_include_path(include_path: str) -> None:
    """A folder of task YAML files that lm-eval loads; lm-eval itself skips a wrong one
    without a word, and the task is then only 'unknown'."""
    from lm_eval.tasks import TaskManager

    if not os.path.isdir(include_path):
        raise UserError(
            f'--lm_eval_include_path {include_path} is not a folder: give the folder that '
            'holds the task YAML files (e.g. tests/fixtures/lm_eval_tiny)'
        )
    if not TaskManager(include_path=include_path, include_defaults=False).all_tasks:
        raise UserError(
            f'--lm_eval_include_path {include_path} holds no lm-eval task that loads: it needs '
            'a YAML file with a `task:` name (see tests/fixtures/lm_eval_tiny)'
        )


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own Markdown table of a results dict."""
    return lm_eval_utils.make_table(results)
