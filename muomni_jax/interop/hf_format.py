"""Weight exchange with Hugging Face transformers: a Thinker <-> a LlamaForCausalLM or
MixtralForCausalLM folder (config.json, model.safetensors, generation_config.json, tokenizer).

The dense Thinker computes what a Llama computes, its MoE variant what a Mixtral computes
(BUILD_NOTES.md lists what was checked in the transformers source). Only the names differ, and MHA's
fused qkv, which a Llama holds as q_proj, k_proj and v_proj with num_key_value_heads = heads.

This module maps the original's state_dict (original_format.py: its names, PyTorch layout) to
Hugging Face's and back; original_format.py alone maps that state_dict to our params.
transformers is needed only to write the tokenizer files, and is imported on use.

Shapes: D d_model, F d_ff, H heads, G kv groups, K head dim, E experts, V vocab.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError, first_line
from muomni_jax.interop import original_format
from muomni_jax.model.thinker import RMS_NORM_EPS, ThinkerConfig

LLAMA = 'LlamaForCausalLM'
MIXTRAL = 'MixtralForCausalLM'
_MODEL_TYPES = {LLAMA: 'llama', MIXTRAL: 'mixtral'}
WEIGHTS_FILE = 'model.safetensors'
# The model's config, as transformers names it (not a save_dir's config.json).
CONFIG_FILE = 'config.json'
# The SentencePiece model, beside the fast tokenizer: our own import reads it back.
TOKENIZER_FILE = 'tokenizer.model'
WEIGHTS_INDEX = 'model.safetensors.index.json'
# Every export folder holds this file, and only a folder holding it is ever replaced: an export
# must never delete what it did not write.
EXPORT_MARKER = '.muomni-jax-export'
_MIXTRAL_EXPERT = {'gate_proj': 'w1', 'down_proj': 'w2', 'up_proj': 'w3'}


# ----------------------------------------------------------------------------------------------
# Names: the original's state_dict <-> Hugging Face's


def _layer_names(config: ThinkerConfig, i: int) -> list[tuple[str, str]]:
    """(original key, Hugging Face key) of layer i; MHA's qkv is left to the callers."""
    ours, hf = f'blocks.{i}.', f'model.layers.{i}.'
    names = [
        (ours + 'norm1.weight', hf + 'input_layernorm.weight'),
        (ours + 'norm2.weight', hf + 'post_attention_layernorm.weight'),
        (ours + 'attn.o.weight', hf + 'self_attn.o_proj.weight'),
    ]
    if config.use_gqa:
        names += [(ours + f'attn.{p}.weight', hf + f'self_attn.{p}_proj.weight') for p in 'qkv']
    if config.use_moe:
        moe = hf + 'block_sparse_moe.'
        names.append((ours + 'moe.router.weight', moe + 'gate.weight'))
        for j in range(config.num_experts):
            names += [
                (ours + f'moe.experts.{j}.{p}.weight', moe + f'experts.{j}.{w}.weight')
                for p, w in _MIXTRAL_EXPERT.items()
            ]
    else:
        names += [
            (ours + f'mlp.{p}.weight', hf + f'mlp.{p}.weight')
            for p in ('gate_proj', 'up_proj', 'down_proj')
        ]
    return names


def _names(config: ThinkerConfig) -> list[tuple[str, str]]:
    names = [
        ('tok_emb.weight', 'model.embed_tokens.weight'),
        ('norm.weight', 'model.norm.weight'),
        ('lm_head.weight', 'lm_head.weight'),
    ]
    for i in range(config.n_layers):
        names += _layer_names(config, i)
    return names


def _qkv_names(i: int) -> tuple[str, list[str]]:
    return (
        f'blocks.{i}.attn.qkv.weight',
        [f'model.layers.{i}.self_attn.{p}_proj.weight' for p in 'qkv'],
    )


def to_hf_state_dict(
    state_dict: Mapping[str, np.ndarray], config: ThinkerConfig
) -> dict[str, np.ndarray]:
    """The original's state_dict -> Hugging Face's (same arrays, PyTorch layout). MHA's qkv
    (3D, D) splits into q_proj, k_proj, v_proj (D, D) each: q, k, v in that order, as the
    Thinker splits it."""
    hf = {theirs: state_dict[ours] for ours, theirs in _names(config)}
    if not config.use_gqa:
        for i in range(config.n_layers):
            qkv, targets = _qkv_names(i)
            hf.update(zip(targets, np.split(state_dict[qkv], 3, axis=0)))
    return {k: np.ascontiguousarray(v) for k, v in hf.items()}


def expected_hf_shapes(config: ThinkerConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face's keys and shapes for the Thinker `config` describes."""
    shapes = original_format.expected_shapes(config)
    hf = {theirs: shapes[ours] for ours, theirs in _names(config)}
    if not config.use_gqa:
        for i in range(config.n_layers):
            hf.update({k: (config.d_model, config.d_model) for k in _qkv_names(i)[1]})
    return hf


def from_hf_state_dict(
    hf: Mapping[str, np.ndarray], config: ThinkerConfig, tied: bool = False
) -> dict[str, np.ndarray]:
    """Hugging Face's state_dict -> the original's, after checking every key and shape against
    `config`; all mismatches are named in one UserError. tied (tie_word_embeddings): lm_head is
    a copy of the embedding, as transformers computes it, whatever the file holds."""
    # Older Llama files hold RoPE's inv_freq buffers, which the config already determines.
    hf = {k: v for k, v in hf.items() if not k.endswith('rotary_emb.inv_freq')}
    if tied and 'model.embed_tokens.weight' in hf:
        hf['lm_head.weight'] = np.array(hf['model.embed_tokens.weight'])
    expected = expected_hf_shapes(config)
    problems = [f'missing {k} {list(shape)}' for k, shape in expected.items() if k not in hf]
    problems += [f'unexpected {k}' for k in hf if k not in expected]
    problems += [
        f'{k} has shape {list(np.shape(hf[k]))}, expected {list(shape)}'
        for k, shape in expected.items()
        if k in hf and tuple(np.shape(hf[k])) != shape
    ]
    if problems:
        shown = '; '.join(problems[:8]) + (
            f'; and {len(problems) - 8} more' if len(problems) > 8 else ''
        )
        raise UserError(
            f'the Hugging Face weights do not match the config.json beside them: {shown}'
        )
    state_dict = {ours: hf[theirs] for ours, theirs in _names(config)}
    if not config.use_gqa:
        for i in range(config.n_layers):
            qkv, sources = _qkv_names(i)
            state_dict[qkv] = np.concatenate([hf[k] for k in sources], axis=0)
    return state_dict


# ----------------------------------------------------------------------------------------------
# config.json


def hf_config(config: ThinkerConfig) -> dict[str, Any]:
    """The config.json of the Llama (dense) or Mixtral (MoE) that computes what `config` does.

    Raises UserError for the GELU MLP, which neither has.
    """
    if not config.use_swiglu:
        raise UserError(
            'this Thinker uses the GELU MLP (use_swiglu=False), which no Hugging Face '
            'Llama or Mixtral has: export it with --output=FILE.safetensors (the '
            'original format) instead'
        )
    architecture = MIXTRAL if config.use_moe else LLAMA
    fields = dict(
        architectures=[architecture],
        model_type=_MODEL_TYPES[architecture],
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_groups if config.use_gqa else config.n_heads,
        head_dim=config.head_dim,
        hidden_act='silu',
        max_position_embeddings=config.ctx_len,
        rms_norm_eps=RMS_NORM_EPS,
        # transformers 5 reads rope_parameters; older versions and vLLM read rope_theta.
        rope_parameters={'rope_type': 'default', 'rope_theta': config.rope_theta},
        rope_theta=config.rope_theta,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=tokenizer_lib.BOS_ID,
        eos_token_id=tokenizer_lib.EOS_ID,
        pad_token_id=None,
        use_cache=True,
        dtype='float32',
        torch_dtype='float32',
    )
    if config.use_moe:
        fields.update(
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            sliding_window=None,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    else:
        fields.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return fields


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5's rope_parameters, or transformers 4's rope_theta and rope_scaling."""
    rope = hf.get('rope_parameters')
    rope = dict(rope if isinstance(rope, Mapping) else hf.get('rope_scaling') or {})
    rope.setdefault('rope_theta', hf.get('rope_theta', 10000.0))
    rope.setdefault('rope_type', rope.pop('type', 'default'))
    return rope


def _unsupported(hf: Mapping[str, Any]) -> list[str]:
    """What in a Hugging Face config.json the Thinker cannot compute, one phrase each."""
    problems = []
    rope = _rope_parameters(hf)
    scaling = hf.get('rope_scaling')
    if rope['rope_type'] != 'default' or (
        isinstance(scaling, Mapping)
        and scaling.get('rope_type', scaling.get('type', 'default')) != 'default'
    ):
        problems.append(f'rope scaling ({scaling or rope})')
    if rope.get('partial_rotary_factor', 1.0) != 1.0:
        problems.append(f'partial rotary factor {rope["partial_rotary_factor"]}')
    for flag in ('attention_bias', 'mlp_bias'):
        if hf.get(flag):
            problems.append(f'{flag}=true')
    if hf.get('sliding_window') is not None and hf.get('use_sliding_window', True):
        problems.append(f'sliding_window={hf["sliding_window"]}')
    eps = hf.get('rms_norm_eps', RMS_NORM_EPS)
    if not np.isclose(eps, RMS_NORM_EPS, rtol=1e-6, atol=0):
        problems.append(f"rms_norm_eps={eps} (the Thinker's is {RMS_NORM_EPS})")
    act = hf.get('hidden_act', 'silu')
    if act not in ('silu', 'swish'):
        problems.append(f'hidden_act={act} (the Thinker uses silu)')
    heads, width = hf.get('num_attention_heads'), hf.get('hidden_size')
    if hf.get('head_dim') and heads and width and hf['head_dim'] * heads != width:
        problems.append(f'head_dim={hf["head_dim"]} != hidden_size/num_attention_heads')
    if hf.get('quantization_config'):
        problems.append('quantized weights (quantization_config)')
    return problems


def thinker_config_from_hf(
    hf: Mapping[str, Any], base: Mapping[str, Any] | None = None, source: str = 'config.json'
) -> ThinkerConfig:
    """A Hugging Face config.json -> the ThinkerConfig that holds it. `base` supplies what a
    config.json does not say (dropout). kv heads = heads imports as MHA (fused qkv, the
    original's form of it); fewer as GQA."""
    architectures = list(hf.get('architectures') or [])
    architecture = next((a for a in architectures if a in _MODEL_TYPES), None)
    if architecture is None:
        model_type = hf.get('model_type')
        architecture = next((a for a, t in _MODEL_TYPES.items() if t == model_type), None)
    if architecture is None:
        raise UserError(
            f'{source} describes a {hf.get("model_type", "?")} model '
            f'({", ".join(architectures) or "no architectures"}): only '
            f'{LLAMA} and {MIXTRAL} import as a Thinker'
        )
    problems = _unsupported(hf)
    if problems:
        raise UserError(
            f'{source}: the Thinker has no {"; no ".join(problems)}: these weights '
            'compute another function and do not import'
        )
    heads = hf.get('num_attention_heads')
    kv_heads = hf.get('num_key_value_heads') or heads
    try:
        fields = dict(base or {})
        fields.update(
            vocab_size=hf['vocab_size'],
            n_layers=hf['num_hidden_layers'],
            d_model=hf['hidden_size'],
            n_heads=heads,
            d_ff=hf['intermediate_size'],
            rope_theta=_rope_parameters(hf)['rope_theta'],
            ctx_len=hf.get('max_position_embeddings', fields.get('ctx_len', 512)),
            use_gqa=kv_heads != heads,
            use_swiglu=True,
            use_moe=architecture == MIXTRAL,
        )
        if kv_heads != heads:
            fields['kv_groups'] = kv_heads
        if architecture == MIXTRAL:
            fields.update(
                num_experts=hf['num_local_experts'], num_experts_per_tok=hf['num_experts_per_tok']
            )
        config = ThinkerConfig.from_config(fields)
        config.validate()
    except KeyError as e:
        raise UserError(f'{source} lacks {e}: it is not a complete {architecture} config') from None
    except (ValueError, TypeError) as e:
        raise UserError(f'{source} does not describe a valid Thinker: {e}') from None
    return config


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(
            'the Hugging Face format needs transformers: pip install transformers==5.24.0'
        ) from None
    return transformers


def hf_tokenizer(tokenizer: tokenizer_lib.Tokenizer):
    """A transformers fast tokenizer that encodes and decodes as our SentencePiece model does,
    with its ids (unk 0, bos 1, eos 2); encoding prepends BOS, as our training data does."""
    _transformers()
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    # Follows the model's own normalizer spec (NFKC, extra whitespace, dummy prefix), so ids
    # match SentencePieceProcessor.encode; LlamaConverter would assume Llama's spec instead.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    bos = proto.pieces[tokenizer_lib.BOS_ID].piece
    backend.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tokenizer_lib.BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=proto.pieces[tokenizer_lib.EOS_ID].piece,
        unk_token=proto.pieces[tokenizer_lib.UNK_ID].piece,
        clean_up_tokenization_spaces=False,
    )


def _write_tokenizer(tokenizer: tokenizer_lib.Tokenizer, directory: str) -> None:
    hf_tokenizer(tokenizer).save_pretrained(directory)
    # The class name transformers 4 also knows; transformers 5 maps it to the same backend.
    path = os.path.join(directory, 'tokenizer_config.json')
    with open(path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config['tokenizer_class'] = 'PreTrainedTokenizerFast'
    with open(path, 'w') as f:
        json.dump(tokenizer_config, f, indent=2)
    # Our own import reads the SentencePiece model back from here.
    tokenizer.save(os.path.join(directory, TOKENIZER_FILE))


# ----------------------------------------------------------------------------------------------
# Folders


def _check_output_is_free(output: str) -> None:
    """Refuses a file, or a folder that holds anything and no export marker (a run's save_dir,
    a user's folder, an export of another tool): only our own exports are replaced."""
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise UserError(
            f'{output} exists and is a file: the Hugging Face format is a folder, name a new one'
        )
    entries = os.listdir(output)
    if entries and EXPORT_MARKER not in entries:
        raise UserError(
            f'{output} holds {", ".join(sorted(entries)[:3])} and is not an export '
            f'of this project (no {EXPORT_MARKER}): export into a new or empty '
            'folder'
        )


def write_hf(
    output: str, params: nnx.State, config: ThinkerConfig, tokenizer: tokenizer_lib.Tokenizer
) -> list[str]:
    """Writes a folder that transformers' AutoModelForCausalLM and AutoTokenizer load.

    It is built beside `output` and renamed into place, so a failed export leaves no half folder
    and an earlier export stays whole until the new one is complete. Returns the files written.
    """
    from safetensors.numpy import save_file

    fields = hf_config(config)  # Refuses the GELU MLP before anything is written.
    _transformers()
    _check_output_is_free(output)
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(output) + '.tmp-', dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users.
    try:
        hf = to_hf_state_dict(original_format.to_state_dict(params), config)
        save_file(hf, os.path.join(staging, WEIGHTS_FILE), metadata={'format': 'pt'})
        with open(os.path.join(staging, CONFIG_FILE), 'w') as f:
            json.dump(fields, f, indent=2, sort_keys=True)
        with open(os.path.join(staging, 'generation_config.json'), 'w') as f:
            json.dump(
                {'bos_token_id': tokenizer_lib.BOS_ID, 'eos_token_id': tokenizer_lib.EOS_ID},
                f,
                indent=2,
            )
        _write_tokenizer(tokenizer, staging)
        with open(os.path.join(staging, EXPORT_MARKER), 'w') as f:
            f.write('Written by muomni-jax launch.convert; a new export may replace this folder.\n')
        if os.path.exists(output):
            # The earlier export goes into a folder made here, under a name no one else has, and
            # only that folder is deleted.
            replaced = tempfile.mkdtemp(prefix=os.path.basename(output) + '.replaced-', dir=parent)
            os.rename(output, os.path.join(replaced, 'export'))
            os.rename(staging, output)
            shutil.rmtree(replaced)
        else:
            os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(os.path.join(output, name) for name in os.listdir(output))


def _shard_files(index_path: str) -> list[str]:
    """The shard files model.safetensors.index.json names: plain file names in its own folder
    (a name with a folder in it, '..' or an absolute path would read outside the model)."""
    try:
        with open(index_path) as f:
            names = json.load(f)['weight_map'].values()
        names = sorted(set(names))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f'{index_path} is not a safetensors index ({first_line(e, 200)}): '
            're-save the model with save_pretrained'
        ) from None
    bad = [
        n
        for n in names
        if not isinstance(n, str) or os.path.basename(n) != n or n in ('', '.', '..')
    ]
    if bad:
        raise UserError(
            f'{index_path} names shard {bad[0]!r}, which is not a file in its own '
            'folder: every shard must sit beside the index'
        )
    return names


def _read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, or of the shards its index names, as float32."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index_path = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.exists(os.path.join(directory, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    elif os.path.exists(index_path):
        files = _shard_files(index_path)
    else:
        present = [n for n in os.listdir(directory) if n.endswith(('.bin', '.pt', '.pth'))]
        hint = (
            f' (it holds {present[0]}: re-save it with save_pretrained(..., '
            'safe_serialization=True))'
            if present
            else ''
        )
        raise UserError(f'{directory} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}{hint}')
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        try:
            loaded = load_file(path)
        except (OSError, SafetensorError, ValueError) as e:
            raise UserError(
                f'cannot read {path} as safetensors ({first_line(e, 200)}): re-save '
                'the model with save_pretrained'
            ) from None
        tensors.update({k: np.asarray(v, np.float32) for k, v in loaded.items()})
    return tensors


def read_hf(
    directory: str, base: Mapping[str, Any] | None = None
) -> tuple[ThinkerConfig, nnx.State, tokenizer_lib.Tokenizer | None]:
    """A local Llama or Mixtral folder -> (its ThinkerConfig, our params, the tokenizer.model
    found there or None). `base` supplies the model fields config.json does not say (dropout)."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise UserError(f'{directory} does not exist')
    if not os.path.exists(config_path):
        raise UserError(
            f'{directory} has no config.json: point --input at a Hugging Face model '
            'folder (one that save_pretrained wrote)'
        )
    try:
        with open(config_path) as f:
            fields = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {config_path} as JSON: {e}') from None
    if not isinstance(fields, dict):
        raise UserError(f'{config_path} is not a JSON object')
    config = thinker_config_from_hf(fields, base, config_path)
    hf = _read_safetensors(directory)
    state_dict = from_hf_state_dict(hf, config, tied=bool(fields.get('tie_word_embeddings')))
    params = original_format.from_state_dict(state_dict, config)
    tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
    tokenizer = (
        tokenizer_lib.Tokenizer.load(tokenizer_path) if os.path.exists(tokenizer_path) else None
    )
    return config, params, tokenizer
