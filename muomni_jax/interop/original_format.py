"""Weight exchange with the original μOmni PyTorch Thinker (shared/spec/thinker.md).

Formats:
  .pt           torch.save({"model": state_dict}); the original's ThinkerLM loads it with
                load_state_dict(strict=True). Only this format needs torch, imported on use.
  .safetensors  the same tensors with keys prefixed "thinker.", beside a config.json whose
                "thinker" object holds the model fields. No torch needed.

Our parameter paths mirror the PyTorch names (blocks/0/attn/q/kernel <-> blocks.0.attn.q.weight),
so a conversion is a rename plus a transpose of linear kernels: nnx stores (in, out), PyTorch
(out, in). State dicts here are {name: float32 numpy array} in PyTorch layout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from muomni_jax.errors import UserError, first_line
from muomni_jax.io.atomic_write import write_atomically
from muomni_jax.model.thinker import ORIGINAL_FIELDS, SHAPE_FIELDS, ThinkerConfig, abstract_model

SAFETENSORS_PREFIX = 'thinker.'
COMPILED_PREFIX = '_orig_mod.'  # torch.compile wraps the module and prefixes its keys.
# Model fields that no weight shape shows; an import takes them from the training config given.
UNSEEN_FIELDS = ('n_heads', 'dropout', 'rope_theta', 'ctx_len', 'num_experts_per_tok')
CONFIG_FIELDS = ORIGINAL_FIELDS  # The "thinker" object of the original's config.json.
# The original's config, beside its weights file (not a save_dir's config.json).
CONFIG_FILE = 'config.json'


# ----------------------------------------------------------------------------------------------
# Params <-> state dict


def _torch_name(path) -> tuple[str, bool]:
    """An nnx.State leaf path -> (PyTorch key, whether the array is transposed between them)."""
    parts = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    leaf = parts[-1]
    if leaf == 'kernel':
        return '.'.join(parts[:-1] + ['weight']), True
    if leaf == 'embedding':
        return '.'.join(parts[:-1] + ['weight']), False
    return '.'.join(parts), False


def to_state_dict(params: nnx.State) -> dict[str, np.ndarray]:
    """The Thinker's params as the original's state_dict (float32 numpy, PyTorch layout)."""
    state_dict = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, transpose = _torch_name(path)
        value = np.asarray(jax.device_get(value), np.float32)
        state_dict[name] = np.ascontiguousarray(value.T if transpose else value)
    return state_dict


def expected_shapes(model_config: ThinkerConfig) -> dict[str, tuple[int, ...]]:
    """The original's state_dict keys and shapes for a config."""
    _, abstract = abstract_model(model_config)
    shapes = {}
    for path, value in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name, transpose = _torch_name(path)
        shapes[name] = tuple(reversed(value.shape)) if transpose else tuple(value.shape)
    return shapes


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops torch.compile's `_orig_mod.` from every key."""
    return {k.replace(COMPILED_PREFIX, ''): v for k, v in state_dict.items()}


def infer_config(
    state_dict: Mapping[str, np.ndarray], base: Mapping[str, Any] | None = None
) -> ThinkerConfig:
    """A ThinkerConfig for these weights.

    Fields in `base` (e.g. config.json's "thinker" object) win, except kv_groups: the original
    ignores its config's kv_groups, so the group count is read from the k weight's shape. Fields
    that base lacks come from the shapes where they show (vocab, width, depth, d_ff, GQA, SwiGLU,
    MoE, experts) and from ThinkerConfig's defaults otherwise (n_heads 4, rope_theta, ctx_len).
    """
    base = {k: v for k, v in dict(base or {}).items() if k in CONFIG_FIELDS}
    found: dict[str, Any] = {}
    if 'tok_emb.weight' in state_dict:
        found['vocab_size'], found['d_model'] = state_dict['tok_emb.weight'].shape
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r'blocks\.(\d+)\.', k))}
    if layers:
        found['n_layers'] = max(layers) + 1
    found['use_gqa'] = 'blocks.0.attn.q.weight' in state_dict
    found['use_moe'] = 'blocks.0.moe.router.weight' in state_dict
    if found['use_moe']:
        found['num_experts'] = state_dict['blocks.0.moe.router.weight'].shape[0]
    mlp = 'blocks.0.moe.experts.0.' if found['use_moe'] else 'blocks.0.mlp.'
    found['use_swiglu'] = mlp + 'gate_proj.weight' in state_dict
    first = mlp + ('gate_proj.weight' if found['use_swiglu'] else 'fc1.weight')
    if first in state_dict:
        found['d_ff'] = state_dict[first].shape[0]
    fields = {**found, **base}
    use_gqa = fields['use_gqa']
    if use_gqa and 'blocks.0.attn.k.weight' in state_dict and 'd_model' in fields:
        n_heads = fields.get('n_heads', ThinkerConfig.n_heads)
        head_dim = fields['d_model'] // n_heads
        groups, rest = divmod(state_dict['blocks.0.attn.k.weight'].shape[0], head_dim)
        if not rest and groups:
            fields['kv_groups'] = groups
    try:
        config = ThinkerConfig.from_config(fields)
        config.validate()
    except (ValueError, TypeError) as e:
        raise UserError(
            f'the weights do not describe a valid Thinker ({e}): check the config '
            'or pass the right n_heads'
        ) from None
    return config


def from_state_dict(state_dict: Mapping[str, Any], model_config: ThinkerConfig) -> nnx.State:
    """The original's state_dict -> our params (float32, host arrays), after checking that the
    keys and shapes are exactly those of `model_config`; every mismatch is named in one error."""
    state_dict = strip_prefixes(state_dict)
    expected = expected_shapes(model_config)
    problems = [
        f'missing {k} {list(shape)}' for k, shape in expected.items() if k not in state_dict
    ]
    problems += [f'unexpected {k}' for k in state_dict if k not in expected]
    problems += [
        f'{k} has shape {list(np.shape(state_dict[k]))}, expected {list(shape)}'
        for k, shape in expected.items()
        if k in state_dict and tuple(np.shape(state_dict[k])) != shape
    ]
    if problems:
        raise UserError(
            f'the weights do not match the Thinker config ({_describe(model_config)}):'
            f' {"; ".join(problems)}'
        )
    _, abstract = abstract_model(model_config)

    def convert(path, _):
        name, transpose = _torch_name(path)
        value = np.asarray(state_dict[name], np.float32)
        return jnp.asarray(value.T if transpose else value)

    return jax.tree_util.tree_map_with_path(convert, abstract)


def _describe(config: ThinkerConfig) -> str:
    return ', '.join(f'{k}={getattr(config, k)}' for k in SHAPE_FIELDS)


def original_compatibility_warning(config: ThinkerConfig) -> str | None:
    """The original always builds n_heads // 2 kv groups: other group counts will not load there."""
    if config.use_gqa and config.kv_groups != config.n_heads // 2:
        return (
            f'kv_groups={config.kv_groups} but the original ThinkerLM always builds '
            f'n_heads // 2 = {config.n_heads // 2} groups: its strict load_state_dict will '
            'reject these weights (this project reads them back fine)'
        )
    return None


# ----------------------------------------------------------------------------------------------
# Files


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError(
            '.pt files need PyTorch: pip install torch==2.13.0 (CPU), or use the '
            '.safetensors format, which does not'
        ) from None
    return torch


def save_pt(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    """{"model": state_dict} as the original's training checkpoints hold it."""
    torch = _torch()
    torch.save({'model': {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}, path)


def load_pt(path: str) -> dict[str, np.ndarray]:
    """The model state_dict of a .pt file: {"model": ...} (a training checkpoint) or a bare one."""
    torch = _torch()
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        # A file that is not a torch.save archive fails in many ways (UnpicklingError, KeyError,
        # RuntimeError, ...): each is the same answer to the user.
        raise UserError(
            f'cannot read {path} as a PyTorch checkpoint ({first_line(e, 200)}): '
            'give a file torch.save wrote, holding {"model": state_dict}'
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get('model'), Mapping):
        obj = obj['model']
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f'{path} holds neither {{"model": state_dict}} nor a state_dict')
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def save_safetensors(path: str, state_dict: Mapping[str, np.ndarray], config: ThinkerConfig) -> str:
    """Writes `path` with "thinker."-prefixed keys and config.json beside it; returns the latter.

    Refuses (UserError) when a config.json that no export wrote is already there.
    """
    from safetensors.numpy import save_file

    _check_config_json_is_free(path)
    save_file(
        {SAFETENSORS_PREFIX + k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path
    )
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    write_atomically(
        config_path,
        json.dumps({'thinker': {k: getattr(config, k) for k in CONFIG_FIELDS}}, indent=1),
    )
    return config_path


def _check_config_json_is_free(path: str) -> None:
    """Refuses to replace a config.json beside `path` that is not an export's (a run's save_dir
    holds one: replacing it would leave loading.read_config reading the wrong fields)."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    if not os.path.exists(config_path):
        return
    try:
        with open(config_path) as f:
            existing = json.load(f)
    except (OSError, ValueError):
        existing = None
    if not isinstance(existing, dict) or set(existing) != {'thinker'}:
        raise UserError(
            f"{config_path} exists and is not an exported config.json (a run's "
            'save_dir?): write the .safetensors into a folder of its own'
        )


def load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """(thinker state_dict, config.json's "thinker" object or None when there is no config.json).

    Keys of other μOmni modules (not prefixed "thinker.") are left out when any key is prefixed.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError, ValueError) as e:
        raise UserError(
            f'cannot read {path} as safetensors ({first_line(e, 200)}): give a file '
            'launch.convert or safetensors.save_file wrote'
        ) from None
    if any(k.startswith(SAFETENSORS_PREFIX) for k in tensors):
        tensors = {
            k[len(SAFETENSORS_PREFIX) :]: v
            for k, v in tensors.items()
            if k.startswith(SAFETENSORS_PREFIX)
        }
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    thinker_config = None
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                thinker_config = json.load(f).get('thinker')
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(
                f'{config_path} beside {path} is not a readable config.json '
                f'({first_line(e, 200)}): fix it, or move it away to import the '
                'weights with --config alone'
            ) from None
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}, thinker_config


def read_weights(
    path: str, base: Mapping[str, Any] | None = None
) -> tuple[ThinkerConfig, nnx.State]:
    """A .pt or .safetensors file -> (its ThinkerConfig, our params). `base` supplies model fields
    the file cannot show (n_heads, rope_theta, ctx_len ...); a safetensors config.json wins."""
    if not os.path.exists(path):
        raise UserError(f'{path} does not exist')
    if path.endswith('.safetensors'):
        state_dict, file_config = load_safetensors(path)
        base = {**dict(base or {}), **dict(file_config or {})}
    elif path.endswith(('.pt', '.pth')):
        state_dict = load_pt(path)
    else:
        raise UserError(f'{path}: the format is chosen by the suffix, .pt or .safetensors')
    state_dict = strip_prefixes(state_dict)
    config = infer_config(state_dict, base)
    return config, from_state_dict(state_dict, config)


def write_weights(path: str, params: nnx.State, config: ThinkerConfig) -> list[str]:
    """Writes params as a .pt or .safetensors file (by suffix); returns the files written."""
    state_dict = to_state_dict(params)
    if path.endswith('.safetensors'):
        return [path, save_safetensors(path, state_dict, config)]
    if path.endswith(('.pt', '.pth')):
        save_pt(path, state_dict)
        return [path]
    raise UserError(f'{path}: name the output .pt or .safetensors to choose the format')
