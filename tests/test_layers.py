"""The package's layers (muomni_jax/__init__.py): a module imports only its own layer and those
below it, and the data pipeline knows nothing of the model. Read from the source with ast, lazy
imports inside functions included, so a violation fails here before it can become a cycle.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'muomni_jax'
# Bottom up. A top-level module is its own layer: errors at the bottom, and the package's lazy
# public face (muomni_jax/__init__.py) over everything.
LAYERS = ('errors', 'io', 'parallel', 'model', 'data', 'inference', 'training', 'interop', 'face')
# Pairs the ranks alone would allow but the design does not.
FORBIDDEN = {('data', 'model')}


def layer_of(module: str) -> str:
    """'muomni_jax.data.token_cache' -> 'data'; 'muomni_jax' (the package face) -> 'face'."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else 'face'


def module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix('')
    parts = list(relative.parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, muomni_jax module) of every import in the file; `from muomni_jax.x import y` names
    muomni_jax.x.y when y is a module, which is the same layer as muomni_jax.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith('muomni_jax')]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.startswith('muomni_jax')
        ):
            if node.module == 'muomni_jax':
                found += [(node.lineno, f'muomni_jax.{a.name}') for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def violations(paths, names=None) -> list[str]:
    """Every import in `paths` that breaks the layers; names: their module names (default: from
    their place under muomni_jax/)."""
    problems = []
    for path, name in zip(paths, names or [module_name(p) for p in paths]):
        own = layer_of(name)
        for line, target in imported_modules(path):
            theirs = layer_of(target)
            if theirs not in LAYERS or own not in LAYERS:
                problems.append(f'{path.name}:{line}: {target} is in no layer')
            elif LAYERS.index(theirs) > LAYERS.index(own) or (own, theirs) in FORBIDDEN:
                problems.append(f'{name}:{line} ({own}) imports {target} ({theirs})')
    return problems


def test_no_module_imports_a_layer_above_its_own():
    paths = sorted(PACKAGE.rglob('*.py'))
    assert len(paths) > 30
    assert violations(paths) == []


def test_at_most_eight_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob('*.py'))
    assert len(top) <= 8, top
    assert all(
        (PACKAGE / layer / '__init__.py').exists()
        for layer in LAYERS
        if layer != 'face' and not (PACKAGE / f'{layer}.py').exists()
    )


@pytest.mark.parametrize(
    'source, expected',
    [
        ('from muomni_jax.training import steps\n', 'imports muomni_jax.training (training)'),
        ('from muomni_jax import interop\n', 'imports muomni_jax.interop (interop)'),
        (
            'def f():\n    from muomni_jax.model import thinker\n',
            'imports muomni_jax.model (model)',
        ),
    ],
)
def test_the_check_finds_an_upward_or_forbidden_import(tmp_path, source, expected):
    path = tmp_path / 'probe.py'
    path.write_text(source)
    found = violations([path], ['muomni_jax.data.probe'])
    assert len(found) == 1 and expected in found[0], found


def test_the_model_and_data_layers_never_see_the_config_dict():
    """They take ThinkerConfig, the plan's DataPlan or plain values: training/run_plan.py is the
    one reader of the ConfigDict, so neither layer imports ml_collections."""
    readers = []
    for layer in ('model', 'data'):
        for path in sorted((PACKAGE / layer).glob('*.py')):
            for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or '']
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(name.split('.')[0] == 'ml_collections' for name in names):
                    readers.append(f'{layer}/{path.name}:{node.lineno}')
    assert readers == []
