"""Every bad input ends in one clear UserError, before save_dir changes by a single byte.

The launcher turns a UserError into `error: <message>` and exit status 2 (tested at the end
through a subprocess); here train_and_evaluate runs in-process, one case at a time, each on a
copy of the session's trained run (conftest.trained_run: 6 steps, d_model 64, vocab 256,
batch 8, checkpoints at steps 3 and 6).
"""

import hashlib
import json
import os
import pathlib
import shutil

import pytest

from muomni_jax.data import document_files
from muomni_jax.errors import UserError
from muomni_jax.training import train
from tests.support.configs import SMALL, small_config
from tests.support.processes import run_stage_a


@pytest.fixture(scope='module')
def trained_dir(trained_run):
    return pathlib.Path(trained_run[0])


def tree_digest(root) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<dir>' for every folder) under root."""
    if not os.path.exists(root):
        return {}
    digest = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            digest[os.path.relpath(os.path.join(folder, name), root)] = '<dir>'
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# Each case: (overrides given tmp_path, the trained run and the sample corpus; expected message).
# save_dir is a copy of the trained run unless the case names its own.
CASES = {
    'missing_data_path': (
        lambda t, run, data: dict(data_path=str(t / 'nope.txt')),
        'does not exist: point --config.data_path at a data file, directory or glob',
    ),
    'directory_without_text': (
        lambda t, run, data: dict(data_path=str(_write(t / 'docs' / 'a.md', b'text\n').parent)),
        'is a directory with no data files (.txt, .text, .jsonl',
    ),
    'empty_file': (
        lambda t, run, data: dict(data_path=str(_write(t / 'empty.txt', b''))),
        'holds no training text',
    ),
    'blank_lines_only': (
        lambda t, run, data: dict(data_path=str(_write(t / 'blank.txt', b'\n\n   \n\t\n' * 50))),
        'holds no training text',
    ),
    'binary_file': (
        lambda t, run, data: dict(data_path=str(_write(t / 'model.txt', bytes(range(256)) * 400))),
        'looks binary, not UTF-8 text',
    ),
    'enormous_line': (
        lambda t, run, data: dict(data_path=str(_write(t / 'one_line.txt', b'word ' * 10 * 2**20))),
        'has a line of over 10 MB',
    ),
    'vocab_too_large': (
        lambda t, run, data: dict(save_dir=str(t / 'fresh'), vocab_size=60000),
        'the training text supports at most vocab_size=',
    ),
    'tokenizer_vocab_differs': (
        lambda t, run, data: dict(
            save_dir=str(
                _write(
                    t / 'tok_only' / 'tokenizer.model', (run / 'tokenizer.model').read_bytes()
                ).parent
            ),
            vocab_size=300,
        ),
        'has 256 pieces but vocab_size is 300: set --config.vocab_size=256',
    ),
    'd_model_not_divisible': (
        lambda t, run, data: dict(d_model=66),
        'd_model (66) must be divisible by n_heads (4)',
    ),
    'n_heads_not_divisible_by_kv_groups': (
        lambda t, run, data: dict(kv_groups=3),
        'n_heads (4) must be divisible by kv_groups (3)',
    ),
    'ctx_len_below_2': (lambda t, run, data: dict(ctx_len=1), 'ctx_len (1) must be at least 2'),
    'batch_not_divisible_by_devices': (
        lambda t, run, data: dict(batch_size=12),
        "must split evenly over the mesh's 8 devices",
    ),
    'batch_not_divisible_by_accumulation': (
        lambda t, run, data: dict(gradient_accumulation_steps=3),
        'batch_size (8) must be divisible by gradient_accumulation_steps (3)',
    ),
    'zero_learning_rate': (
        lambda t, run, data: dict(learning_rate=0.0),
        'learning_rate (0.0) must be > 0',
    ),
    'negative_learning_rate': (
        lambda t, run, data: dict(learning_rate=-1e-3),
        'learning_rate (-0.001) must be > 0',
    ),
    'other_model_shape': (
        lambda t, run, data: dict(d_model=32, n_layers=3),
        'holds a run with another model shape (n_layers 2 -> 3, d_model 64 -> 32)',
    ),
    'other_batch_size': (
        lambda t, run, data: dict(batch_size=16),
        'steps per epoch, this data and batch_size give',
    ),
    'restore_step_not_saved': (
        lambda t, run, data: dict(restore_step=5),
        'restore_step 5 is not in',
    ),
    'save_dir_under_a_file': (
        lambda t, run, data: dict(save_dir=str(_write(t / 'a_file', b'x') / 'run')),
        'is a file, not a directory',
    ),
    'unknown_tfds_dataset': (
        lambda t, run, data: dict(tfds_name='lm1bb'),
        "TFDS dataset 'lm1bb' does not exist: did you mean 'lm1b'?",
    ),
    'zero_nonfinite_limit': (
        lambda t, run, data: dict(max_consecutive_nonfinite=0),
        'max_consecutive_nonfinite (0) must be positive',
    ),
    'mixture_weight_zero': (
        lambda t, run, data: dict(mixture=f'a={data}:0,b={data}:1'),
        "mixture source 'a' has weight 0: weights must be > 0",
    ),
    'mixture_weight_negative': (
        lambda t, run, data: dict(mixture=f'a={data}:-0.5'),
        "mixture source 'a' has weight -0.5: weights must be > 0",
    ),
    'mixture_weight_not_a_number': (
        lambda t, run, data: dict(mixture=f'a={data}:heavy'),
        "has weight 'heavy', not a number",
    ),
    'mixture_duplicate_names': (
        lambda t, run, data: dict(mixture=f'a={data}:1,a={data}:2'),
        "mixture source name 'a' appears twice",
    ),
    'mixture_does_not_parse': (
        lambda t, run, data: dict(mixture=f'a={data}'),
        'does not parse: write NAME=SOURCE:WEIGHT[:TEXT_KEY] entries',
    ),
    'mixture_missing_path': (
        lambda t, run, data: dict(mixture=f'a={data}:1,b={t / "nope.txt"}:1'),
        "mixture source 'b' " + '{tmp}/nope.txt does not exist: point it at a data file',
    ),
    'mixture_source_without_text': (
        lambda t, run, data: dict(mixture=f'a={data}:1,b={_write(t / "e.txt", b"")}:1'),
        "mixture source 'b' ({tmp}/e.txt) holds no training text",
    ),
    'mixture_source_without_text_new_tokenizer': (
        lambda t, run, data: dict(
            save_dir=str(t / 'fresh'), mixture=f'a={data}:1,b={_write(t / "e.txt", b"")}:1'
        ),
        "mixture source 'b' ({tmp}/e.txt) holds no training text",
    ),
    'mixture_on_resume_of_another_mixture': (
        lambda t, run, data: dict(mixture=f'a={data}:1'),
        'was trained on a single data_path, not on a=' + '{data}:1: resume with the same '
        '--config.mixture',
    ),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_clear_error_and_leaves_save_dir_untouched(
    case, tmp_path, trained_dir, corpus_sample
):
    make_overrides, expected = CASES[case]
    save_dir = tmp_path / 'run'
    shutil.copytree(trained_dir, save_dir)
    overrides = make_overrides(tmp_path, trained_dir, corpus_sample)
    config = small_config(save_dir, corpus_sample, max_steps=2, save_every=2, eval_every=2)
    config.update(overrides)
    before = tree_digest(config.save_dir)
    with pytest.raises(UserError) as error:
        train.train_and_evaluate(config)
    message = str(error.value)
    assert expected.format(tmp=tmp_path, data=corpus_sample) in message
    assert '\n' not in message and len(message) < 400
    assert tree_digest(config.save_dir) == before


def test_unwritable_save_dir(tmp_path, corpus_sample):
    if os.geteuid() == 0:
        pytest.skip('root writes through directory permissions')
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(UserError, match='is not writable'):
            train.train_and_evaluate(small_config(locked / 'run', corpus_sample))
    finally:
        locked.chmod(0o755)
    assert os.listdir(locked) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    'flag, expected',
    [
        (
            '--config.batch_sze=8',
            'error: unknown config field batch_sze (did you mean batch_size?): see configs/tiny.py',
        ),
        ('--config.mesh.fsd=2', 'error: unknown config field mesh.fsd (did you mean mesh.fsdp?)'),
        (
            '--config.learning_rate=fast',
            "error: flag --config.learning_rate=fast: could not convert string to float: 'fast'",
        ),
    ],
)
def test_launcher_flag_errors_are_one_line(flag, expected, tmp_path):
    result = run_stage_a(flag, f'--config.save_dir={tmp_path / "run"}')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_launcher_data_error_is_one_line_and_save_dir_untouched(tmp_path, trained_dir):
    save_dir = tmp_path / 'run'
    shutil.copytree(trained_dir, save_dir)
    before = tree_digest(save_dir)
    empty = _write(tmp_path / 'empty.txt', b'')
    result = run_stage_a(*SMALL, f'--config.data_path={empty}', f'--config.save_dir={save_dir}')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f'error: {empty} holds no training text (empty, blank documents only, or all in '
        f'validation): point data_path at {document_files.FORMATS_HELP}'
    )
    assert 'Traceback' not in result.stderr
    assert tree_digest(save_dir) == before
    assert json.load(open(save_dir / 'config.json'))['batch_size'] == 8
