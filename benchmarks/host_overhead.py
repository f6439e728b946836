"""The engine's host work per decode step, everything but the model, at batch sizes 1 to 256.

    .venv/bin/python benchmarks/host_overhead.py [--rows 1,16,64,128,256] [--steps 100]
        [--data ../shared/data/alpaca-lengths/dev.jsonl --num-requests 128] [--baseline-ref REV] [--out results/host]

On a GPU a graphed decode step's forward is one CUDA-graph replay; the rest of the step is the
host's Python: scheduling, block allocation, the graph's input buffers, the sampler's bookkeeping,
stop checks. When that takes longer than the GPU's step, the host bounds the throughput (the H100
runs of the 1B model: 2.4-2.9 ms per 64-row step against about 1 ms of weight reads and matmuls).
Async decode hides the host's work behind the next step only while it is the shorter of the two.

This measures that work on any machine: the engine runs its graphed decode path (`DecodeGraphs`'
static buffers, without capture, as the CPU tests do) with the replay stubbed to return fixed
outputs, so nothing but the host's work is timed. `--rows` requests (prompts of 20-69 tokens,
greedy, `ignore_eos`, long enough never to finish) are prefilled, then `--steps` decode steps are
timed five times, with async decode on (the default) and off, one torch thread, in `--repeats`
fresh processes; each cell keeps its best. `--baseline-ref` measures another commit the same way
in the same run (a temporary git worktree, its processes alternating with this checkout's) and
prints the ratio. `--data` adds a workload with churn: the first `--num-requests` requests of an
alpaca-lengths file with their greedy response lengths, all at once, run to completion (rows end
at different steps; the table counts the steps launched ahead and used). Writes
host_overhead.json, .md and .png under `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
VOCAB = 512
HIDDEN = 32
MAX_LEN = 2048
MAX_STEPS = (MAX_LEN - 69 - 16) // 5  # a request's prompt and its 6 + 5 * steps + 10 tokens fit


def _engine(async_decode: bool):  # noqa: ANN202 (an LLMEngine, imported late: the child's lengthwise)
    """An engine on a minuscule model whose graphed decode steps replay nothing: the host's work alone."""
    import torch

    from lengthwise.config import EngineConfig
    from lengthwise.engine.cuda_graph import DecodeGraphs
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.model.config import ModelConfig
    from lengthwise.model.llama import CausalLM

    torch.set_num_threads(1)
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def replay(self: DecodeGraphs, size: int, rows_: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        if size not in outputs:  # what a captured graph hands back: the same buffers every time
            g = torch.Generator().manual_seed(size)
            outputs[size] = (torch.zeros(size, HIDDEN), torch.randn(size, VOCAB, generator=g))
        return outputs[size]

    DecodeGraphs._forward = replay
    LLMEngine._graph_batch = lambda self: min(self.config.max_num_seqs, 256)
    config = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=MAX_LEN)
    model = CausalLM(config, torch.float32, "cpu")
    return LLMEngine(model, None, EngineConfig(block_size=16, max_num_seqs=256, async_decode=async_decode))


def _add(engine, lengths: list[int]) -> None:  # noqa: ANN001
    """One greedy `ignore_eos` request per length, prompts of 20-69 random tokens."""
    import torch

    from lengthwise import SamplingParams

    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(lengths):
        prompt = torch.randint(3, VOCAB, (20 + i % 50,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), request_id=str(i))


def measure(rows: int, steps: int, async_decode: bool) -> float:
    """Milliseconds of host work per decode step of `rows` sequences (best of five runs of `steps`)."""
    engine = _engine(async_decode)
    _add(engine, [6 + 5 * steps + 10] * rows)
    for _ in range(6):  # the prefill, then a few decode steps
        engine.step()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        best = min(best, (time.perf_counter() - t0) / steps)
    if engine.runner.graphs is None or (async_decode and engine.runner.graphs.launched_ahead == 0):
        raise RuntimeError("the graphed async decode path did not run: the measurement would be of something else")
    return best * 1e3


def measure_workload(lengths: list[int], async_decode: bool) -> dict[str, float]:
    """Requests of these output lengths all at once, run to completion (best of three): host
    milliseconds per step, steps, and how many decode steps were launched ahead and used."""
    best: dict[str, float] = {}
    for _ in range(3):
        engine = _engine(async_decode)
        _add(engine, lengths)
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        ms = (time.perf_counter() - t0) / steps * 1e3
        if not best or ms < best["ms_per_step"]:
            g = engine.runner.graphs
            best = {"ms_per_step": ms, "steps": steps, "launched_ahead": g.launched_ahead, "used_ahead": g.used_ahead}
    return best


def alpaca_lengths(path: str, num: int) -> list[int]:
    """The first `num` requests' greedy (t0.0) response lengths, capped to fit the model's context."""
    with open(path) as f:
        lengths = [json.loads(line)["lengths"]["t0.0"] for line, _ in zip(f, range(num), strict=False)]
    return [max(1, min(n, MAX_LEN - 100)) for n in lengths]


def sweep(rows: list[int], steps: int, lengths: list[int] | None = None) -> dict:
    """Milliseconds per step at each of `rows`, async decode on and off, in this process (and, with
    `lengths`, the workload's `measure_workload` both ways)."""
    measure(rows[0], 10, True)  # warm up: first calls, allocator, caches
    out: dict = {"async": [], "sync": []}
    for n in rows:
        for mode in ("async", "sync"):
            out[mode].append(measure(n, steps, mode == "async"))
    if lengths:
        out["workload"] = {mode: measure_workload(lengths, mode == "async") for mode in ("async", "sync")}
    return out


def sweep_in_child(tree: Path | None, args: list[str]) -> dict:
    """`sweep` in a fresh process importing lengthwise from `tree` (None: this checkout), on `args`."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        subprocess.run([sys.executable, __file__, "--child", str(result), *args], check=True, env=env, cwd=tree or REPO)
        return json.loads(result.read_text())


def _best(runs: list[dict]) -> dict:
    """Each cell's best over `runs` (the workload: the run with the fewest milliseconds per step)."""
    out = {mode: [min(r[mode][i] for r in runs) for i in range(len(runs[0][mode]))] for mode in ("async", "sync")}
    if "workload" in runs[0]:
        out["workload"] = {mode: min((r["workload"][mode] for r in runs), key=lambda w: w["ms_per_step"])
                           for mode in ("async", "sync")}
    return out


def measure_all(ref: str | None, args: list[str], repeats: int) -> tuple[dict, dict | None]:
    """This checkout's sweep and `ref`'s (None: none), `repeats` fresh processes each, alternating
    so that both see the same machine; each cell keeps its best."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = None
        if ref is not None:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True,
                           capture_output=True)
        try:
            now, base = [], []
            for _ in tqdm(range(repeats), desc="host overhead sweeps"):
                now.append(sweep_in_child(None, args))
                if tree is not None:
                    base.append(sweep_in_child(tree, args))
        finally:
            if tree is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    return _best(now), (_best(base) if base else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64,128,256", help="decode batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=100, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per tree (best kept)")
    ap.add_argument("--data", help="alpaca-lengths JSONL: also run its first --num-requests to completion")
    ap.add_argument("--num-requests", type=int, default=128, help="requests taken from --data")
    ap.add_argument("--baseline-ref", help="also measure this commit (a git revision) in the same run")
    ap.add_argument("--out", default="results/host", help="directory for the JSON, table and plot")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: write the sweep as JSON here
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if any(not 1 <= r <= 256 for r in rows):
        raise ValueError(f"--rows must be between 1 and 256, got {args.rows!r}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be positive, got {args.repeats}")
    if not 1 <= args.steps <= MAX_STEPS:  # more, and the requests would end inside the timed steps
        raise ValueError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    if args.data is not None and not 1 <= args.num_requests <= 256:
        raise ValueError(f"--num-requests must be between 1 and 256 (one decode batch), got {args.num_requests}")
    if args.data is not None and not Path(args.data).is_file():
        raise ValueError(f"--data {args.data!r} is not a file")
    if args.child:
        lengths = alpaca_lengths(args.data, args.num_requests) if args.data else None
        Path(args.child).write_text(json.dumps(sweep(rows, args.steps, lengths)))
        return
    child_args = ["--rows", args.rows, "--steps", str(args.steps), "--num-requests", str(args.num_requests)]
    if args.data:
        child_args += ["--data", str(Path(args.data).resolve())]
    now, base = measure_all(args.baseline_ref, child_args, args.repeats)
    report = {"rows": rows, "steps": args.steps, "repeats": args.repeats, "data": args.data,
              "num_requests": args.num_requests if args.data else None,
              "ms_per_step": now, "baseline_ref": args.baseline_ref, "baseline_ms_per_step": base}
    table = _table(report)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "host_overhead.md").write_text(table + "\n")
    _plot(report, out / "host_overhead.png")
    print(f"wrote {out}/host_overhead.json, .md, .png")


def _table(report: dict) -> str:
    now, base, ref = report["ms_per_step"], report["baseline_ms_per_step"], report["baseline_ref"]
    lines = ["| rows | async ms/step | us/row | sync ms/step |"
             + (f" {ref} async | {ref} sync | speed-up async | speed-up sync |" if base else ""),
             "|---" * (4 + (4 if base else 0)) + "|"]
    for i, n in enumerate(report["rows"]):
        a, s = now["async"][i], now["sync"][i]
        line = f"| {n} | {a:.3f} | {1e3 * a / n:.1f} | {s:.3f} |"
        if base:
            ba, bs = base["async"][i], base["sync"][i]
            line += f" {ba:.3f} | {bs:.3f} | {ba / a:.2f}x | {bs / s:.2f}x |"
        lines.append(line)
    if "workload" in now:
        lines += ["", f"{report['num_requests']} requests of {report['data']} (t0.0 lengths), all at once, "
                      "to completion:", "",
                  "| tree | mode | host ms/step | steps | launched ahead | used |", "|---|---|---|---|---|---|"]
        for label, series in (("this tree", now), (ref, base)):
            for mode in ("async", "sync") if series else ():
                w = series["workload"][mode]
                lines.append(f"| {label} | {mode} | {w['ms_per_step']:.3f} | {w['steps']} | {w['launched_ahead']} | "
                             f"{w['used_ahead']} |")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    from lengthwise.bench.report import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    rows = report["rows"]
    for key, label, style in (("ms_per_step", "this tree", "-"), ("baseline_ms_per_step", report["baseline_ref"], ":")):
        series = report[key]
        if series:
            ax.plot(rows, series["async"], "o" + style, color="#2a7ab0", label=f"{label}, async decode")
            ax.plot(rows, series["sync"], "s" + style, color="#b05a2a", label=f"{label}, sync")
    ax.set_xlabel("decode rows")
    ax.set_ylabel("host ms per decode step")
    ax.set_title("The engine's host work per graphed decode step (replay stubbed)", fontsize=10)
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
