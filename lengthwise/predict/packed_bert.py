"""An inference-only forward pass for BERT-family encoders over *packed* tokens.

transformers' BertModel pads every text in a batch to the longest one. Length-prediction inputs
are short with a long tail (alpaca: 20 tokens on average, 128 at the cap), so padding can
triple the work. Here the dense layers (all but ~2% of the FLOPs) run once over the
concatenated real tokens, `[T, hidden]`; only attention is padded, per group of similar length.
Same weights, same numbers (tested against BertModel); used for prediction, not for training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def supports(model: nn.Module) -> bool:
    """A plain post-LayerNorm BERT with absolute positions and erf GELU (MiniLM, BERT, ...)."""
    cfg = getattr(model, "config", None)
    return (type(model).__name__ == "BertModel" and getattr(cfg, "hidden_act", None) == "gelu"
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute")


class PackedBert:
    """Mean-pooled embeddings of token-id rows, computed without padding the dense layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.layer_norm_eps
        # Q, K and V as one matmul; rebuilt if the model is trained further (training sets it stale).
        self._qkv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _fused_qkv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._qkv is None:
            self._qkv = []
            for layer in self.model.encoder.layer:
                s = layer.attention.self
                self._qkv.append((torch.cat([s.query.weight, s.key.weight, s.value.weight]).detach(),
                                  torch.cat([s.query.bias, s.key.bias, s.value.bias]).detach()))
        return self._qkv

    def invalidate(self) -> None:
        self._qkv = None

    @torch.no_grad()
    def embed(self, rows: Sequence[Sequence[int]], groups: list[tuple[int, int]]) -> torch.Tensor:
        """`rows` sorted by length; `groups` contiguous `[lo, hi)` ranges that share one padded
        attention call. Returns `[len(rows), hidden]` mean-pooled final hidden states."""
        m = self.model
        dev = m.embeddings.word_embeddings.weight.device
        lens = torch.tensor([len(r) for r in rows])
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=dev)
        pos = torch.cat([torch.arange(n) for n in lens.tolist()]).to(dev)
        e = m.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings.weight[0]
        x = F.layer_norm(x, x.shape[-1:], e.LayerNorm.weight, e.LayerNorm.bias, self.eps)
        starts = torch.cumsum(lens, 0) - lens
        plans = [_group_plan(lens[lo:hi], starts[lo:hi], dev) for lo, hi in groups]
        hid = self.heads * self.head_dim
        for layer, (w_qkv, b_qkv) in zip(m.encoder.layer, self._fused_qkv(), strict=True):
            qkv = F.linear(x, w_qkv, b_qkv)
            ctx = torch.empty((x.shape[0], hid), dtype=x.dtype, device=dev)
            for flat, valid, mask in plans:
                ctx[flat[valid]] = self._attend(qkv, flat, valid, mask)
            a = layer.attention.output
            x = F.layer_norm(F.linear(ctx, a.dense.weight, a.dense.bias) + x, x.shape[-1:], a.LayerNorm.weight,
                             a.LayerNorm.bias, self.eps)
            h = F.gelu(F.linear(x, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
            o = layer.output
            x = F.layer_norm(F.linear(h, o.dense.weight, o.dense.bias) + x, x.shape[-1:], o.LayerNorm.weight,
                             o.LayerNorm.bias, self.eps)
        seg = torch.repeat_interleave(torch.arange(len(rows), device=dev), lens.to(dev))
        pooled = torch.zeros((len(rows), x.shape[1]), dtype=x.dtype, device=dev).index_add_(0, seg, x)
        return pooled / lens.to(dev, x.dtype)[:, None]

    def _attend(self, qkv: torch.Tensor, flat: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, width = flat.shape
        h, d = self.heads, self.head_dim
        padded = qkv[flat.clamp(max=qkv.shape[0] - 1)].view(b, width, 3, h, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(padded[0], padded[1], padded[2], attn_mask=mask,
                                             scale=1.0 / math.sqrt(d))
        return out.transpose(1, 2).reshape(b, width, h * d)[valid]


def _group_plan(lens: torch.Tensor, starts: torch.Tensor, dev: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one attention group: token index of each (row, slot), which slots are real, the key mask."""
    width = int(lens.max())
    slots = torch.arange(width)
    valid = slots[None, :] < lens[:, None]
    flat = (starts[:, None] + slots[None, :]).to(dev)
    mask = valid[:, None, None, :].to(dev)  # [b, 1, 1, width]: padded keys never attend
    return flat, valid.to(dev), mask
