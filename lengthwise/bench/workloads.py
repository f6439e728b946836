"""Benchmark workloads: a list of tokenised prompts, each with the exact number of tokens to generate.

Output lengths are fixed per request (every engine runs with EOS ignored and a per-request
`max_tokens`), as vLLM's `benchmark_throughput` does, so every engine produces exactly the same
number of tokens and throughput numbers compare like for like.

- `alpaca_lengths`: the prompts of `../shared/data/alpaca-lengths/*.jsonl` (the `prompt` field),
  tokenised once with the model's tokenizer, with Vicuna-7B's greedy response length
  (`lengths["t0.0"]`) as the output length; the first N records, in file order.
- `synthetic`: no files; seeded log-normal prompt and output lengths with a spread like Alpaca's
  greedy lengths (median 100, p90 about 260, capped at 512), prompt tokens drawn uniformly from
  the vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORKLOADS = ("alpaca-lengths", "synthetic")
ALPACA_LENGTH_KEY = "t0.0"


@dataclass
class Workload:
    """Token-id prompts and the number of tokens to generate for each, in request order."""

    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.output_lens):
            raise ValueError(f"workload {self.name!r}: {len(self.prompts)} prompts but "
                             f"{len(self.output_lens)} output lengths")
        if not self.prompts:
            raise ValueError(f"workload {self.name!r} has no requests")
        for i, (p, n) in enumerate(zip(self.prompts, self.output_lens, strict=True)):
            if not p:
                raise ValueError(f"workload {self.name!r}: request {i} has an empty prompt")
            if n < 1:
                raise ValueError(f"workload {self.name!r}: request {i} has output length {n}, must be >= 1")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def check_fits(self, max_positions: int) -> None:
        """Raise `ValueError` naming the first request whose prompt plus output exceeds the model's context."""
        for i, (p, n) in enumerate(zip(self.prompts, self.output_lens, strict=True)):
            if len(p) + n > max_positions:
                raise ValueError(
                    f"workload {self.name!r}: request {i} needs {len(p)} prompt + {n} output = {len(p) + n} "
                    f"positions, more than the model's max_position_embeddings {max_positions}")

    def summary(self) -> dict[str, object]:
        def stats(xs: list[int]) -> dict[str, float]:
            a = np.asarray(xs)
            return {"mean": round(float(a.mean()), 2), "median": float(np.median(a)),
                    "p90": round(float(np.percentile(a, 90)), 2), "min": int(a.min()), "max": int(a.max())}

        return {"name": self.name, "num_requests": len(self), "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "prompt_len": stats([len(p) for p in self.prompts]),
                "output_len": stats(self.output_lens), **self.info}


def read_alpaca_records(path: str | Path, num_requests: int | None = None,
                        length_key: str = ALPACA_LENGTH_KEY) -> list[tuple[str, str, int]]:
    """(id, prompt text, response length under `length_key`) of the first `num_requests` records of an
    alpaca-lengths file; a record without an id is named by its line number."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r}: no such file (the alpaca-lengths workload needs "
                         "../shared/data/alpaca-lengths/dev.jsonl or another file in that format)")
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    records: list[tuple[str, str, int]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if num_requests is not None and len(records) >= num_requests:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                prompt, length = rec["prompt"], rec["lengths"][length_key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not an alpaca-lengths record with 'prompt' and "
                                 f"'lengths.{length_key}' ({e})") from e
            if not isinstance(prompt, str) or isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise ValueError(f"{path}:{lineno}: bad prompt or lengths.{length_key} {length!r}")
            records.append((str(rec.get("id", lineno)), prompt, length))
    if num_requests is not None and len(records) < num_requests:
        raise ValueError(f"--num-requests {num_requests}: {path} has only {len(records)} records")
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def read_alpaca_lengths(path: str | Path, num_requests: int | None = None) -> list[tuple[str, int]]:
    """(prompt text, greedy response length) of the first `num_requests` records of an alpaca-lengths file."""
    return [(prompt, length) for _, prompt, length in read_alpaca_records(path, num_requests)]


def alpaca_lengths(path: str | Path, tokenizer, num_requests: int | None = None) -> Workload:
    """The alpaca-lengths workload: prompts tokenised with `tokenizer` (a `lengthwise.Tokenizer`)."""
    records = read_alpaca_lengths(path, num_requests)
    prompts = [tokenizer.encode(text) for text, _ in records]
    return Workload("alpaca-lengths", prompts, [n for _, n in records],
                    {"data": str(path), "length_key": f"lengths.{ALPACA_LENGTH_KEY}"})


def synthetic(num_requests: int, seed: int, vocab_size: int, bos_token_id: int | None = None,
              prompt_median: float = 150.0, prompt_sigma: float = 0.3, prompt_max: int = 1024,
              output_median: float = 100.0, output_sigma: float = 0.75, output_max: int = 512,
              low_token_id: int = 3) -> Workload:
    """Seeded random workload: log-normal prompt and output lengths, uniform random prompt tokens.

    Token ids are drawn from [low_token_id, vocab_size) so special tokens (ids below it in the built-in
    tokenizer) are avoided; a BOS id, when given, starts every prompt.
    """
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests must be a positive integer, got {num_requests!r}")
    if vocab_size <= low_token_id:
        raise ValueError(f"vocab_size must be > {low_token_id}, got {vocab_size}")
    rng = np.random.default_rng(seed)
    p_lens = np.clip(np.rint(rng.lognormal(np.log(prompt_median), prompt_sigma, num_requests)), 2, prompt_max)
    o_lens = np.clip(np.rint(rng.lognormal(np.log(output_median), output_sigma, num_requests)), 1, output_max)
    prompts = []
    for n in p_lens.astype(int):
        body = rng.integers(low_token_id, vocab_size, size=int(n) - (bos_token_id is not None)).tolist()
        prompts.append(([bos_token_id] if bos_token_id is not None else []) + body)
    return Workload("synthetic", prompts, o_lens.astype(int).tolist(),
                    {"seed": seed, "prompt_len_dist": f"lognormal(median={prompt_median}, sigma={prompt_sigma})",
                     "output_len_dist": f"lognormal(median={output_median}, sigma={output_sigma})"})
