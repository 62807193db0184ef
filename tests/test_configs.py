"""The config files: tiny.py writes out the model, and loading any config stays light."""

import dataclasses
import pathlib
import subprocess
import sys

from configs import tiny
from muomni_jax.model.thinker import ThinkerConfig

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_tiny_writes_out_every_model_field_at_its_default():
    config = tiny.get_config()
    model_fields = {field.name for field in dataclasses.fields(ThinkerConfig)}
    source = (REPO / 'configs' / 'tiny.py').read_text(encoding='utf-8')
    written = {name for name in model_fields if f'    config.{name} = ' in source}
    assert written == model_fields
    # The file's model values are the model's defaults (the original thinker_tiny.json).
    assert ThinkerConfig.from_config(config) == ThinkerConfig()


def test_loading_every_config_imports_neither_jax_nor_flax():
    names = sorted(path.stem for path in (REPO / 'configs').glob('*.py') if path.stem != '__init__')
    assert 'tiny' in names and 'cpu_demo' in names
    script = (
        'import importlib, sys\n'
        f'for name in {names!r}:\n'
        '    importlib.import_module("configs." + name).get_config()\n'
        'print(sorted(m for m in ("jax", "flax", "optax") if m in sys.modules))\n'
    )
    result = subprocess.run(
        [sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == '[]'
