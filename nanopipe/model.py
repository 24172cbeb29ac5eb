"""
The GPT model: nanochat's classic decoder-only Transformer, in one file.

- token embedding and lm_head are separate (untied) matrices; no biases anywhere
- rotary position embeddings (no learned positions), QK norm
- RMSNorm without learnable parameters: after the embedding, before attention
  and MLP (pre-norm), and before lm_head
- ReLU² MLP, 4x wide
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads
- logits soft-capped to (-15, 15) with tanh, in fp32
- lm_head rows padded to a multiple of 64 (faster matmuls on GPU); the padded
  logits are sliced off, so they are never predicted

KV cache protocol for forward(kv_cache=...), for a batch whose rows share one position
(tests use a minimal cache; engine.py, which batches rows of different lengths, runs the
blocks itself with per-row positions and masks and is checked token for token against
forward): an object
with `pos` (tokens already cached, read once per forward for rotary positions)
and `insert_kv(layer_idx, k, v) -> (k_all, v_all)`, taking this call's keys and
values (B, n_kv_head, T, head_dim) and returning those of every position so far
(B, n_kv_head, pos + T, head_dim). The cache advances `pos` by T after the last
layer's insert.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_SOFTCAP = 15.0
VOCAB_PAD_MULTIPLE = 64
ROPE_BASE = 10000


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig head_dim n_embd/n_head = {self.head_dim} must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_seq_len(self) -> int:
        """Positions the rotary tables cover: generation may run past sequence_len (as nanochat's 10x)."""
        return 10 * self.sequence_len

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int, head_dim: int = 128,
                   n_kv_head: int | None = None) -> "GPTConfig":
        """nanochat's sizing: width 64 x depth, heads of about head_dim channels.
        Where head_dim does not divide the width, use fewer (wider) heads, the most
        that divide it evenly into even-sized heads. n_kv_head defaults to n_head."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2:
            raise ValueError(f"head_dim must be an int >= 2, got {head_dim!r}")
        n_embd = 64 * depth
        n_head = max(1, n_embd // head_dim)
        while n_embd % n_head or (n_embd // n_head) % 2:
            n_head -= 1
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=n_embd)


def norm(x: torch.Tensor) -> torch.Tensor:
    # RMSNorm with no learnable scale
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by position-dependent angles:
    [x1, x2] -> [x1 cos + x2 sin, x2 cos - x1 sin], as x * cos + [x2, x1] * sin with
    the tables of rotary_tables (3 kernels instead of 7: it matters when decoding)."""
    d = x.size(-1) // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no-op in fp32; bf16 under autocast
    return torch.addcmul(x * cos, torch.cat([x[..., d:], x[..., :d]], dim=-1), sin)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width cos = [cos, cos] and sin = [sin, -sin], each (1, seq_len, 1, head_dim),
    broadcasting over batch and heads."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1)[None, :, None, :], torch.cat([sin, -sin], dim=-1)[None, :, None, :]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_kv_head != self.n_head
        if Tq == Tk:
            # training, or a prefill into an empty cache: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            # one decoded token sees the whole cache
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # a chunk after a cached prefix: all of the prefix, causal within the chunk
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Rotary tables are cheap, so cover 10x the training length (longer chats at
        # inference). Not persistent: they are recomputed, never checkpointed.
        self.rotary_seq_len = config.rotary_seq_len
        cos, sin = rotary_tables(self.rotary_seq_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # Built on the meta device, the model is initialised later: to_empty(), init_weights().
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """nanochat's init. Residual branches start as identity (zero output
        projections); lm_head starts near zero so the first logits are near uniform.
        With a seed, the init is deterministic (for a given device type)."""
        device = self.lm_head.weight.device
        gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0, generator=gen)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001, generator=gen)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                # std 1/sqrt(fan_in), shrunk for narrow outputs (arXiv:2310.17813)
                fan_out, fan_in = linear.weight.shape
                std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
                nn.init.normal_(linear.weight, mean=0.0, std=std, generator=gen)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.cos, self.sin = rotary_tables(self.rotary_seq_len, self.config.head_dim, device=device)

    def get_device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if non_embedding else n

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 per matmul weight (forward + backward; the
        embedding is a lookup, not a matmul) plus causal attention over sequence_len."""
        c = self.config
        attention = 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
        return 6 * self.num_params(non_embedding=True) + attention

    def setup_optimizers(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                         matrix_lr: float = 0.02, weight_decay: float = 0.0, distributed: bool | None = None,
                         ns_dtype: torch.dtype | str = "auto"):
        from nanopipe.optim import setup_optimizers
        return setup_optimizers(self, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                matrix_lr=matrix_lr, weight_decay=weight_decay, distributed=distributed,
                                ns_dtype=ns_dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_reduction: str = "mean", kv_cache=None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size) in fp32, or, with
        targets (B, T) (-1 = ignore), the cross-entropy loss: a scalar for "mean"
        and "sum", per token (B, T) for "none"."""
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.pos
        if T0 + T > self.rotary_seq_len:
            raise ValueError(f"sequence of {T0 + T} tokens exceeds the rotary table ({self.rotary_seq_len})")
        cos, sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)

        logits = self.lm_head(x)
        V = self.config.vocab_size
        if logits.size(-1) != V:
            logits = logits[..., :V]
        # softcap in fp32: 15 * tanh(logits / 15)
        logits = torch.tanh(logits.float() / LOGIT_SOFTCAP) * LOGIT_SOFTCAP
        if targets is None:
            return logits
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss
