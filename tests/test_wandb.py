"""--config.wandb_project logs what TensorBoard gets, in W&B's offline mode; without it wandb is
never imported."""

import glob
import json
import struct

import pytest

from muomni_jax.errors import UserError
from muomni_jax.training import reporting, train
from tests.support.configs import small_config
from tests.support.logs import read_events
from tests.support.processes import run_code


def _wandb_records(path):
    """The protobuf Records of an offline run's .wandb file (wandb has no public reader): a
    7-byte ':W&B' header, then LevelDB-log chunks in 32 KiB blocks, each with a 7-byte header
    (crc32, length, type: 1 whole record, 2 first part, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B'
    position, pending = 7, b''
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # A block's tail too short for a header is padding.
            position += left_in_block
            continue
        _, length, kind = struct.unpack('<IHB', data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b''
            yield record


def _wandb_history(wandb_dir):
    """{step: {key: value}} of the one offline run under wandb_dir."""
    [path] = glob.glob(str(wandb_dir / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    history = {}
    for record in _wandb_records(path):
        if record.WhichOneof('record_type') == 'history':
            # W&B keeps a key holding '/' as its parts.
            items = {
                item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history.setdefault(items.pop('_step'), {}).update(
                {k: v for k, v in items.items() if not k.startswith('_')}
            )
    return history


@pytest.mark.slow  # wandb starts its own service process, even offline.
def test_wandb_offline_gets_the_tensorboard_scalars_and_samples(
    monkeypatch, tmp_path, corpus_sample
):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    save_dir = tmp_path / 'run'
    train.train_and_evaluate(
        small_config(
            save_dir,
            corpus_sample,
            wandb_project='muomni-test',
            sample_prompts='The cat sat on the|Python is a',
            sample_max_new_tokens=4,
        )
    )
    history = _wandb_history(tmp_path)
    events = read_events(save_dir)  # {tag: [(step, value or text)]}
    assert any(tag.startswith('samples/') for tag in events) and 'train/loss' in events
    for tag, values in events.items():
        for step, value in values:
            if isinstance(value, str):
                assert history[step][tag] == value, (tag, step)
            else:  # TensorBoard keeps float32.
                assert history[step][tag] == pytest.approx(value, rel=1e-6), (tag, step)
    logged = {(tag, step) for step, items in history.items() for tag in items}
    assert logged == {(tag, step) for tag, values in events.items() for step, _ in values}
    # training_log.json is the record both are written from.
    log = json.loads((save_dir / 'training_log.json').read_text())
    for record in log:
        if 'loss' in record:
            assert history[record['step']]['train/loss'] == pytest.approx(record['loss'])


@pytest.mark.slow  # A fresh process: only there is sys.modules free of earlier tests' imports.
def test_without_wandb_project_wandb_is_never_imported(tmp_path, corpus_sample):
    # small_config's values on one device, without tests.support.environment (its 8 devices and
    # fresh caches): test_launch's CLI run compiled the same steps into the session's cache.
    config = small_config(tmp_path / 'run', corpus_sample).to_json()
    code = (
        'import json, sys\n'
        'from configs import tiny\n'
        'from muomni_jax.training import train\n'
        'config = tiny.get_config()\n'
        'config.update(json.loads(sys.argv[1]))\n'
        'train.train_and_evaluate(config)\n'
        'assert "wandb" not in sys.modules, "wandb was imported"\n'
        'print("wandb not imported")\n'
    )
    result = run_code(code, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'wandb not imported' in result.stdout


def test_wandb_project_without_wandb_installed_is_a_clear_error(monkeypatch):
    real_find_spec = reporting.importlib.util.find_spec
    monkeypatch.setattr(
        reporting.importlib.util,
        'find_spec',
        lambda name, *a: None if name == 'wandb' else real_find_spec(name, *a),
    )
    with pytest.raises(
        UserError,
        match=r"^wandb_project 'p' needs the wandb package: pip "
        r'install wandb==0.31.0',
    ):
        reporting.check_wandb_installed('p')
    reporting.check_wandb_installed('')  # Not set: nothing to check.


def test_only_process_0_starts_a_wandb_run(monkeypatch, tmp_path):
    started = []
    # The stub returns None, so the reporters log to TensorBoard only.
    monkeypatch.setattr(reporting, '_start_wandb', lambda *args: started.append(args))
    other = reporting.Reporter(
        str(tmp_path / 'other'), total_steps=2, start_step=0, enabled=False, wandb_project='p'
    )
    other.write_scalars(1, {'loss': 1.0})
    other.close()
    assert not started
    main = reporting.Reporter(
        str(tmp_path / 'main'),
        total_steps=2,
        start_step=0,
        wandb_project='p',
        run_config={'seed': 0},
    )
    main.close()
    assert started == [('p', str(tmp_path / 'main'), {'seed': 0})]
