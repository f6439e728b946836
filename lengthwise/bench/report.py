"""Throughput report: the table on stdout, the JSON file (a stable schema) and the PNG bar chart.

JSON schema (keys always present; a speedup is null when its baseline or lengthwise did not run):

    {"results": [{"engine", "requests_per_s", "output_tokens_per_s", "peak_rss_mb", ...extra keys}],
     "speedup_vs_transformers": float | null,
     "speedup_vs_transformers_cb": float | null,
     "config": {...},
     "roofline": {...}}            # only with --roofline
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASELINES = {"speedup_vs_transformers": "transformers", "speedup_vs_transformers_cb": "transformers-cb"}
SUBJECT = "lengthwise"


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """One result row from a child's raw measurements."""
    elapsed = raw["elapsed_s"]
    n = raw["num_requests"]
    row = {"engine": raw["engine"], "requests_per_s": round(n / elapsed, 4),
           "output_tokens_per_s": round(raw["output_tokens"] / elapsed, 2), "peak_rss_mb": raw["peak_rss_mb"],
           "elapsed_s": round(elapsed, 3), "num_requests": n, "output_tokens": raw["output_tokens"],
           "generated_tokens": raw["generated_tokens"], "short_requests": raw["short_requests"]}
    for key in ("peak_gpu_mb", "token_slots", "details", "elapsed_runs_s"):
        if key in raw:
            row[key] = raw[key]
    return row


def compare_outputs(raws: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How many requests each engine answered with exactly the token ids of the first engine that ran."""
    with_digests = [r for r in raws if r.get("output_digests")]
    if len(with_digests) < 2:
        return None
    ref = with_digests[0]
    return {"reference": ref["engine"], "num_requests": len(ref["output_digests"]),
            "identical_requests": {r["engine"]: sum(a == b for a, b in zip(r["output_digests"], ref["output_digests"],
                                                                            strict=True))
                                   for r in with_digests[1:]}}


def speedup(results: list[dict[str, Any]], baseline: str) -> float | None:
    by = {r["engine"]: r for r in results}
    if SUBJECT not in by or baseline not in by or not by[baseline]["output_tokens_per_s"]:
        return None
    return round(by[SUBJECT]["output_tokens_per_s"] / by[baseline]["output_tokens_per_s"], 4)


def build_report(results: list[dict[str, Any]], config: dict[str, Any],
                 roofline: dict[str, Any] | None = None, outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {"results": results}
    for key, baseline in BASELINES.items():
        report[key] = speedup(results, baseline)
    report["config"] = config if outputs is None else {**config, "outputs_compared": outputs}
    if roofline is not None:
        report["roofline"] = roofline
    return report


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary: one row per engine, ratios to both baselines, the roofline line."""
    results = report["results"]
    by = {r["engine"]: r for r in results}
    cols = ["engine", "req/s", "output tok/s", "vs transformers", "vs transformers-cb", "peak RSS MB", "time s"]
    rows = []
    for r in results:
        ratios = []
        for base in BASELINES.values():
            b = by.get(base)
            ratios.append(f"{r['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}x"
                          if b and b["output_tokens_per_s"] else "-")
        rows.append([r["engine"], f"{r['requests_per_s']:.3f}", f"{r['output_tokens_per_s']:.1f}", *ratios,
                     f"{r['peak_rss_mb']:.0f}", f"{r['elapsed_s']:.1f}"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    short = [f"{r['engine']} ({r['short_requests']})" for r in results if r.get("short_requests")]
    if short:
        lines.append("warning: requests that got fewer tokens than their max_tokens: " + ", ".join(short))
    cmp = report["config"].get("outputs_compared")
    if cmp:
        same = ", ".join(f"{e} {k}/{cmp['num_requests']}" for e, k in cmp["identical_requests"].items())
        lines.append(f"requests with the same token ids as {cmp['reference']}: {same} (kernels round differently, "
                     "which can flip a near-tied greedy pick; the response diverges from there)")
    roof = report.get("roofline")
    if roof:
        lines.append(format_roofline(roof))
    return "\n".join(lines)


def format_roofline(roof: dict[str, Any]) -> str:
    return (f"roofline: lengthwise decodes one request at {roof['decode_ms_per_token']:.3f} ms/token; "
            f"weights {roof['weight_bytes'] / 1e6:.1f} MB / copy bandwidth {roof['copy_bandwidth_gb_s']:.2f} GB/s "
            f"= {roof['bound_ms_per_token']:.3f} ms/token bound: {roof['percent_of_roofline']:.1f}% of the "
            f"memory-bandwidth roofline")


def header(config: dict[str, Any]) -> str:
    w = config["workload"]
    return (f"lengthwise bench throughput: {config['model']} ({config['dtype']}, {config['device']}, "
            f"{config['threads']} threads); {w['name']} workload, {w['num_requests']} requests, "
            f"{w['prompt_tokens']} prompt + {w['output_tokens']} output tokens")


def pyplot():  # noqa: ANN201 (matplotlib.pyplot | None)
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print("matplotlib is not installed: no PNG (pip install 'lengthwise[bench]')", file=sys.stderr)
        return None
    return plt


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of output tokens/s per engine, each bar labelled with its value and ratio to transformers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = [r["engine"] for r in results]
    values = [r["output_tokens_per_s"] for r in results]
    base = next((r["output_tokens_per_s"] for r in results if r["engine"] == "transformers"), None)
    colors = {"lengthwise": "#2a7ab0", "transformers": "#b0b0b0", "transformers-cb": "#707070"}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    bars = ax.bar(names, values, color=[colors.get(n, "#4c9a5a") for n in names])
    for bar, v in zip(bars, values, strict=True):
        label = f"{v:.0f}" + (f"\n{v / base:.2f}x" if base else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")
    cfg = report["config"]
    w = cfg["workload"]
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{cfg['model']}, {cfg['dtype']} on {cfg['device']} ({cfg['threads']} threads)\n"
                 f"{w['name']}: {w['num_requests']} requests, {w['output_tokens']} output tokens", fontsize=10)
    ax.set_ylim(0, max(values) * 1.2 if values and max(values) > 0 else 1)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
