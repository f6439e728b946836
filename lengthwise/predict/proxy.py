"""`proxy`: a small pretrained text encoder (all-MiniLM-L6-v2 by default, 22M parameters) and a
trained `LengthHead`, fine-tuned end to end on (prompt, length) data.

It embeds only the instruction and its input, not the fixed prompt template around them: the
template carries no length signal, dilutes mean pooling and doubles the tokens (measured in
docs/benchmarks.md). Prompts in the Alpaca template are parsed back into instruction and input;
any other prompt is embedded whole.

With `finetune=False` the encoder stays frozen: its embeddings are computed once per dataset and
cached on disk, and only the head trains (a minute instead of ten, a few MAE worse).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lengthwise.model.random_model import default_cache_dir
from lengthwise.predict.base import LengthPrediction, LengthQuery
from lengthwise.predict.data import LengthDataset
from lengthwise.predict.encoder import DEFAULT_ENCODER, TextEncoder
from lengthwise.predict.head_predictor import HeadPredictor
from lengthwise.predict.heads import LengthHead, default_edges, head_loss, readout_all
from lengthwise.predict.training import TrainConfig, choose_readout, fit_head, run_epochs, split_indices

ENCODER_SUBDIR = "encoder"
_ALPACA = re.compile(r"### Instruction:\n(.*?)\n\n(?:### Input:\n(.*?)\n\n)?### Response:", re.S)


def query_text(q: LengthQuery) -> str:
    """The text the proxy embeds: instruction and input when known or parseable, else the prompt."""
    if q.instruction is not None:
        instruction, inp = q.instruction, q.input or ""
    else:
        m = _ALPACA.search(q.prompt)
        if m is None:
            return q.prompt
        instruction, inp = m.group(1), m.group(2) or ""
    return instruction + ("\n" + inp if inp else "")


class ProxyPredictor(HeadPredictor):
    kind = "proxy"

    def __init__(self, encoder: TextEncoder, head: LengthHead, readout: str, encoder_ref: str,
                 forward_rows: int = 64, **kwargs: Any) -> None:
        super().__init__(head, readout, **kwargs)
        self.encoder = encoder.eval()
        self.encoder_ref = encoder_ref  # "encoder" (saved, fine-tuned), "default" or a directory
        # A batch is sorted by token length and encoded in groups of at most this many rows, cut
        # so that short prompts are not padded to the longest one (measured in docs/benchmarks.md).
        self.forward_rows = forward_rows

    def predict(self, queries: Sequence[LengthQuery]) -> list[LengthPrediction]:
        if not queries:
            return []
        ids = self.encoder.tokenize([query_text(q) for q in queries])
        return self.predict_features(self.encoder.embed_ids(ids, self.forward_rows))

    def state_config(self) -> dict[str, Any]:
        return {**self.head_config(), "encoder": self.encoder_ref, "max_length": self.encoder.max_length}

    def save_state(self, directory: Path) -> None:
        self.save_head(directory)
        if self.encoder_ref == ENCODER_SUBDIR:
            self.encoder.save(directory / ENCODER_SUBDIR)

    @classmethod
    def from_saved(cls, directory: Path, manifest: dict[str, Any]) -> ProxyPredictor:
        head, readout = cls.load_head(directory, manifest)
        cfg = manifest.get("config") or {}
        ref = str(cfg.get("encoder", DEFAULT_ENCODER))
        enc_dir = directory / ENCODER_SUBDIR if ref == ENCODER_SUBDIR else ref
        encoder = TextEncoder(enc_dir, int(cfg.get("max_length", 128)))
        return cls(encoder, head, readout, ref, **cls.common(manifest))


def train_proxy(data: LengthDataset, encoder: str | Path = DEFAULT_ENCODER, cfg: TrainConfig | None = None,
                finetune: bool = True, max_length: int = 128) -> ProxyPredictor:
    """Train a proxy predictor on `data` (deterministic for `cfg.seed`)."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    enc = TextEncoder(encoder, max_length)
    ids = enc.tokenize([query_text(r.query) for r in data.records])
    lengths = np.asarray(data.lengths, dtype=np.float32)
    edges = default_edges(lengths)
    common = {"edges": edges, "target": data.target, "data_hash": data.data_hash}
    if not finetune:
        feats = _cached_embeddings(enc, ids, data.data_hash)
        head, readout, maes = fit_head(feats.numpy(), lengths, edges, cfg, desc="training proxy head")
        return ProxyPredictor(enc, head, readout, str(encoder), metrics={"heldout_mae": maes}, **common)
    head, readout, maes = _finetune(enc, ids, lengths, edges, cfg)
    return ProxyPredictor(enc, head, readout, ENCODER_SUBDIR, metrics={"heldout_mae": maes}, **common)


def _finetune(enc: TextEncoder, ids: list[list[int]], lengths: np.ndarray, edges: list[float],
              cfg: TrainConfig) -> tuple[LengthHead, str, dict[str, float]]:
    head = LengthHead(enc.dim, len(edges) - 1, cfg.hidden, cfg.dropout)
    e = torch.tensor(edges, dtype=torch.float32)
    y = torch.as_tensor(lengths)
    train, val = split_indices(len(ids), cfg.val_fraction, cfg.seed)
    optimizer = torch.optim.AdamW([{"params": enc.parameters(), "lr": cfg.encoder_lr},
                                   {"params": head.parameters(), "lr": cfg.lr}], weight_decay=cfg.weight_decay)

    def batches(rng: np.random.Generator) -> Iterator[np.ndarray]:
        # Shuffle, sort within windows of 50 batches by token length (little padding), shuffle batches.
        perm = rng.permutation(len(train))
        window = cfg.batch_size * 50
        chunks = [sorted(perm[i:i + window], key=lambda j: len(ids[train[j]])) for i in range(0, len(perm), window)]
        flat = np.array([j for c in chunks for j in c])
        out = [flat[i:i + cfg.batch_size] for i in range(0, len(flat), cfg.batch_size)]
        rng.shuffle(out)
        return iter(out)

    def step(idx: np.ndarray) -> torch.Tensor:
        rows = train[idx]
        return head_loss(head(enc(*enc.collate([ids[i] for i in rows]))), y[rows], e)

    enc.train()
    head.train()
    run_epochs(len(train), cfg, step, optimizer, [*enc.parameters(), *head.parameters()],
               "fine-tuning proxy", batches)
    enc.eval()
    head.eval()
    if len(val) == 0:
        return head, "bins", {}
    with torch.no_grad():
        points, _ = readout_all(head(enc.embed_ids([ids[i] for i in val])), e)
    name, maes = choose_readout({k: v.numpy() for k, v in points.items()}, lengths[val])
    return head, name, maes


def _cached_embeddings(enc: TextEncoder, ids: list[list[int]], data_hash: str) -> torch.Tensor:
    """Frozen-encoder embeddings of a dataset, computed once and kept under $LENGTHWISE_CACHE."""
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in enc.directory.iterdir()
                     if p.suffix in (".safetensors", ".bin"))
    ident = f"{data_hash}|{enc.directory.resolve()}|{weights}|{enc.max_length}|{len(ids)}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    root = default_cache_dir() / "embeddings"
    path = root / f"{key}.pt"
    if path.is_file():
        return torch.load(path)
    feats = enc.embed_ids(ids)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats
