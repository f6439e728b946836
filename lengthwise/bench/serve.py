"""`lengthwise bench serve`: a load generator against a running OpenAI-compatible server.

    lengthwise serve ../shared/models/stories260k --port 8000 &
    lengthwise bench serve --base-url http://127.0.0.1:8000 --data dev.jsonl --num-requests 200 \\
        --request-rate 4 --max-concurrency 64 --goodput ttft:500 tpot:50 --json serve.json

Requests are the first `--num-requests` prompts of an alpaca-lengths file, each asking for its
recorded response length (`max_tokens`, with `ignore_eos` so that every run generates the same
tokens, as `bench schedule` does; `--no-ignore-eos` lets the model stop). They are sent as
streaming completions at `--request-rate` per second (Poisson, or gamma with `--burstiness`;
`inf` sends all at once), at most `--max-concurrency` in flight.

Metrics, with the definitions of vLLM's `benchmark_serving`: TTFT (request sent to the first
text), TPOT per request ((latency - TTFT) / (output tokens - 1)), ITL (the gaps between
successive streamed chunks), E2E latency, each as mean / median / p99 in ms; request, output and
total token throughput over the run's duration; goodput, the requests per second that met every
`--goodput` SLO. Output tokens are the server's own count (`usage`, asked for with
`stream_options.include_usage`). The client is plain asyncio HTTP/1.1, no dependencies, so that it
adds little to what it measures. Writes a table (`serve.md`), JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from tqdm.auto import tqdm

from lengthwise.argtypes import output_file, positive_int
from lengthwise.bench.schedule import HARD_CAP
from lengthwise.bench.workloads import read_alpaca_records

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from its send."""

    ok: bool = False
    status: int = 0
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _http_stream(url: str, body: bytes, api_key: str | None, timeout: float):  # noqa: ANN202
    """POST `body`; yields (status, None) once, then the response body in pieces as they arrive
    (HTTP/1.1, chunked or not)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 80), timeout)
    try:
        head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n")
        if api_key:
            head += f"Authorization: Bearer {api_key}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        yield status, None
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = await reader.readexactly(size)
                await reader.readexactly(2)
                yield status, data
        else:
            data = await reader.read()
            if data:
                yield status, data
    finally:
        writer.close()


async def one_request(url: str, payload: dict[str, Any], api_key: str | None, timeout: float) -> RequestResult:
    """Send one streaming completion and time it."""
    res = RequestResult()
    start = time.perf_counter()
    last = None
    buf = b""
    try:
        async for status, data in _http_stream(url, json.dumps(payload).encode(), api_key, timeout):
            res.status = status
            if data is None:
                continue
            buf += data
            if status != 200:
                continue
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                line = event.strip()
                if not line.startswith(b"data: "):
                    continue
                line = line[6:]
                if line == b"[DONE]":
                    res.ok = True
                    continue
                chunk = json.loads(line)
                now = time.perf_counter() - start
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if last is None:
                        res.ttft = now
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        if res.status != 200:
            res.ok = False
            res.error = buf.decode("utf-8", "replace")[:300]
    except (TimeoutError, OSError, ValueError, IndexError) as e:
        res.ok, res.error = False, f"{type(e).__name__}: {e}"
    return res


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`ttft:MS tpot:MS e2el:MS` into seconds per key."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MILLISECONDS with KEY one of {SLO_KEYS}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
        slos[key] = ms / 1000
    return slos


def summarise(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    """vLLM benchmark_serving's metrics over the completed requests."""
    done = [r for r in results if r.ok]
    out: dict[str, Any] = {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration}
    out["request_throughput"] = len(done) / duration
    out["output_throughput"] = sum(r.output_tokens for r in done) / duration
    out["total_token_throughput"] = sum(r.output_tokens + r.prompt_tokens for r in done) / duration
    series = {"ttft": [r.ttft for r in done], "tpot": [t for r in done if (t := r.tpot) is not None],
              "itl": [x for r in done for x in r.itl], "e2el": [r.latency for r in done]}
    for key, values in series.items():
        arr = np.asarray(values) * 1000 if values else np.zeros(1)
        out[f"mean_{key}_ms"] = float(arr.mean())
        out[f"median_{key}_ms"] = float(np.median(arr))
        out[f"p99_{key}_ms"] = float(np.percentile(arr, 99))
    if slos:
        good = [r for r in done if r.ttft <= slos.get("ttft", math.inf) and r.latency <= slos.get("e2el", math.inf)
                and (r.tpot or 0.0) <= slos.get("tpot", math.inf)]
        out["request_goodput"] = len(good) / duration
        out["goodput_slos_ms"] = {k: v * 1000 for k, v in slos.items()}
    return out


async def run_benchmark(args: argparse.Namespace) -> tuple[dict[str, Any], list[RequestResult]]:
    from lengthwise.bench.simulate import draw_arrivals

    slos = parse_goodput(args.goodput)
    records = read_alpaca_records(args.data, args.num_requests, args.length_key)
    model = args.model or _served_model(args.base_url, args.api_key)
    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if args.burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    rate = args.request_rate
    arrival = ("all" if math.isinf(rate) else
               f"poisson:{rate}" if args.burstiness == 1 else f"gamma:{rate}:{args.burstiness}")
    arrivals = draw_arrivals(arrival, len(records), np.random.default_rng(args.seed))
    url = args.base_url.rstrip("/") + "/v1/completions"
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(records), desc="bench serve", unit="req", dynamic_ncols=True, disable=args.quiet)

    async def send(i: int, prompt: str, length: int) -> RequestResult:
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
        payload = {"model": model, "prompt": prompt, "max_tokens": min(length, args.max_output_tokens),
                   "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                   "ignore_eos": not args.no_ignore_eos}
        if gate is None:
            res = await one_request(url, payload, args.api_key, args.timeout)
        else:
            async with gate:
                res = await one_request(url, payload, args.api_key, args.timeout)
        bar.update(1)
        return res

    t0 = time.perf_counter()
    results = await asyncio.gather(*(send(i, p, n) for i, (_, p, n) in enumerate(records)))
    duration = time.perf_counter() - t0
    bar.close()
    summary = summarise(list(results), duration, slos)
    summary.update(model=model, base_url=args.base_url, num_requests=len(records), request_rate=args.request_rate,
                   burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                   ignore_eos=not args.no_ignore_eos, data=str(args.data))
    errors = [r for r in results if not r.ok]
    if errors:
        summary["first_error"] = f"status {errors[0].status}: {errors[0].error}"
    return summary, list(results)


def _served_model(base_url: str, api_key: str | None) -> str:
    req = urllib.request.Request(base_url.rstrip("/") + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["data"][0]["id"]
    except OSError as e:
        raise ValueError(f"--base-url {base_url}: cannot list the served models ({e})") from e


def format_table(s: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|",
             f"| completed / failed | {s['completed']} / {s['failed']} |",
             f"| duration | {s['duration_s']:.2f} s |",
             f"| request throughput | {s['request_throughput']:.3f} req/s |",
             f"| output token throughput | {s['output_throughput']:.1f} tok/s |",
             f"| total token throughput | {s['total_token_throughput']:.1f} tok/s |"]
    if "request_goodput" in s:
        lines.append(f"| goodput ({', '.join(f'{k} <= {v:g} ms' for k, v in s['goodput_slos_ms'].items())}) | "
                     f"{s['request_goodput']:.3f} req/s |")
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        lines.append(f"| {name} mean / median / p99 | {s[f'mean_{key}_ms']:.1f} / {s[f'median_{key}_ms']:.1f} / "
                     f"{s[f'p99_{key}_ms']:.1f} ms |")
    return "\n".join(lines)


def plot(results: list[RequestResult], path: Path) -> Path | None:
    from lengthwise.bench.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    done = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, values, title in ((axes[0], [r.ttft * 1000 for r in done], "TTFT (ms)"),
                              (axes[1], [t * 1000 for r in done if (t := r.tpot) is not None], "TPOT (ms)"),
                              (axes[2], [r.latency for r in done], "E2E latency (s)")):
        ax.hist(values or [0], bins=30)
        ax.set_title(title)
        ax.set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_subcommand(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("serve", help="load-test a running server (TTFT, TPOT, ITL, E2E, goodput)",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--data", required=True, type=Path, help="alpaca-lengths JSONL (e.g. dev.jsonl)")
    p.add_argument("--length-key", default="t0.0", help="which recorded length each request asks for")
    p.add_argument("--num-requests", type=positive_int, default=200)
    p.add_argument("--max-output-tokens", type=positive_int, default=HARD_CAP,
                   help=f"cap on max_tokens (default {HARD_CAP})")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (default inf: all "
                   "at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps: 1 is Poisson, "
                   "below 1 burstier (vLLM's)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:20000")
    p.add_argument("--no-ignore-eos", action="store_true", help="let the model stop before the recorded length")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request connect timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=output_file, default=None, help="write the summary (and per-request results) here")
    p.add_argument("--out-dir", type=Path, default=Path("bench-serve-results"), help="table and PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    summary, results = asyncio.run(run_benchmark(args))
    table = format_table(summary)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "serve.md").write_text(table + "\n")
    png = plot(results, args.out_dir / "serve.png")
    print(table)
    if png is not None:
        print(f"plot: {png}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps({**summary, "requests": [asdict(r) for r in results]}, indent=2) + "\n")
    if summary["failed"]:
        print(f"[bench serve] {summary['failed']} request(s) failed; the first: {summary.get('first_error')}",
              file=sys.stderr)
    return 0 if summary["completed"] else 1  # nothing measured is a failed benchmark, not a result
