"""Hugging Face export and import (muomni_jax/interop/hf_format.py), and lm-eval-harness on an
export.

transformers' own LlamaForCausalLM and MixtralForCausalLM are the reference: they load our export
and must compute our logits, continue greedily as we do, and tokenize as our SentencePiece does.
"""

import contextlib
import io
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from configs import tiny
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.inference import evaluation, loading, sampling
from muomni_jax.interop import hf_format, original_checkpoints
from muomni_jax.model.thinker import SHAPE_FIELDS, ThinkerConfig, abstract_model
from muomni_jax.training import train
from tests.support.configs import PEAK_FLOPS, describing
from tests.support.environment import REPO
from tests.support.models import perturbed_model
from tests.support.processes import run_module
from tests.support.trees import assert_trees_equal

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

LM_EVAL_TASKS = os.path.join(REPO, 'tests', 'fixtures', 'lm_eval_tiny')
BASE = dict(
    vocab_size=256,
    n_layers=2,
    d_model=64,
    n_heads=4,
    d_ff=128,
    ctx_len=32,
    dropout=0.0,
    rope_theta=500.0,
)
VARIANTS = {
    'gqa': ThinkerConfig(**BASE),
    'mha': ThinkerConfig(**BASE, use_gqa=False),
    'moe': ThinkerConfig(**BASE, use_moe=True, num_experts=3, num_experts_per_tok=2),
}


def random_model(config, seed=0):
    """perturbed_model: O(1)-scale weights and norm scales around 1, so mistakes show."""
    return perturbed_model(config, seed)


@pytest.fixture(scope='module')
def corpus_lines(corpus_sample):
    return corpus_sample.read_text(encoding='utf-8').splitlines()


@pytest.fixture(scope='module')
def sp_tokenizer(corpus_tokenizer):
    return tokenizer_lib.Tokenizer.load(corpus_tokenizer)


@pytest.fixture(scope='module')
def exports(tmp_path_factory, sp_tokenizer):
    """name -> (config, our model, its Hugging Face folder), for each of VARIANTS."""
    root = tmp_path_factory.mktemp('hf')
    out = {}
    for name, config in VARIANTS.items():
        model = random_model(config)
        folder = str(root / name)
        hf_format.write_hf(folder, nnx.state(model), config, sp_tokenizer)
        out[name] = config, model, folder
    return out


def _hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.from_numpy(np.asarray(tokens))).logits.numpy()


@jax.jit
def _logits(model, tokens):
    return model(tokens)


def _one_line(error) -> str:
    message = str(error.value)
    assert '\n' not in message
    return message


# ----------------------------------------------------------------------------------------------
# Export: transformers computes what we compute.


@pytest.mark.parametrize(
    'name, architecture, kv_heads',
    [
        ('gqa', 'LlamaForCausalLM', 2),
        ('mha', 'LlamaForCausalLM', 4),
        ('moe', 'MixtralForCausalLM', 2),
    ],
)
def test_transformers_gives_our_logits(exports, name, architecture, kv_heads):
    config, model, folder = exports[name]
    hf_model = _hf_model(folder)
    assert type(hf_model).__name__ == architecture
    assert hf_model.config.num_key_value_heads == kv_heads
    assert hf_model.config.tie_word_embeddings is False
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.ctx_len))
    expected = _hf_logits(hf_model, tokens)
    ours = np.asarray(_logits(model, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_greedy_generate_gives_our_20_tokens(exports, sp_tokenizer):
    _, model, folder = exports['gqa']
    prompt = sampling.encode_prompt(sp_tokenizer, 'The cat sat on the')
    ours = sampling.generate_ids(model, [prompt], max_new_tokens=20, temperature=0.0)[0]
    hf_out = (
        _hf_model(folder)
        .generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt) :]
        .tolist()
    )
    eos = tokenizer_lib.EOS_ID
    assert ours == (hf_out[: hf_out.index(eos)] if eos in hf_out else hf_out)
    assert len(ours) == 20 or eos in hf_out


def test_tokenizer_gives_our_ids_and_text(exports, sp_tokenizer, corpus_lines):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exports['gqa'][2])
    assert (hf_tokenizer.unk_token_id, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (
        tokenizer_lib.UNK_ID,
        tokenizer_lib.BOS_ID,
        tokenizer_lib.EOS_ID,
    )
    lines = corpus_lines[:300] + ['  two  spaces ', 'ｆｕｌｌ width', 'tab\tand 漢字 unknown']
    for line in lines:
        ids = sp_tokenizer.encode(line)
        assert hf_tokenizer(line).input_ids == [tokenizer_lib.BOS_ID] + ids, line
        if tokenizer_lib.UNK_ID in ids:
            continue  # SentencePiece decodes it as ' ⁇ ', transformers as '<unk>'.
        assert hf_tokenizer.decode(ids) == sp_tokenizer.decode(ids), line
        assert hf_tokenizer.decode(
            [tokenizer_lib.BOS_ID] + ids, skip_special_tokens=True
        ) == sp_tokenizer.decode(ids), line


def test_the_gelu_mlp_has_no_counterpart(tmp_path, sp_tokenizer):
    config = ThinkerConfig(**BASE, use_swiglu=False)
    with pytest.raises(UserError) as error:
        hf_format.write_hf(
            str(tmp_path / 'hf'), nnx.state(random_model(config)), config, sp_tokenizer
        )
    assert 'GELU MLP (use_swiglu=False), which no Hugging Face' in _one_line(error)
    assert not (tmp_path / 'hf').exists()


def test_without_transformers_export_is_one_line_and_import_works(
    tmp_path, exports, sp_tokenizer, monkeypatch
):
    config, model, folder = exports['gqa']
    monkeypatch.setitem(sys.modules, 'transformers', None)
    with pytest.raises(UserError) as error:
        hf_format.write_hf(str(tmp_path / 'hf'), nnx.state(model), config, sp_tokenizer)
    assert 'needs transformers: pip install transformers==' in _one_line(error)
    assert not (tmp_path / 'hf').exists()
    assert_trees_equal(nnx.state(model), hf_format.read_hf(folder)[1])


def test_export_refuses_a_folder_it_did_not_write(tmp_path, exports, sp_tokenizer):
    config, model, _ = exports['gqa']
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'training_log.json').write_text('[]')
    with pytest.raises(
        UserError,
        match='holds training_log.json and is not an export of this '
        r'project \(no \.muomni-jax-export\)',
    ):
        hf_format.write_hf(str(run), nnx.state(model), config, sp_tokenizer)
    assert os.listdir(run) == ['training_log.json']
    # A folder of another tool's export files, without the marker, is not ours either.
    theirs = tmp_path / 'theirs'
    shutil.copytree(exports['mha'][2], theirs)
    os.remove(theirs / hf_format.EXPORT_MARKER)
    with pytest.raises(UserError, match='is not an export of this project'):
        hf_format.write_hf(str(theirs), nnx.state(model), config, sp_tokenizer)
    # An earlier export is replaced whole, twice, beside a user's own again.old, which stays.
    again = tmp_path / 'again'
    shutil.copytree(exports['mha'][2], again)
    (tmp_path / 'again.old').mkdir()
    (tmp_path / 'again.old' / 'notes.txt').write_text('mine')
    for _ in range(2):
        hf_format.write_hf(str(again), nnx.state(model), config, sp_tokenizer)
    assert json.load(open(again / 'config.json'))['num_key_value_heads'] == 2
    assert (again / hf_format.EXPORT_MARKER).exists()
    assert (tmp_path / 'again.old' / 'notes.txt').read_text() == 'mine'
    assert os.stat(again).st_mode & 0o777 == os.stat(run).st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ['again', 'again.old', 'run', 'theirs']


# ----------------------------------------------------------------------------------------------
# Import


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_import_of_an_export_gives_identical_params(exports, name):
    config, model, folder = exports[name]
    imported, params, tokenizer = hf_format.read_hf(folder, {'dropout': 0.0})
    assert {k: getattr(imported, k) for k in SHAPE_FIELDS if k != 'kv_groups'} == {
        k: getattr(config, k) for k in SHAPE_FIELDS if k != 'kv_groups'
    }
    assert (imported.rope_theta, imported.ctx_len) == (config.rope_theta, config.ctx_len)
    assert tokenizer is not None and tokenizer.vocab_size == config.vocab_size
    assert_trees_equal(nnx.state(model), params)


@pytest.mark.slow
def test_cli_export_of_an_hf_import_gives_the_same_folder(exports, tmp_path):
    """HF folder -> save_dir (step 0) -> launch.convert --format=hf -> the same weights. The
    save_dir is written as an import of the original's format writes it, which
    test_use_checkpoint.py trains on."""
    config, model, folder = exports['gqa']
    save_dir = tmp_path / 'imported'
    original_checkpoints.import_weights(folder, str(save_dir), None, describing(config))
    ckpt = loading.load(str(save_dir))
    assert_trees_equal(nnx.state(model), ckpt.params)
    assert ckpt.config.ctx_len == config.ctx_len and ckpt.config.rope_theta == config.rope_theta

    result = run_module(
        'launch.convert',
        f'--checkpoint_dir={save_dir}',
        f'--output={tmp_path / "again"}',
        '--format=hf',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first = load_file(os.path.join(folder, hf_format.WEIGHTS_FILE))
    again = load_file(str(tmp_path / 'again' / hf_format.WEIGHTS_FILE))
    assert sorted(first) == sorted(again)
    for key, value in first.items():
        np.testing.assert_array_equal(value, again[key])


@pytest.mark.slow  # A training.
def test_an_hf_import_trains_further(exports, tmp_path, corpus_sample):
    """Training on an imported folder resumes at step 0, moves every parameter on from those
    weights, and lowers the loss on held-out text."""
    config, model, folder = exports['gqa']
    save_dir = tmp_path / 'imported'
    original_checkpoints.import_weights(folder, str(save_dir), None, describing(config))
    # The same --config as the import, with training fields only: no model field is taken
    # from save_dir.
    run = describing(
        config,
        **dict(
            save_dir=str(save_dir),
            data_path=str(corpus_sample),
            batch_size=8,
            max_steps=2,
            warmup_steps=1,
            log_every=1,
            eval_every=2,
            eval_batches=2,
            save_every=2,
            sample_prompts='',
            num_epochs=1,
            peak_flops_per_device=PEAK_FLOPS,
        ),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.train_and_evaluate(run)
    assert 'Resuming from checkpoint step 0' in out.getvalue()
    assert loading.available_steps(str(save_dir)) == [0, 2]
    trained = loading.load(str(save_dir))
    moved = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(trained.params))
    ]
    assert min(moved) > 0  # Every parameter took the two steps from the imported values.
    held_out = tmp_path / 'held_out.txt'
    held_out.write_text('\n'.join(corpus_sample.read_text(encoding='utf-8').splitlines()[-50:]))
    before, after = (
        evaluation.evaluate_text(m, trained.tokenizer, str(held_out))['loss']
        for m in (model, trained.model())
    )
    assert after < before, (before, after)


@pytest.mark.parametrize('architecture', ['llama', 'mixtral'])
def test_a_folder_transformers_wrote_imports_tied_and_sharded(tmp_path, sp_tokenizer, architecture):
    fields = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=32,
        rms_norm_eps=hf_format.RMS_NORM_EPS,
        tie_word_embeddings=True,
        rope_parameters={'rope_type': 'default', 'rope_theta': 1000.0},
    )
    torch.manual_seed(0)
    if architecture == 'llama':
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    else:
        hf_model = transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**fields, num_local_experts=4, num_experts_per_tok=2)
        )
    with torch.no_grad():  # Non-trivial norm scales, so a swapped norm shows.
        for name, p in hf_model.named_parameters():
            if name.endswith('norm.weight'):
                p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path / 'hf'
    if architecture == 'llama':
        hf_model.save_pretrained(folder)
        assert 'lm_head.weight' not in load_file(str(folder / hf_format.WEIGHTS_FILE))
    else:  # In shards, as large models come.
        hf_model.save_pretrained(folder, max_shard_size='50KB')
        assert (folder / hf_format.WEIGHTS_INDEX).exists()
        assert not (folder / hf_format.WEIGHTS_FILE).exists()
    config, params, tokenizer = hf_format.read_hf(str(folder), {'dropout': 0.0})
    assert tokenizer is None
    assert (config.use_moe, config.kv_groups, config.rope_theta) == (
        architecture == 'mixtral',
        1,
        1000.0,
    )
    np.testing.assert_array_equal(
        np.asarray(params['lm_head']['kernel'][...]),
        np.asarray(params['tok_emb']['embedding'][...]).T,
    )
    model = nnx.merge(abstract_model(config)[0], params)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 16))
    np.testing.assert_allclose(
        np.asarray(_logits(model, jnp.asarray(tokens))),
        _hf_logits(hf_model.eval(), tokens),
        atol=1e-4,
        rtol=0,
    )


# ----------------------------------------------------------------------------------------------
# Bad input: one line each, naming the problem.


def _edited_copy(tmp_path, folder, **fields):
    copy = tmp_path / 'edited'
    shutil.copytree(folder, copy)
    config = json.load(open(copy / 'config.json'))
    config.update(fields)
    (copy / 'config.json').write_text(json.dumps(config))
    return str(copy)


@pytest.mark.parametrize(
    'fields, expected',
    [
        (dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0}), 'rope scaling'),
        (
            dict(rope_parameters={'rope_type': 'yarn', 'rope_theta': 500.0, 'factor': 2.0}),
            'rope scaling',
        ),
        (
            dict(rope_parameters=None, rope_scaling={'type': 'dynamic', 'factor': 2.0}),
            'rope scaling',
        ),  # transformers 4 spelling
        (dict(attention_bias=True), 'attention_bias=true'),
        (dict(mlp_bias=True), 'mlp_bias=true'),
        (dict(sliding_window=16), 'sliding_window=16'),
        (dict(rms_norm_eps=1e-6), "rms_norm_eps=1e-06 (the Thinker's is 1e-05)"),
        (dict(head_dim=32), 'head_dim=32 != hidden_size/num_attention_heads'),
        (dict(hidden_act='gelu'), 'hidden_act=gelu (the Thinker uses silu)'),
        (dict(attention_bias=True, rms_norm_eps=1e-6), 'no attention_bias=true; no rms_norm_eps'),
    ],
)
def test_unsupported_options_are_named(tmp_path, exports, fields, expected):
    folder = _edited_copy(tmp_path, exports['gqa'][2], **fields)
    with pytest.raises(UserError) as error:
        hf_format.read_hf(folder)
    assert expected in _one_line(error)


def test_a_transformers_4_config_reads(exports):
    fields = json.load(open(os.path.join(exports['gqa'][2], 'config.json')))
    del fields['rope_parameters']
    fields['rope_theta'] = 250.0
    assert hf_format.thinker_config_from_hf(fields).rope_theta == 250.0


def test_bad_folders_are_one_line_each(tmp_path, exports):
    gqa = exports['gqa'][2]
    cases = {
        'another architecture': (
            _edited_copy(tmp_path / 'a', gqa, model_type='gpt2', architectures=['GPT2LMHeadModel']),
            'describes a gpt2 model (GPT2LMHeadModel): only LlamaForCausalLM and '
            'MixtralForCausalLM import',
        ),
        'no config.json': (str(tmp_path), 'has no config.json: point --input at a Hugging Face'),
        'mismatched shapes': (
            _edited_copy(tmp_path / 'b', gqa, intermediate_size=100),
            'model.layers.0.mlp.gate_proj.weight has shape [128, 64], expected [100, 64]',
        ),
        'no weights': (_edited_copy(tmp_path / 'c', gqa), 'has no model.safetensors'),
        'junk weights': (
            _edited_copy(tmp_path / 'e', gqa),
            'model.safetensors as safetensors (SafetensorError: ',
        ),
        'a shard outside the folder': (
            _edited_copy(tmp_path / 'f', gqa),
            "names shard '../elsewhere.safetensors', which is not a file in its own folder",
        ),
        'an index that is not one': (
            _edited_copy(tmp_path / 'g', gqa),
            "is not a safetensors index (KeyError: 'weight_map')",
        ),
    }
    os.remove(os.path.join(cases['no weights'][0], hf_format.WEIGHTS_FILE))
    with open(os.path.join(cases['junk weights'][0], hf_format.WEIGHTS_FILE), 'wb') as f:
        f.write(b'not safetensors at all')
    for name, index in (
        (
            'a shard outside the folder',
            {'weight_map': {'lm_head.weight': '../elsewhere.safetensors'}},
        ),
        ('an index that is not one', {'weights': {}}),
    ):
        folder = cases[name][0]
        os.remove(os.path.join(folder, hf_format.WEIGHTS_FILE))
        with open(os.path.join(folder, hf_format.WEIGHTS_INDEX), 'w') as f:
            json.dump(index, f)
    for name, (folder, expected) in cases.items():
        with pytest.raises(UserError) as error:
            hf_format.read_hf(folder)
        assert expected in _one_line(error), name

    no_tokenizer = _edited_copy(tmp_path / 'd', gqa)
    os.remove(os.path.join(no_tokenizer, 'tokenizer.model'))
    with pytest.raises(UserError) as error:
        original_checkpoints.import_weights(
            no_tokenizer, str(tmp_path / 'run'), None, tiny.get_config()
        )
    assert 'has no tokenizer.model: an imported checkpoint needs the tokenizer.model' in _one_line(
        error
    )
    assert not (tmp_path / 'run').exists()


def test_an_import_refuses_a_config_that_does_not_describe_the_weights(exports, tmp_path):
    """Importing with --config=X, then training with --config=X, must build one model: weights
    that X does not describe are refused before anything is written, naming each field."""
    config, _, folder = exports['gqa']
    base = describing(config, d_ff=config.d_ff * 2, ctx_len=config.ctx_len + 1)
    with pytest.raises(UserError) as error:
        original_checkpoints.import_weights(folder, str(tmp_path / 'run'), None, base)
    message = _one_line(error)
    assert f'd_ff {config.d_ff} (--config: {config.d_ff * 2})' in message
    assert f'ctx_len {config.ctx_len} (--config: {config.ctx_len + 1})' in message
    assert message.endswith(f'--config.d_ff={config.d_ff} --config.ctx_len={config.ctx_len}')
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_cli_import_error_is_one_line_and_writes_nothing(tmp_path, exports):
    folder = _edited_copy(tmp_path, exports['gqa'][2], model_type='gpt2', architectures=[])
    result = run_module('launch.convert', f'--input={folder}', f'--save_dir={tmp_path / "run"}')
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith('error: ')
        and 'describes a gpt2 model' in result.stderr.strip().splitlines()[-1]
    ), result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------------------------
# lm-eval-harness on the export


def _our_loglikelihoods(model, tokenizer, requests):
    """lm-eval's HFLM scoring of (context, continuation) pairs, on our model and our
    SentencePiece: the context's trailing spaces move to the continuation, both encodings start
    with BOS (the exported tokenizer adds it), and the continuation is what the whole encoding
    has beyond the context's. Returns the summed log-probabilities of the continuations."""
    rows = []
    for context, continuation in requests:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = sampling.encode_prompt(tokenizer, context + continuation)
        rows.append((whole, len(sampling.encode_prompt(tokenizer, context))))
    # One batch, right-padded: a causal model's logits at a position ignore what follows it.
    tokens = np.zeros((len(rows), max(len(w) for w, _ in rows)), np.int32)
    for row, (whole, _) in enumerate(rows):
        tokens[row, : len(whole)] = whole
    logprobs = np.asarray(jax.nn.log_softmax(_logits(model, tokens), axis=-1))
    return [
        sum(logprobs[row, i - 1, whole[i]] for i in range(start, len(whole)))
        for row, (whole, start) in enumerate(rows)
    ]


def test_lm_eval_loglikelihoods_are_ours(exports, sp_tokenizer, monkeypatch):
    lm_eval = pytest.importorskip('lm_eval')
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    # The environment report runs pip in a subprocess: seconds, and nothing this test reads.
    monkeypatch.setattr(evaluator, 'add_env_info', lambda results: None)
    _, model, folder = exports['gqa']
    results = lm_eval.simple_evaluate(
        model='hf',
        model_args=f'pretrained={folder},dtype=float32',
        tasks=['muomni_tiny_choice'],
        task_manager=TaskManager(include_path=LM_EVAL_TASKS, include_defaults=False),
        device='cpu',
        batch_size=1,
        log_samples=True,
    )
    samples = results['samples']['muomni_tiny_choice']
    requests = [tuple(args) for s in samples for args in s['arguments']]
    reported = [resp[0][0] for s in samples for resp in s['resps']]
    assert len(samples) == 4 and len(requests) == 12
    ours = _our_loglikelihoods(model, sp_tokenizer, requests)
    np.testing.assert_allclose(reported, ours, atol=1e-3, rtol=0)

    # The same task through lm_eval_model.ThinkerLM, on the JAX model with no export.
    from muomni_jax.interop import lm_eval_model

    direct = lm_eval_model.evaluate_tasks(
        model,
        sp_tokenizer,
        ['muomni_tiny_choice'],
        include_path=LM_EVAL_TASKS,
        include_defaults=False,
        batch_size=8,
        log_samples=True,
    )
    direct_samples = direct['samples']['muomni_tiny_choice']
    assert [tuple(a) for s in direct_samples for a in s['arguments']] == requests
    np.testing.assert_allclose(
        [r[0][0] for s in direct_samples for r in s['resps']], reported, atol=1e-3, rtol=0
    )
    assert (
        direct['results']['muomni_tiny_choice']['acc,none']
        == results['results']['muomni_tiny_choice']['acc,none']
    )


@pytest.mark.slow  # Compiles its scoring and greedy decoding; the lm-eval test above is fast.
def test_the_jax_lm_scores_long_texts_and_generates_as_we_do(exports, sp_tokenizer, corpus_lines):
    lm_eval_model = pytest.importorskip('muomni_jax.interop.lm_eval_model')
    from lm_eval.api.instance import Instance

    _, model, _ = exports['gqa']
    lm = lm_eval_model.ThinkerLM(model, sp_tokenizer, batch_size=4)
    # Longer than ctx_len (32), so the rolling windows are several per text.
    text = ' '.join(corpus_lines[:3])
    ids = [tokenizer_lib.BOS_ID] + sp_tokenizer.encode(text)
    assert len(ids) > 3 * model.config.ctx_len
    # Window k predicts ids[start:end] from the ctx_len tokens (or all there are) before each;
    # right-padded into one batch, which a causal model's logits ignore.
    ctx_len = model.config.ctx_len
    spans = [(start, min(start + ctx_len, len(ids))) for start in range(1, len(ids), ctx_len)]
    inputs = np.zeros((len(spans), ctx_len), np.int32)
    for row, (_, end) in enumerate(spans):
        window = ids[max(0, end - 1 - ctx_len) : end - 1]
        inputs[row, : len(window)] = window
    logprobs = np.asarray(jax.nn.log_softmax(_logits(model, inputs), axis=-1))
    expected = 0.0
    for row, (start, end) in enumerate(spans):
        first = max(0, end - 1 - ctx_len)  # ids index of the row's first input
        expected += sum(logprobs[row, i - 1 - first, ids[i]] for i in range(start, end))
    rolling = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (text,), 0)])[0]
    assert rolling == pytest.approx(expected, abs=1e-3)

    prompt = 'The cat sat on the'
    generated = lm.generate_until(
        [Instance('generate_until', {}, (prompt, {'until': ['\n'], 'max_gen_toks': 12}), 0)]
    )[0]
    greedy = sampling.generate(model, sp_tokenizer, prompt, max_new_tokens=12, temperature=0.0)[0]
    assert generated == greedy.split('\n')[0]
