"""GPT-NeoX in plain PyTorch, with transformers' parameter names.

One module serves training and inference:
- training calls `model(input_ids)` (causal SDPA, optional per-example segments for packed
  rows, optional activation checkpointing per layer, and the config's dropout where
  transformers applies it: ``hidden_dropout`` after the embedding and on the attention and
  MLP outputs, ``attention_dropout`` on the attention weights; Pythia has none);
- inference passes an `AttentionBackend` (a KV cache) that receives each layer's rotated
  queries, keys and values and returns the attention output. The reference generator plugs in
  `ContiguousKVCache` below; the serving engine plugs in its paged cache the same way.

The state-dict names are those of Hugging Face checkpoints (`gpt_neox.layers.0.attention.
query_key_value.weight`, `embed_out.weight`, ...), so checkpoints load without renaming and
what we save opens in transformers.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tulu.model.config import NeoXConfig


class AttentionBackend(Protocol):
    """Where attention happens during inference: usually a KV cache.

    `attend` receives one layer's queries, keys and values for the new tokens, shaped
    [batch, heads, new_tokens, head_size] with rotary already applied, stores the keys and
    values, and returns the attention output for the new tokens in the same shape.
    """

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    return nn.SiLU()  # "silu" / "swish"; NeoXConfig rejects anything else


def rotary_cos_sin(
    config: NeoXConfig, position_ids: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin tables for `position_ids` ([B, T]) -> [B, T, rotary_ndims] each.

    Computed in float32 exactly as transformers does (outer product of positions and inverse
    frequencies, duplicated halves), then cast to the activations' dtype, so that bfloat16
    numerics match the reference implementation too.
    """
    dim = config.rotary_ndims
    inv_freq = 1.0 / (
        config.rotary_emb_base
        ** (torch.arange(0, dim, 2, dtype=torch.int64, device=position_ids.device).float() / dim)
    )
    inv_freq = inv_freq / config.rope_linear_factor
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first `rotary_ndims` dims of each head of x ([B, H, T, D]); pass the rest."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Causal self-attention over the given tokens only (training and cache-free inference)."""
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def build_attention_mask(
    seq_len: int,
    device: torch.device,
    padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor | None:
    """A boolean [B, 1, T, T] mask (True = may attend) or None for plain causal attention.

    - `padding_mask` [B, T] (1 = real token, 0 = padding, as in HF's attention_mask) keeps
      queries from attending to padded keys;
    - `segment_ids` [B, T] marks packed examples: a token attends only within its segment,
      so packed examples never see each other.
    """
    if padding_mask is None and segment_ids is None:
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    mask = causal[None, None]
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        mask = mask & same
    if padding_mask is not None:
        keys = padding_mask.bool()[:, None, None, :]
        mask = mask & keys
        # A fully padded query row would give NaN; let it attend to itself (its output is
        # ignored anyway because its position is padding).
        eye = torch.eye(seq_len, dtype=torch.bool, device=device)[None, None]
        mask = mask | (eye & ~padding_mask.bool()[:, None, :, None])
    return mask


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: NeoXConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, 3 * h, bias=config.attention_bias)
        self.dense = nn.Linear(h, h, bias=config.attention_bias)

    def forward(
        self,
        hidden: Tensor,
        cos: Tensor,
        sin: Tensor,
        backend: AttentionBackend | None,
        attn_mask: Tensor | None,
    ) -> Tensor:
        b, t, _ = hidden.shape
        # The fused projection is laid out per head as [q | k | v] (GPT-NeoX convention).
        qkv = self.query_key_value(hidden).view(b, t, self.num_heads, 3 * self.head_size)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if backend is None:
            dropout = self.config.attention_dropout if self.training else 0.0
            out = causal_attention(q, k, v, attn_mask, dropout)
        else:
            out = backend.attend(self.layer_idx, q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: NeoXConfig, layer_idx: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, layer_idx)
        self.mlp = GPTNeoXMLP(config)
        # Parameter-free (no state-dict entries); identity in eval mode and at p = 0.
        self.post_attention_dropout = nn.Dropout(config.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden: Tensor,
        cos: Tensor,
        sin: Tensor,
        backend: AttentionBackend | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        attn = self.attention(self.input_layernorm(hidden), cos, sin, backend, attn_mask)
        attn = self.post_attention_dropout(attn)
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x))
            mlp = self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(hidden)))
            return mlp + attn + hidden
        # x' = x + attn(ln1(x)); x' + mlp(ln2(x'))
        hidden = attn + hidden
        return self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(hidden))) + hidden


class GPTNeoXModel(nn.Module):
    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            GPTNeoXLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPTNeoXForCausalLM(nn.Module):
    """The causal LM: `gpt_neox` trunk + `embed_out` head (untied in Pythia)."""

    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head when the config asks for it.

        Called again after anything that gives parameters new storage (`to_empty` after a
        meta-device build), which silently unties them. A head wrapped by a LoRA adapter
        (PEFT's layer, whose ``weight`` is a read-only view of its base layer's) is tied
        through that base layer.
        """
        if self.config.tie_word_embeddings:
            head = self.embed_out
            base = head.get_base_layer() if hasattr(head, "get_base_layer") else head
            base.weight = self.gpt_neox.embed_in.weight

    # ------------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, *, on_device: bool = False) -> None:
        """GPT-NeoX's initialisation: N(0, initializer_range) matrices, zero biases, unit norms.

        The numbers are drawn on the CPU in float32, so a seed gives the same weights on every
        device and dtype. `on_device` draws them with a generator on the weights' own device
        instead: other values, but seconds instead of a minute for a 6.9B model on a GPU
        (random-weight benchmarks, where only the shapes matter).
        """
        self.tie_weights()
        device = self.embed_out.weight.device if on_device else torch.device("cpu")
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape, dtype=torch.float32, device=device)
                w.normal_(0.0, std, generator=gen)
                module.weight.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def num_parameters(self, include_embeddings: bool = True) -> int:
        return self.config.num_parameters(include_embeddings)

    # ------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        *,
        backend: AttentionBackend | None = None,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Tensor:
        """Logits for `input_ids` [B, T] -> [B, T, vocab] (float as the weights' dtype).

        position_ids: [B, T]; defaults to 0..T-1 (callers with a cache pass the true positions;
        packed rows pass per-example positions).
        backend: an inference KV cache; None means plain causal attention over input_ids.
        attention_mask / segment_ids: padding and packing masks (see build_attention_mask).
        logits_to_keep: if > 0, only the last N positions go through the LM head (decode and
        scoring need only the last one; the head is the largest matmul at small batch).
        """
        hidden = self.hidden_states(
            input_ids,
            position_ids,
            backend=backend,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
        )
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return self.embed_out(hidden)

    def hidden_states(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        *,
        backend: AttentionBackend | None = None,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """The final-layer-norm output [B, T, hidden] (what the LM head consumes)."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        hidden = self.gpt_neox.emb_dropout(self.gpt_neox.embed_in(input_ids))
        cos, sin = rotary_cos_sin(self.config, position_ids, hidden.dtype)
        attn_mask = None
        if backend is None:
            attn_mask = build_attention_mask(t, input_ids.device, attention_mask, segment_ids)
        checkpointing = self.gradient_checkpointing and self.training and backend is None
        for layer in self.gpt_neox.layers:
            if checkpointing:
                hidden = checkpoint(layer, hidden, cos, sin, None, attn_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, backend, attn_mask)
        return self.gpt_neox.final_layer_norm(hidden)

    def loss(self, input_ids: Tensor, labels: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Next-token cross-entropy summed over trained tokens (labels != -100).

        Returns (sum of token losses, number of trained tokens) so that callers choose the
        normalisation (per micro-batch mean, or over a whole optimizer step).
        """
        return next_token_loss(self(input_ids, **kwargs), labels)


def next_token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(summed cross-entropy of position t's logits against labels[t + 1], trained tokens).

    The labels are shifted left (the last position gets -100) rather than the logits sliced:
    ``logits[:, :-1]`` would copy the largest activation of the step (batch x seq x vocab)
    and send the backward pass through that copy.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, shifted, ignore_index=-100, reduction="sum")
    return total, (shifted != -100).sum()


class ContiguousKVCache:
    """A simple pre-allocated KV cache for one batch of equal-length sequences.

    This is the reference generator's cache: [layers, batch, heads, max_len, head_size] keys and
    values, filled left to right. `seq_len` advances when the caller calls `advance` after a
    forward pass. The serving engine uses a paged cache instead.
    """

    def __init__(
        self,
        config: NeoXConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (
            config.num_hidden_layers,
            batch_size,
            config.num_attention_heads,
            max_len,
            config.head_size,
        )
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.seq_len = 0

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        start, new = self.seq_len, q.shape[2]
        end = start + new
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        keys = self.keys[layer_idx, :, :, :end]
        values = self.values[layer_idx, :, :, :end]
        if new == 1:
            return F.scaled_dot_product_attention(q, keys, values)
        if start == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        # New tokens see the whole cached past plus the causal part of themselves.
        mask = torch.ones(new, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def advance(self, num_tokens: int) -> None:
        self.seq_len += num_tokens
