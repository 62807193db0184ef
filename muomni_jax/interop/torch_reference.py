"""The original μOmni ThinkerLM in PyTorch, written from shared/spec/thinker.md alone.

Not the original's code: a reference built from the spec, so that agreeing with it checks our
model and our weight export against the spec rather than against themselves
(tests/test_original_format.py), and so that launch.bench can time the original's training step
beside ours on the same machine (benchmark.compare_with_original). Dropout is where the spec puts
it: on the attention probabilities and on both residual branches.

torch is optional: only the bench and the tests import this module, and they treat its
ImportError as "no torch".
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    # The original's use_flash: torch's fused scaled_dot_product_attention (flash attention on a
    # GPU) in place of the explicit softmax; the same function, dropout included.
    use_sdpa = False

    def __init__(self, c):
        super().__init__()
        self.h, self.dk, self.gqa = c.n_heads, c.d_model // c.n_heads, c.use_gqa
        self.dropout = c.dropout
        self.theta = c.rope_theta
        if c.use_gqa:
            self.g = c.n_heads // 2  # The original always uses n_heads // 2 groups.
            self.q = nn.Linear(c.d_model, c.d_model, bias=False)
            self.k = nn.Linear(c.d_model, self.g * self.dk, bias=False)
            self.v = nn.Linear(c.d_model, self.g * self.dk, bias=False)
        else:
            self.g = c.n_heads
            self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.o = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        if self.gqa:
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.view(b, t, self.h, self.dk)
        k, v = k.view(b, t, self.g, self.dk), v.view(b, t, self.g, self.dk)
        inv_freq = self.theta ** (-torch.arange(0, self.dk, 2, dtype=torch.float32) / self.dk)
        angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None]
        emb = torch.cat([angles, angles], dim=-1)[None, :, None, :]
        q = q * emb.cos() + rotate_half(q) * emb.sin()
        k = k * emb.cos() + rotate_half(k) * emb.sin()
        k = k.repeat_interleave(self.h // self.g, dim=2)
        v = v.repeat_interleave(self.h // self.g, dim=2)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
            return self.o(out.transpose(1, 2).reshape(b, t, d))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dk)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float('-inf')).softmax(-1)
        probs = F.dropout(probs, self.dropout, self.training)
        return self.o((probs @ v).transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.swiglu = c.use_swiglu
        if c.use_swiglu:
            self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=False)
        else:
            self.fc1 = nn.Linear(c.d_model, c.d_ff)
            self.fc2 = nn.Linear(c.d_ff, c.d_model)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(F.gelu(self.fc1(x)))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.k = c.num_experts_per_tok
        self.router = nn.Linear(c.d_model, c.num_experts, bias=False)
        self.experts = nn.ModuleList([MLP(c) for _ in range(c.num_experts)])

    def forward(self, x):
        top_p, top_i = self.router(x).softmax(-1).topk(self.k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            weight = (top_p * (top_i == e)).sum(-1, keepdim=True)
            out = out + weight * expert(x)
        return out


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(c.d_model), RMSNorm(c.d_model)
        self.attn = Attention(c)
        self.dropout = c.dropout
        self.use_moe = c.use_moe
        if c.use_moe:
            self.moe = MoE(c)
        else:
            self.mlp = MLP(c)

    def forward(self, x):
        x = x + F.dropout(self.attn(self.norm1(x)), self.dropout, self.training)
        mlp = self.moe if self.use_moe else self.mlp
        return x + F.dropout(mlp(self.norm2(x)), self.dropout, self.training)


class ThinkerLM(nn.Module):
    def __init__(self, c, use_sdpa: bool = False):
        super().__init__()
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layers)])
        self.norm = RMSNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        for block in self.blocks:
            block.attn.use_sdpa = use_sdpa

    def forward(self, ids):
        x = self.tok_emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))
