"""The --config flag of the launchers that take a training config (stage_a, prepare_data).

A bad flag, an unknown field or a config file that fails to load becomes one `error:` line
(a traceback with --verbose).
"""

import difflib
import re
import runpy

import ml_collections
from absl import flags
from ml_collections import config_flags

from launch import cli

CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file.', lock_config=True
)


def _unknown_field_line(error: Exception, argv: list[str]) -> str | None:
    """`unknown config field ...` with a hint, for the KeyError/AttributeError of config_flags."""
    key = re.search(r"'([^'\\]+)\\?'", str(error))
    if key is None:
        return None
    overrides = [a[len('--config.') :].split('=')[0] for a in argv if a.startswith('--config.')]
    field = next((o for o in overrides if o.split('.')[-1] == key.group(1)), key.group(1))
    config_file = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
    suggestion = re.search(r'Did you mean "([^"]+)"', str(error))
    if suggestion:
        parent = field.rsplit('.', 1)[0] + '.' if '.' in field else ''
        hint = parent + suggestion.group(1)
    else:  # ml_collections only hints for some names; offer the closest field of the config.
        close = difflib.get_close_matches(field, _field_names(config_file), n=1)
        hint = close[0] if close else None
    hint = f' (did you mean {hint}?)' if hint else ''
    return f'unknown config field {field}{hint}: see {config_file} for the valid fields'


def _field_names(config_file: str) -> list[str]:
    try:
        config = runpy.run_path(config_file.split(':')[0])['get_config']()
    except Exception:
        return []
    names = []
    for name, value in config.items():
        names.append(name)
        if hasattr(value, 'keys'):
            names.extend(f'{name}.{sub}' for sub in value.keys())
    return names


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a flag or config error becomes one line (a traceback with --verbose)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:
        if '--verbose' in argv or '--verbose=true' in argv:
            raise
        if isinstance(e, (KeyError, AttributeError)):
            line = _unknown_field_line(e, argv)
            if line:
                cli.fail(line)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = lines[0] if lines else type(e).__name__
        if message.endswith(':') and len(lines) > 1:
            message += ' ' + lines[-1]
        cli.fail(message)


def value() -> ml_collections.ConfigDict:
    """The parsed config; a config file that failed to load exits with one line."""
    try:
        config = CONFIG.value
        config.keys()  # config_flags reports a config file that failed to load only on first use.
    except Exception as e:
        if cli.VERBOSE.value:
            raise
        cli.fail(
            f'cannot load --config={flags.FLAGS["config"].serialize().split("=", 1)[-1]}: '
            f'{str(e).strip().splitlines()[-1].strip()}'
        )
    return config
