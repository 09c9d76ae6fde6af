"""Online serving: concurrent streaming clients against `tulu serve`, Poisson arrivals.

Each client sends one streaming OpenAI request (chat or completions) and times every chunk:
time to first token (TTFT), inter-token latency (ITL, the gap between consecutive content
chunks divided by the tokens they carry) and end-to-end latency. Requests arrive as a Poisson
process at `--rate` requests/s (`inf`: all at once) and at most `--concurrency` are in flight.
EOS is ignored (the `ignore_eos` extension field) so every request produces `--max-tokens`.

Afterwards the server's /metrics must show every KV-cache block back in the pool once it is
idle (`tulu_kv_cache_blocks_used 0`): a leaked block fails the run (exit code 1), as does any
request error.

    tulu demo --output /tmp/demo
    python benchmarks/serving.py --model /tmp/demo/model --concurrency 64 --num-requests 256
    python benchmarks/serving.py --url http://127.0.0.1:8000 --api chat --rate 8

With `--model` the script starts `tulu serve` itself on a free port of 127.0.0.1 (a separate
process, so the clients do not share its interpreter) and stops it at the end. Only loopback
or the given `--url` is contacted, and the run is bounded by `--num-requests` and
`--request-timeout`.

The engine-versus-transformers comparison lives in benchmarks/generation.py; transformers
has no HTTP server to compare against, so this benchmark has no baseline column.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from tulu.server.child import ServerProcess, ServerStartError, start_server, wait_healthy

RESULTS = Path(__file__).parent / "results"

# Words for synthetic prompts: short, common, so that a tokenizer trained on English text
# encodes each in one or two tokens.
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part"
).split()


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    status: int | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    finish_reason: str | None = None


# ---------------------------------------------------------------------------------- server


def launch(args: argparse.Namespace, log_path: Path) -> ServerProcess:
    """`tulu serve --model` on a free local port, with this benchmark's engine settings."""
    extra = ["--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]
    if args.kv_cache_gb:
        extra += ["--kv-cache-gb", str(args.kv_cache_gb)]
    if args.api_key:
        extra += ["--api-key", args.api_key]
    return start_server(
        args.model, log_path, extra_args=extra, startup_timeout=args.startup_timeout
    )


# ---------------------------------------------------------------------------------- metrics


def scrape(client: httpx.Client, url: str) -> dict[str, float]:
    """Unlabelled samples of /metrics (labelled ones keyed with their labels)."""
    text = client.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\S+?)(\{.*\})?\s+(\S+)$", line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def wait_idle(client: httpx.Client, url: str, timeout: float) -> dict[str, float]:
    """Scrape /metrics until nothing is running or waiting (bounded); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        values = scrape(client, url)
        idle = (
            values.get("tulu_running_sequences", 0) == 0
            and values.get("tulu_queue_length", 0) == 0
            and values.get("tulu_requests_in_flight", 0) == 0
            and values.get("tulu_kv_cache_blocks_used", 0) == 0
        )
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


# ---------------------------------------------------------------------------------- clients


def make_prompts(rng: random.Random, n: int, length: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def request_body(args: argparse.Namespace, model: str, prompt: str) -> tuple[str, dict]:
    common = {
        "model": model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if args.api == "chat":
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt}],
            **common,
        }
    return "/v1/completions", {"prompt": prompt, **common}


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, path: str, body: dict
) -> Result:
    result = Result()
    started = time.perf_counter()
    last: float | None = None
    content_chunks = 0
    try:
        async with client.stream("POST", path, json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error']}"
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", 0)
                for choice in chunk.get("choices") or ():
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    content_chunks += 1
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.latency = time.perf_counter() - started
    if not result.output_tokens:
        result.output_tokens = content_chunks  # no usage chunk: one token per chunk
    elif content_chunks > 1 and result.output_tokens > content_chunks:
        # Chunks carrying several tokens: spread each gap over the tokens after the first.
        scale = (content_chunks - 1) / (result.output_tokens - 1)
        result.itl = [gap * scale for gap in result.itl]
    result.ok = result.finish_reason is not None
    if not result.ok:
        result.error = "the stream ended without a finish_reason"
    return result


async def run_clients(args: argparse.Namespace, url: str, model: str) -> tuple[list[Result], float]:
    rng = random.Random(args.seed)
    prompts = make_prompts(rng, args.num_requests, args.prompt_len)
    # Poisson process: exponential gaps between arrivals (all at t=0 for an infinite rate).
    arrivals, t = [], 0.0
    for _ in range(args.num_requests):
        arrivals.append(t)
        if math.isfinite(args.rate):
            t += rng.expovariate(args.rate)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        start = time.perf_counter()

        async def launch(i: int) -> Result:
            delay = arrivals[i] - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                path, body = request_body(args, model, prompts[i])
                return await one_request(client, args, path, body)

        results = await asyncio.gather(*(launch(i) for i in range(args.num_requests)))
        elapsed = time.perf_counter() - start
    return list(results), elapsed


# ---------------------------------------------------------------------------------- report


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        # Linear interpolation between closest ranks.
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {
        "mean": statistics.fmean(ordered),
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
    }


def summarise(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": errors,
        "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed if elapsed else 0.0,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_throughput": output_tokens / elapsed if elapsed else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_s": percentiles([r.latency for r in ok]),
    }


def print_table(summary: dict, leak: dict) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:9.1f}"

    print(
        f"\n{'requests':<28}{summary['completed']} ok / {summary['requests']} "
        f"({summary['errors']} errors) in {summary['duration_s']:.2f} s"
    )
    print(f"{'request throughput':<28}{summary['request_throughput']:.2f} req/s")
    print(
        f"{'output throughput':<28}{summary['output_throughput']:.1f} tok/s "
        f"({summary['output_tokens']} tokens)"
    )
    print(f"\n{'latency (ms)':<22}{'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for label, key in (
        ("time to first token", "ttft_s"),
        ("inter-token", "itl_s"),
        ("end to end", "e2e_s"),
    ):
        row = summary[key]
        print(f"{label:<22}{ms(row['mean'])} {ms(row['p50'])} {ms(row['p90'])} {ms(row['p99'])}")
    print(
        f"\nKV-cache blocks used once idle: {leak['kv_blocks_used_after']} "
        f"(of {leak['kv_blocks_total']}; {'no leak' if leak['ok'] else 'LEAK'})"
    )
    for message, count in summary["error_messages"].items():
        print(f"error x{count}: {message}")


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", type=Path, help="start `tulu serve MODEL` on 127.0.0.1")
    p.add_argument("--api", choices=["chat", "completions"], default="completions")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64, help="most requests in flight")
    p.add_argument(
        "--rate", type=float, default=math.inf, help="arrivals per second (inf: all at once)"
    )
    p.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("TULU_API_KEY"))
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds to wait for idle")
    p.add_argument(
        "--startup-timeout", type=float, default=120.0, help="seconds to wait for /health"
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="with --model")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="with --model")
    p.add_argument("--name", default=None, help="results file: serving-NAME.json")
    args = p.parse_args(argv)
    for name in ("num_requests", "concurrency", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.rate > 0:
        p.error("--rate must be > 0")
    for name in ("request_timeout", "idle_timeout", "startup_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if not args.temperature >= 0:
        p.error("--temperature must be >= 0")
    # The name becomes results/serving-NAME.json, written after the run: a path in it would
    # lose the run's figures to a missing folder.
    if args.name is not None and (not args.name or Path(args.name).name != args.name):
        p.error(f"--name {args.name!r}: a file name part (results/serving-NAME.json), not a path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        if args.model is not None:
            log_path = Path(tempfile.gettempdir()) / f"tulu-serving-benchmark-{os.getpid()}.log"
            server = launch(args, log_path)
            url = server.url
            print(f"started tulu serve at {url} (log: {log_path})")
        else:
            url = args.url.rstrip("/")
            wait_healthy(url, args.startup_timeout)
    except ServerStartError as err:
        raise SystemExit(str(err)) from None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(headers=headers, timeout=30.0) as client:
            models = client.get(f"{url}/v1/models").json()["data"]
            model = models[0]["id"]
            before = scrape(client, url)
            print(
                f"{args.num_requests} {args.api} requests to {url} ({model}): concurrency "
                f"{args.concurrency}, rate {args.rate:g}/s, ~{args.prompt_len} prompt words, "
                f"{args.max_tokens} output tokens"
            )
            results, elapsed = asyncio.run(run_clients(args, url, model))
            after = wait_idle(client, url, args.idle_timeout)
    finally:
        exit_code = server.stop() if server is not None else None

    summary = summarise(results, elapsed)
    used = after.get("tulu_kv_cache_blocks_used")
    leak = {
        "kv_blocks_used_before": before.get("tulu_kv_cache_blocks_used"),
        "kv_blocks_used_after": used,
        "kv_blocks_total": after.get("tulu_kv_cache_blocks_total"),
        "running_after": after.get("tulu_running_sequences"),
        "waiting_after": after.get("tulu_queue_length"),
        "ok": used == 0,
    }
    print_table(summary, leak)
    name = args.name or (
        f"{args.model.name if args.model else 'remote'}-{args.api}-c{args.concurrency}"
    )
    record = {
        "benchmark": "serving",
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "api_key"
        },
        "url": url,
        "model": model,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "server_exit_code": exit_code,
        **summary,
        "kv_cache": leak,
        "requests_detail": [{k: v for k, v in asdict(r).items() if k != "itl"} for r in results][
            :1000
        ],
    }
    record["config"]["rate"] = "inf" if math.isinf(args.rate) else args.rate
    out = RESULTS / f"serving-{name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0 if summary["errors"] == 0 and leak["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
