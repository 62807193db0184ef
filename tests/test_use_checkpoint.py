"""Using a trained Thinker: a checkpoint from a tiny 8-device fsdp run, restored on one device,
sampled and scored by the launchers, exported to and imported from the original's format, and
opened by the example notebook."""

import contextlib
import io
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import muomni_jax
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.inference import evaluation, loading
from muomni_jax.interop import original_checkpoints, original_format
from muomni_jax.training import train
from tests.support.configs import PEAK_FLOPS, small_config
from tests.support.environment import REPO
from tests.support.processes import one_device_env, run_code, run_module
from tests.support.trees import assert_trees_equal

LM_EVAL_TASKS = os.path.join(REPO, 'tests', 'fixtures', 'lm_eval_tiny')
NOTEBOOK = os.path.join(REPO, 'examples', 'restore_and_sample.ipynb')


@pytest.fixture(scope='module')
def trained(trained_run):
    """conftest.trained_run: (save_dir, stdout, stderr) of 6 steps on a mesh that shards the
    params 8 ways, with samples after each validation."""
    return trained_run


def test_training_prints_samples_under_each_validation_line(trained):
    lines = trained[1].splitlines()
    validations = [i for i, line in enumerate(lines) if line.startswith('→ ')]
    assert len(validations) == 2  # Steps 3 and 6.
    for i in validations:
        assert lines[i + 1].startswith("  Sample: 'The cat sat on the' → '")
        assert lines[i + 2].startswith("  Sample: 'Python is a' → '")


def _saved_params(save_dir, step):
    """The params exactly as saved (on the 8-device mesh), read without any target tree."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        raw = checkpointer.restore(os.path.join(save_dir, str(step), 'state'))
    return raw['params']


@pytest.mark.slow
def test_restores_an_8_device_fsdp_checkpoint_on_one_device(trained, tmp_path):
    save_dir = trained[0]
    saved = _saved_params(save_dir, 6)
    assert any(
        len(x.sharding.device_set) == 8
        for x in jax.tree.leaves(saved)
        if isinstance(x, jax.Array) and not x.sharding.is_fully_replicated
    )
    expected = {f'a{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(saved))}
    np.savez(tmp_path / 'expected.npz', **expected)
    script = (
        'import sys, jax, numpy as np, muomni_jax\n'
        'config, params, tokenizer = muomni_jax.load(sys.argv[1])\n'
        'assert jax.device_count() == 1, jax.devices()\n'
        'expected = np.load(sys.argv[2])\n'
        'leaves = jax.tree.leaves(params)\n'
        'assert len(leaves) == len(expected.files)\n'
        'for i, x in enumerate(leaves):\n'
        '    np.testing.assert_array_equal(np.asarray(x), expected[f"a{i}"])\n'
        'print("restored", len(leaves), config.d_model, tokenizer.vocab_size)\n'
    )
    expected_path = str(tmp_path / 'expected.npz')
    result = run_code(script, save_dir, expected_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'restored {len(expected)} 64 256' in result.stdout


def test_load_names_the_available_steps(trained, tmp_path):
    save_dir = trained[0]
    ckpt = muomni_jax.load(save_dir, step=3)
    assert ckpt.model().config.d_model == 64
    with pytest.raises(UserError, match=r'step 4 is not in .*available steps are \[3, 6\]'):
        muomni_jax.load(save_dir, step=4)
    with pytest.raises(UserError, match='does not exist'):
        muomni_jax.load(str(tmp_path / 'nowhere'))
    with pytest.raises(UserError, match='holds no checkpoint steps'):
        muomni_jax.load(str(tmp_path))


@pytest.mark.slow
def test_launch_sample_and_evaluate(trained, corpus_sample):
    """The CLI smoke runs of launch.sample and launch.evaluate."""
    save_dir = trained[0]
    relative = os.path.relpath(save_dir, REPO)  # As users pass it: checkpoints/cpu_demo.
    sample = run_module(
        'launch.sample',
        f'--checkpoint_dir={relative}',
        '--prompt=The cat',
        '--prompt=Python is a',
        '--max_new_tokens=8',
        '--seed=1',
        '--show_next=3',
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    out = sample.stdout
    assert out.count('Generated: ') == 2 and "Context: 'The cat'" in out
    assert out.count('Next token: ') == 2 and '%' in out

    evaluate = run_module(
        'launch.evaluate',
        f'--checkpoint_dir={save_dir}',
        '--step=6',
        f'--data_path={corpus_sample}',
        '--batch_size=8',
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    fields = dict(line.split(': ', 1) for line in evaluate.stdout.splitlines() if ': ' in line)
    # What the library gives for step 6 (test_evaluate_scores_the_step_it_is_given checks that).
    expected = evaluation.evaluate_text(
        muomni_jax.load(save_dir, 6).model(),
        muomni_jax.load(save_dir, 6).tokenizer,
        str(corpus_sample),
        8,
    )
    assert float(fields['Loss']) == pytest.approx(expected['loss'], abs=1e-4)
    assert float(fields['Perplexity']) == pytest.approx(expected['perplexity'], abs=0.01)
    assert int(fields['Tokens'].replace(',', '')) == expected['tokens']

    bad = run_module('launch.sample', f'--checkpoint_dir={save_dir}', '--step=5', '--prompt=x')
    assert bad.returncode == 2
    assert 'error: step 5 is not in' in bad.stderr and 'available steps are [3, 6]' in bad.stderr
    assert 'Traceback' not in bad.stderr


@pytest.mark.slow
def test_lm_eval_without_its_data_is_one_line(trained, tmp_path):
    """A task whose data cannot be fetched (here: offline, with an empty Hugging Face cache)
    is one line that names the local-task way out, and exit status 2."""
    pytest.importorskip('lm_eval')
    env = {
        **one_device_env(),
        'HF_HOME': str(tmp_path / 'hf_home'),
        'HF_HUB_OFFLINE': '1',
        'HF_DATASETS_OFFLINE': '1',
    }
    result = run_module(
        'launch.evaluate', f'--checkpoint_dir={trained[0]}', '--lm_eval_tasks=hellaswag', env=env
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith('error: the data of lm-eval task hellaswag could not be fetched (')
    assert "Couldn't reach" in line and '--lm_eval_include_path' in line


@pytest.mark.parametrize(
    'case, expected',
    [
        ('unknown task', 'unknown lm-eval task no_such_task: see `lm_eval --tasks list`'),
        ('missing folder', 'is not a folder: give the folder that holds the task YAML files'),
        ('folder without tasks', 'holds no lm-eval task that loads: it needs a YAML file'),
        ('folder of a broken YAML', 'holds no lm-eval task that loads: it needs a YAML file'),
    ],
)
def test_lm_eval_input_errors_are_one_line(trained, tmp_path, case, expected):
    lm_eval_model = pytest.importorskip('muomni_jax.interop.lm_eval_model')
    include_path, task = str(tmp_path / 'tasks'), 'muomni_tiny_choice'
    if case == 'unknown task':
        include_path, task = LM_EVAL_TASKS, 'no_such_task'
    elif case != 'missing folder':
        os.makedirs(include_path)
        if case == 'folder of a broken YAML':
            with open(os.path.join(include_path, 'task.yaml'), 'w') as f:
                f.write('task: [muomni_tiny_choice\n')
    checkpoint = muomni_jax.load(trained[0])
    with pytest.raises(UserError) as error:
        lm_eval_model.evaluate_tasks(
            checkpoint.model(),
            checkpoint.tokenizer,
            [task],
            include_path=include_path,
            include_defaults=False,
        )
    assert expected in str(error.value) and '\n' not in str(error.value)


def test_evaluate_scores_the_step_it_is_given(trained, corpus_sample):
    """Each step scores its own params: step 6, three more steps of training, is below step 3
    (an untrained or wrong checkpoint would not be), and the counts are the text's."""
    save_dir = trained[0]
    scores = {}
    for step in (3, 6):
        checkpoint = muomni_jax.load(save_dir, step)
        scores[step] = evaluation.evaluate_text(
            checkpoint.model(), checkpoint.tokenizer, str(corpus_sample), 8
        )
    assert scores[6]['loss'] < scores[3]['loss']
    for score in scores.values():
        assert score['documents'] == 600
    # Zero logits give each of the 256 tokens 1/256, whatever the text: a loss of ln 256 =
    # 5.5451774 nats per token and a perplexity of 256.
    uniform = muomni_jax.load(save_dir, 6).model()
    uniform.lm_head.kernel[...] = jax.numpy.zeros_like(uniform.lm_head.kernel[...])
    score = evaluation.evaluate_text(uniform, checkpoint.tokenizer, str(corpus_sample), 8)
    assert score['loss'] == pytest.approx(5.5451774, rel=1e-6)
    assert score['perplexity'] == pytest.approx(256.0, rel=1e-5)
    lines = corpus_sample.read_text(encoding='utf-8').splitlines()
    tokenizer = muomni_jax.load(save_dir).tokenizer
    # Every token of every document after its BOS is predicted once: EOS included.
    assert scores[6]['tokens'] == sum(len(tokenizer.encode(line)) + 1 for line in lines)


@pytest.mark.slow
def test_convert_round_trips_a_pt_with_one_config(trained, tmp_path, corpus_sample):
    """launch.convert to the original's .pt and back, then launch.stage_a with the import's
    --config: a --config that does not describe the weights is refused at the import, in one
    line naming the overrides that do; with them, the import and the training both run."""
    pytest.importorskip('torch')
    save_dir = trained[0]
    pt = tmp_path / 'export' / 'thinker.pt'
    export = run_module('launch.convert', f'--checkpoint_dir={save_dir}', f'--output={pt}')
    assert export.returncode == 0, export.stderr[-3000:]
    assert f'Wrote {pt}' in export.stdout
    imported_dir = tmp_path / 'imported'
    import_flags = [
        f'--input={pt}',
        f'--save_dir={imported_dir}',
        f'--tokenizer={save_dir}/tokenizer.model',
        '--config=configs/tiny.py',
        '--config.ctx_len=32',  # What a .pt cannot show.
    ]
    refused = run_module('launch.convert', *import_flags)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith('error: ') and 'vocab_size 256 (--config: 32000)' in line, line
    assert not imported_dir.exists()
    overrides = line.split('launch.stage_a: ')[1].split()
    assert sorted(overrides) == [
        '--config.d_ff=128',
        '--config.d_model=64',
        '--config.n_layers=2',
        '--config.vocab_size=256',
    ]

    imported = run_module('launch.convert', *import_flags, *overrides)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert 'Imported a Thinker with n_layers=2 d_model=64 n_heads=4 kv_groups=2' in imported.stdout
    original, restored = muomni_jax.load(save_dir), muomni_jax.load(str(imported_dir))
    assert restored.config.ctx_len == 32 and restored.config.vocab_size == 256
    assert_trees_equal(original.params, restored.params)

    trains = run_module(
        'launch.stage_a',
        '--config=configs/tiny.py',
        '--config.ctx_len=32',
        *overrides,
        f'--config.save_dir={imported_dir}',
        f'--config.data_path={corpus_sample}',
        '--config.max_steps=1',
        '--config.batch_size=8',
        '--config.warmup_steps=1',
        '--config.eval_batches=1',
        '--config.sample_prompts=',
        f'--config.peak_flops_per_device={PEAK_FLOPS}',
    )
    assert trains.returncode == 0, trains.stderr[-3000:]
    assert 'Resuming from checkpoint step 0' in trains.stdout
    assert loading.available_steps(str(imported_dir)) == [0, 1]


def test_export_import_round_trips(trained, tmp_path, corpus_sample):
    """In process, what launch.convert calls: .pt and safetensors out and back in."""
    pytest.importorskip('torch')
    save_dir = trained[0]
    original = muomni_jax.load(save_dir)
    pt = tmp_path / 'export' / 'thinker.pt'
    assert original_checkpoints.export_checkpoint(save_dir, str(pt))[0] == str(pt)
    imported_dir = tmp_path / 'imported'
    base = small_config(imported_dir, corpus_sample)
    model_config = original_checkpoints.import_weights(
        str(pt), str(imported_dir), f'{save_dir}/tokenizer.model', base
    )
    assert (model_config.n_layers, model_config.d_model, model_config.kv_groups) == (2, 64, 2)
    restored = muomni_jax.load(str(imported_dir))
    assert restored.config.ctx_len == 32 and restored.config.vocab_size == 256
    assert_trees_equal(original.params, restored.params)

    # safetensors too: no torch needed on this path.
    files = original_checkpoints.export_checkpoint(save_dir, str(tmp_path / 'st' / 't.safetensors'))
    assert json.load(open(files[1]))['thinker']['d_model'] == 64
    _, params = original_format.read_weights(files[0])
    assert_trees_equal(original.params, params)

    # Importing into a folder that holds anything is refused, and leaves it as it was.
    before = sorted(os.listdir(imported_dir))
    with pytest.raises(UserError, match='is not empty'):
        original_checkpoints.import_weights(
            str(pt), str(imported_dir), f'{save_dir}/tokenizer.model', original.config
        )
    assert sorted(os.listdir(imported_dir)) == before


@pytest.mark.slow  # A training.
def test_an_import_trains_further(trained, tmp_path, corpus_sample):
    save_dir = trained[0]
    imported_dir = tmp_path / 'imported'
    files = original_checkpoints.export_checkpoint(save_dir, str(tmp_path / 'st' / 't.safetensors'))
    original_checkpoints.import_weights(
        files[0],
        str(imported_dir),
        f'{save_dir}/tokenizer.model',
        small_config(imported_dir, corpus_sample),
    )
    config = small_config(imported_dir, corpus_sample, max_steps=2, eval_every=2, save_every=2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train.train_and_evaluate(config)
    assert 'Resuming from checkpoint step 0' in out.getvalue()
    # It trains on from the exported weights: below the exported run's last validation loss.
    with open(os.path.join(save_dir, 'training_log.json')) as f:
        exported_val = [r['val_loss'] for r in json.load(f) if 'val_loss' in r][-1]
    assert summary['val_loss'] < exported_val
    assert loading.available_steps(str(imported_dir)) == [0, 2]


@pytest.mark.slow
def test_notebook_runs(trained, monkeypatch):
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    # The kernel inherits this environment: one device, as a user's notebook has.
    monkeypatch.delenv('XLA_FLAGS', raising=False)
    monkeypatch.setenv('MUOMNI_CHECKPOINT_DIR', trained[0])
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name='python3',
        resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}},
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    assert 'restored step 6' in text and 'parameters on 1 cpu device(s)' in text
    assert "'The cat sat on the' → " in text and '%' in text
    assert text.count('[greedy]') == 3 and text.count('[sampled]') == 3
    assert any('image/png' in o.get('data', {}) for o in outputs if o.output_type == 'display_data')


@pytest.mark.slow  # Two trainings.
def test_a_run_on_tokenizer_path_keeps_a_copy_and_export_needs_no_tokenizer(
    trained, tmp_path, corpus_sample
):
    tokenizer = os.path.join(trained[0], 'tokenizer.model')
    save_dir = tmp_path / 'with_tokenizer_path'
    config = small_config(
        save_dir,
        corpus_sample,
        tokenizer_path=tokenizer,
        max_steps=1,
        save_every=1,
        eval_every=1,
        log_every=1,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        train.train_and_evaluate(config)
    with open(tokenizer, 'rb') as f:
        assert (save_dir / 'tokenizer.model').read_bytes() == f.read()
    assert muomni_jax.load(str(save_dir)).tokenizer.vocab_size == 256

    # Weights do not need the tokenizer: export works on a save_dir without one.
    (save_dir / 'tokenizer.model').unlink()
    out = tmp_path / 'export' / 'thinker.safetensors'
    assert original_checkpoints.export_checkpoint(str(save_dir), str(out))[0] == str(out)
    with pytest.raises(UserError, match='tokenizer.model is missing'):
        muomni_jax.load(str(save_dir))

    # Resuming with another tokenizer than the one the run was trained with is refused.
    with open(tokenizer, 'rb') as f:
        (save_dir / 'tokenizer.model').write_bytes(f.read())
    with open(corpus_sample, encoding='utf-8') as f:
        texts = f.read().splitlines()[300:]
    other = tmp_path / 'other.model'
    tokenizer_lib.train_tokenizer(texts, 256, 20000).save(str(other))
    config.tokenizer_path, config.max_steps = str(other), 2
    with pytest.raises(UserError, match='holds a run with another tokenizer than tokenizer_path'):
        train.train_and_evaluate(config)


def _delete_step_before_first_call(monkeypatch, owner, name, step_dir, path_arg):
    """Wraps owner.name so that its first call on a path in step_dir (its argument path_arg)
    first deletes step_dir, as a live run's max_to_keep does: the deletion lands at a known
    point of the read, not by a timer."""
    original = getattr(owner, name)
    calls = []

    def deleting_first(*args, **kwargs):
        if not calls and str(args[path_arg]).startswith(str(step_dir)):
            shutil.rmtree(step_dir)
            calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, deleting_first)
    return calls


@pytest.mark.parametrize('deleted_during', ['scan', 'restore'])
def test_a_reader_skips_a_step_deleted_under_it(
    trained, tmp_path, monkeypatch, capsys, deleted_during
):
    save_dir = tmp_path / 'run'
    shutil.copytree(trained[0], save_dir)
    step_3 = muomni_jax.load(str(save_dir), 3)
    capsys.readouterr()
    if deleted_during == 'scan':  # Gone as the scan checks it: skipped without a word.
        calls = _delete_step_before_first_call(
            monkeypatch, loading.ocp.utils, 'is_checkpoint_finalized', save_dir / '6', 0
        )
    else:  # Gone as the read of its arrays begins.
        calls = _delete_step_before_first_call(
            monkeypatch, loading.ocp.PyTreeCheckpointer, 'restore', save_dir / '6', 1
        )
    newest = muomni_jax.load(str(save_dir))
    assert calls  # The deletion happened inside the read.
    assert_trees_equal(step_3.params, newest.params)
    err = capsys.readouterr().err.strip().splitlines()
    expected = (
        []
        if deleted_during == 'scan'
        else [
            f'Checkpoint step 6 of {save_dir} was deleted while it was read (a live run keeps its '
            'newest max_to_keep steps); reading step 3.'
        ]
    )
    assert err == expected


def test_a_named_step_deleted_under_its_read_is_one_error(trained, tmp_path, monkeypatch):
    save_dir = tmp_path / 'run'
    shutil.copytree(trained[0], save_dir)
    calls = _delete_step_before_first_call(
        monkeypatch, loading.ocp.PyTreeCheckpointer, 'restore', save_dir / '6', 1
    )
    with pytest.raises(
        UserError,
        match=r'^step 6 of .* was deleted while it was read .*'
        r'available steps are now \[3\]$',
    ):
        muomni_jax.load(str(save_dir), 6)
    assert calls
