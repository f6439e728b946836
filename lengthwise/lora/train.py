"""Train a LoRA adapter on the served model: supervised answers to prompts, saved as a PEFT adapter.

The first paper's Perception in Advance tunes the served model with LoRA (r=8, alpha=16, on the
q and v projections, 3 epochs) to answer a length query; `lengthwise.predict.pia` builds those
examples, this module trains on any (prompt ids, answer ids) pairs. The loss is the cross-entropy
of the answer tokens only (the prompt is context), the forward is `lengthwise.model.trainable`
(the served model's own mathematics, differentiable in the adapter), and the save is what the
engine loads as a `LoRARequest` (`adapter_config.json` + `adapter_model.safetensors`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from lengthwise.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PARTS, part_shapes
from lengthwise.model.llama import CausalLM
from lengthwise.model.trainable import check_trainable, hidden_states, logits


def check_lora_shape(modules: Sequence[str], rank: int, alpha: float) -> None:
    """ValueError naming the field unless `modules` are PEFT projection names, `rank` a positive
    integer and `alpha` a positive number."""
    if not modules or set(modules) - set(PARTS):
        raise ValueError(f"target_modules must name some of {sorted(PARTS)}, got {list(modules)!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


class LoRAFactors(nn.Module):
    """Trainable LoRA factors for PEFT modules `modules` (`q_proj`, ..., `down_proj`) of every
    decoder layer, initialised as PEFT does (A Kaiming-uniform, B zero: training starts from the
    base model). A module's update is `(x @ A.T @ B.T) * alpha / rank`, computed in float32."""

    def __init__(self, model: CausalLM, modules: Sequence[str], rank: int, alpha: float, seed: int = 0) -> None:
        super().__init__()
        check_lora_shape(modules, rank, alpha)
        self.target_modules = tuple(dict.fromkeys(modules))
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = alpha / rank
        g = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for layer in range(model.config.num_layers):
            shapes = part_shapes(model.config, layer)
            for m in self.target_modules:
                out_f, in_f = shapes[m]
                bound = 1 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
                a = (torch.rand(rank, in_f, generator=g) * 2 - 1) * bound
                self.a[self._key(layer, m)] = nn.Parameter(a.to(model.device))
                self.b[self._key(layer, m)] = nn.Parameter(torch.zeros(out_f, rank, device=model.device))

    @staticmethod
    def _key(layer: int, module: str) -> str:
        return f"{layer}_{module}"

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """The update of `module`'s output in `layer` for its input `x`; None where not adapted."""
        key = self._key(layer, module)
        if key not in self.a:
            return None
        return (x.float() @ self.a[key].t() @ self.b[key].t()) * self.scaling

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The factors under PEFT's names (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`)."""
        out = {}
        for key in self.a:
            layer, module = key.split("_", 1)
            block = "self_attn" if PARTS[module][0] in ("qkv", "o") else "mlp"
            name = f"base_model.model.model.layers.{layer}.{block}.{module}"
            out[f"{name}.lora_A.weight"] = self.a[key].detach().float().cpu().contiguous()
            out[f"{name}.lora_B.weight"] = self.b[key].detach().float().cpu().contiguous()
        return out


@dataclass
class LoRATrainConfig:
    """How to train: the paper's PiA adapter by default (r=8, alpha=16, q/v, 3 epochs).

    `batch_size` examples per optimizer step (grouped by length, so little padding); the learning
    rate warms up over the first `warmup` fraction of steps and decays linearly to zero (AdamW)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: float = 3.0
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        check_lora_shape(self.target_modules, self.rank, self.alpha)
        for name in ("epochs", "lr"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")


@dataclass
class TrainedLoRA:
    """The trained factors, and how training went (mean answer-token loss per epoch)."""

    factors: LoRAFactors
    config: LoRATrainConfig
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0


def _batches(examples: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int,
             rng: random.Random) -> Iterator[list[int]]:
    """One epoch's batches of example indices: shuffled, then sorted by length within windows of 32
    batches, so a batch pads little while the order still varies between epochs."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = 32 * batch_size
    groups = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: len(examples[i][0]) + len(examples[i][1]))
        groups += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    yield from groups


def answer_loss(model: CausalLM, lora: LoRAFactors | None, batch: Sequence[tuple[Sequence[int], Sequence[int]]],
                pad_id: int = 0, gradient_checkpointing: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of `batch` ((prompt ids, answer ids) pairs) given
    their prompts: right-padded into one `[B, T]` forward, logits only at the rows that predict
    an answer token."""
    seqs = [list(p) + list(a) for p, a in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, ((prompt, answer), s) in enumerate(zip(batch, seqs, strict=True)):
        ids[r, :len(s)] = torch.tensor(s)
        start = len(prompt)
        rows += [r] * len(answer)
        cols += range(start - 1, start - 1 + len(answer))  # the state before each answer token
        targets += list(answer)
    ids = ids.to(model.device)
    hidden = hidden_states(model, ids, lora, gradient_checkpointing)
    out = logits(model, hidden[torch.tensor(rows), torch.tensor(cols)])
    return F.cross_entropy(out, torch.tensor(targets, device=out.device))


def train_lora(model: CausalLM, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
               config: LoRATrainConfig | None = None, pad_id: int = 0, progress: bool = True) -> TrainedLoRA:
    """Train a LoRA adapter of `model` to answer each prompt with its answer (pairs of token ids,
    the answer usually ending with EOS). The model's own weights are not changed (a packed CPU
    model is unpacked to dense parameters first)."""
    cfg = config or LoRATrainConfig()
    if not examples:
        raise ValueError("LoRA training needs at least one example")
    for i, (prompt, answer) in enumerate(examples):
        if not prompt or not answer:
            raise ValueError(f"example {i}: both the prompt and the answer need at least one token")
        if len(prompt) + len(answer) > model.config.max_position_embeddings:
            raise ValueError(f"example {i}: {len(prompt) + len(answer)} tokens exceed the model's "
                             f"{model.config.max_position_embeddings} positions")
    check_trainable(model)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    factors = LoRAFactors(model, cfg.target_modules, cfg.rank, cfg.alpha, cfg.seed)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    warmup = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    opt = torch.optim.AdamW(factors.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    result = TrainedLoRA(factors, cfg)
    bar = tqdm(total=total, desc="LoRA training", unit="step", disable=not progress)
    epoch_loss, epoch_tokens = 0.0, 0
    while result.steps < total:
        for batch in _batches(examples, cfg.batch_size, rng):
            pairs = [examples[i] for i in batch]
            loss = answer_loss(model, factors, pairs, pad_id, cfg.gradient_checkpointing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(factors.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            result.steps += 1
            n = sum(len(a) for _, a in pairs)
            epoch_loss += loss.item() * n
            epoch_tokens += n
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if result.steps % steps_per_epoch == 0 or result.steps == total:
                result.epoch_losses.append(epoch_loss / epoch_tokens)
                epoch_loss, epoch_tokens = 0.0, 0
            if result.steps >= total:
                break
    bar.close()
    return result


def save_peft_adapter(trained: TrainedLoRA, directory: str | Path, base_model: str = "") -> Path:
    """Write `trained` as a PEFT LoRA save in `directory` (created if needed): only PEFT's own
    fields, so PEFT itself (and vLLM) load it too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    f = trained.factors
    save_file(f.peft_state(), str(directory / ADAPTER_WEIGHTS))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": f.rank, "lora_alpha": f.alpha, "target_modules": list(f.target_modules), "lora_dropout": 0.0,
              "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory
