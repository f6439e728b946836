"""Pooling an embedding request's final hidden states as its prompt chunks are computed.

A long prompt arrives over several steps (chunked prefill), so the pooled value is built up: a
float32 running sum for mean pooling, the first position's state for CLS, the last position's
for last-token pooling. A chunk that starts at position 0 starts over (a preempted request
recomputes its prompt from the beginning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lengthwise.pooling import PoolingTask


class PooledState:
    """One request's pooling in progress."""

    def __init__(self, task: PoolingTask) -> None:
        self.task = task
        self.value: torch.Tensor | None = None

    def add(self, start: int, hidden: torch.Tensor) -> None:
        """Take the final hidden states `[rows, hidden]` of prompt positions `start ..`."""
        kind = self.task.pooling_type
        if kind == "mean":
            part = hidden.float().sum(0)
            self.value = part if start == 0 or self.value is None else self.value + part
        elif kind == "cls":
            if start == 0:
                self.value = hidden[0].float().clone()  # (not a view keeping the step's states alive)
        else:
            self.value = hidden[-1].float().clone()

    def result(self, prompt_len: int) -> torch.Tensor:
        """The embedding, float32 on the CPU: pooled, cut to `dimensions`, then normalized."""
        if self.value is None:
            raise RuntimeError("pooling finished before any of the prompt was computed")  # a bug
        v = self.value / prompt_len if self.task.pooling_type == "mean" else self.value
        if self.task.dimensions is not None:
            v = v[:self.task.dimensions]
        if self.task.normalize:
            v = F.normalize(v, p=2.0, dim=-1)
        return v.cpu()
