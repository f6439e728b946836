"""The engine's host work per decode step, everything but the model, at batch sizes 1 to 256.

    .venv/bin/python benchmarks/host_overhead.py [--rows 1,16,64,128,256] [--steps 100]
        [--baseline-ref REV] [--out results/host]

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
prints the ratio. Writes host_overhead.json, .md and .png under `--out`.
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


def measure(rows: int, steps: int, async_decode: bool) -> float:
    """Milliseconds of host work per decode step of `rows` sequences (best of five runs of `steps`)."""
    import torch

    from lengthwise import SamplingParams
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
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024)
    model = CausalLM(config, torch.float32, "cpu")
    engine = LLMEngine(model, None, EngineConfig(block_size=16, max_num_seqs=256, async_decode=async_decode))
    g = torch.Generator().manual_seed(0)
    for i in range(rows):
        prompt = torch.randint(3, VOCAB, (20 + i % 50,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=6 + 5 * steps + 10, temperature=0.0, ignore_eos=True),
                           request_id=str(i))
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


def sweep(rows: list[int], steps: int) -> dict[str, list[float]]:
    """Milliseconds per step at each of `rows`, async decode on and off, in this process."""
    measure(rows[0], 10, True)  # warm up: first calls, allocator, caches
    out: dict[str, list[float]] = {"async": [], "sync": []}
    for n in rows:
        for mode in ("async", "sync"):
            out[mode].append(measure(n, steps, mode == "async"))
    return out


def sweep_in_child(tree: Path | None, rows: list[int], steps: int) -> dict[str, list[float]]:
    """`sweep` in a fresh process importing lengthwise from `tree` (None: this checkout)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        subprocess.run([sys.executable, __file__, "--child", str(result), "--rows", ",".join(map(str, rows)),
                        "--steps", str(steps)], check=True, env=env, cwd=tree or REPO)
        return json.loads(result.read_text())


def measure_all(ref: str | None, rows: list[int], steps: int, repeats: int) -> tuple[dict, dict | None]:
    """This checkout's sweep and `ref`'s (None: none), `repeats` fresh processes each, alternating
    so that both see the same machine; each cell keeps its best."""
    def best(runs: list[dict[str, list[float]]]) -> dict[str, list[float]]:
        return {mode: [min(r[mode][i] for r in runs) for i in range(len(rows))] for mode in runs[0]}

    with tempfile.TemporaryDirectory() as tmp:
        tree = None
        if ref is not None:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True,
                           capture_output=True)
        try:
            now, base = [], []
            for _ in tqdm(range(repeats), desc="host overhead sweeps"):
                now.append(sweep_in_child(None, rows, steps))
                if tree is not None:
                    base.append(sweep_in_child(tree, rows, steps))
        finally:
            if tree is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    return best(now), (best(base) if base else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64,128,256", help="decode batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=100, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per tree (best kept)")
    ap.add_argument("--baseline-ref", help="also measure this commit (a git revision) in the same run")
    ap.add_argument("--out", default="results/host", help="directory for the JSON, table and plot")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: write the sweep as JSON here
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if any(not 1 <= r <= 256 for r in rows):
        raise ValueError(f"--rows must be between 1 and 256, got {args.rows!r}")
    if args.steps < 1 or args.repeats < 1:
        raise ValueError(f"--steps and --repeats must be positive, got {args.steps} and {args.repeats}")
    if args.child:
        Path(args.child).write_text(json.dumps(sweep(rows, args.steps)))
        return
    now, base = measure_all(args.baseline_ref, rows, args.steps, args.repeats)
    report = {"rows": rows, "steps": args.steps, "repeats": args.repeats,
              "ms_per_step": now, "baseline_ref": args.baseline_ref, "baseline_ms_per_step": base}
    lines = ["| rows | async ms/step | us/row | sync ms/step |"
             + (f" {args.baseline_ref} async | {args.baseline_ref} sync | speed-up async | speed-up sync |"
                if base else "")]
    lines.append("|---" * (4 + (4 if base else 0)) + "|")
    for i, n in enumerate(rows):
        a, s = now["async"][i], now["sync"][i]
        line = f"| {n} | {a:.3f} | {1e3 * a / n:.1f} | {s:.3f} |"
        if base:
            ba, bs = base["async"][i], base["sync"][i]
            line += f" {ba:.3f} | {bs:.3f} | {ba / a:.2f}x | {bs / s:.2f}x |"
        lines.append(line)
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "host_overhead.md").write_text(table + "\n")
    _plot(report, out / "host_overhead.png")
    print(f"wrote {out}/host_overhead.json, .md, .png")


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
