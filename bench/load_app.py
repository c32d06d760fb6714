"""Load a running LesionNet server (``lesionnet serve ...``) with N image uploads and report what came back.

    python bench/load_app.py                                  # 200 requests, 8 at a time, at http://127.0.0.1:8000
    python bench/load_app.py --requests 30 --concurrency 1    # sequential: per-image latency
    python bench/load_app.py --images ../shared/data/ham10000_200x150/images --json out.json

Not a test. Bounded: at most --requests uploads (<= 10,000), at most --concurrency in flight, no new request after
--max-seconds, each one given up after --timeout. Only loopback servers are accepted. Latency is measured from the
client (upload + queueing + inference + Grad-CAM + answer) on answers with HTTP 200. 503 answers (the server's bounded
queue, ``limits.max_pending``) are counted apart from real errors (other 4xx/5xx, timeouts, refused connections);
with --retry-busy a 503 is retried after its Retry-After, and the latency then includes the waits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from lesionnet.data.metadata import embedded_sample_images

DEFAULT_IMAGES = embedded_sample_images()
MAX_REQUESTS = 10_000
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (as numpy's default), ``q`` in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def load_images(folder: Path, count: int, seed: int) -> list[tuple[str, bytes, str]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in TYPES)
    if not files:
        sys.exit(f"No JPEG/PNG/WebP images in {folder}")
    chosen = random.Random(seed).sample(files, min(count, len(files)))
    return [(p.name, p.read_bytes(), TYPES[p.suffix.lower()]) for p in chosen]


async def one(
    client: httpx.AsyncClient,
    url: str,
    image: tuple[str, bytes, str],
    retry_busy: int = 0,
    deadline: float = float("inf"),
) -> dict[str, Any]:
    """One upload; a 503 is retried up to ``retry_busy`` times after its Retry-After (jittered), as a polite client."""
    start = time.perf_counter()
    busy_seen = 0
    while True:
        try:
            r = await client.post(url, files={"file": image})
        except httpx.HTTPError as err:  # timeouts, refused or dropped connections
            return {
                "outcome": f"transport:{type(err).__name__}",
                "seconds": time.perf_counter() - start,
                "busy_seen": busy_seen,
            }
        if r.status_code != 503 or busy_seen >= retry_busy or time.perf_counter() > deadline:
            break
        busy_seen += 1
        wait = float(r.headers.get("retry-after", "1") or 1)
        await asyncio.sleep(wait * random.uniform(0.5, 1.0))
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"http": r.status_code, "seconds": seconds, "busy_seen": busy_seen + (r.status_code == 503)}
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code == 200:
        out["outcome"], out["answer"] = "ok", body.get("status", "?")
        out["level"] = (body.get("urgency") or {}).get("level")
    elif r.status_code == 503:
        out["outcome"] = "busy"
    else:
        out["outcome"] = f"http:{r.status_code}:{(body.get('error') or {}).get('code', '?')}"
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    images = load_images(args.images, args.requests, args.seed)
    base = args.url.rstrip("/")
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        try:
            health = (await client.get(base + "/healthz")).json()
        except (httpx.HTTPError, ValueError) as err:
            sys.exit(
                f"No LesionNet server answers at {base}/healthz ({type(err).__name__}: {err}). Start one with "
                "lesionnet serve ckpt=..."
            )
        for _ in range(args.warmup):  # first requests pay one-off costs (allocations, lazy imports)
            await one(client, base + "/api/v1/predict", images[0])
        sem = asyncio.Semaphore(args.concurrency)
        deadline = time.perf_counter() + args.max_seconds
        results: list[dict[str, Any]] = []

        async def worker(k: int) -> None:
            async with sem:
                if time.perf_counter() > deadline:
                    results.append({"outcome": "not_sent"})
                    return
                results.append(
                    await one(client, base + "/api/v1/predict", images[k % len(images)], args.retry_busy, deadline)
                )

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(args.requests)))
        wall = time.perf_counter() - start
    return summarise(args, health, results, wall, len(images))


def summarise(
    args: argparse.Namespace, health: dict[str, Any], results: list[dict[str, Any]], wall: float, n_images: int
) -> dict[str, Any]:
    ok = [r["seconds"] for r in results if r["outcome"] == "ok"]
    busy = [r["seconds"] for r in results if r["outcome"] == "busy"]
    outcomes = Counter(r["outcome"] for r in results)
    stats = lambda xs: {  # noqa: E731
        "n": len(xs),
        **{f"p{q}_ms": None if not xs else round(1000 * percentile(xs, q), 1) for q in (50, 95, 99)},
        "mean_ms": round(1000 * sum(xs) / len(xs), 1) if xs else None,
        "max_ms": round(1000 * max(xs), 1) if xs else None,
    }
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "url": args.url,
        "model_version": health.get("model_version"),
        "client_host": platform.node(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "distinct_images": n_images,
        "images": str(args.images),
        "warmup": args.warmup,
        "wall_s": round(wall, 2),
        "throughput_ok_per_s": round(len(ok) / wall, 2) if wall else None,
        "latency_ok": stats(ok),
        "latency_busy_503": stats(busy),
        "ok_200": len(ok),
        "busy_503": outcomes["busy"],
        "retry_busy": args.retry_busy,
        "busy_503_answers_seen": sum(r.get("busy_seen", 0) for r in results),
        "errors": {k: v for k, v in sorted(outcomes.items()) if k not in ("ok", "busy", "not_sent")},
        "not_sent_after_max_seconds": outcomes["not_sent"],
        "answers": dict(Counter(r.get("answer") for r in results if r["outcome"] == "ok")),
        "urgency_levels": dict(Counter(r.get("level") for r in results if r["outcome"] == "ok")),
    }


def report(s: dict[str, Any]) -> str:
    lat = s["latency_ok"]
    lines = [
        f"{s['date']}  {s['url']}  model {s['model_version']}",
        f"{s['requests']} requests, concurrency {s['concurrency']}, {s['distinct_images']} distinct images, "
        f"{s['warmup']} warm-up; wall {s['wall_s']} s",
        f"200 OK        {s['ok_200']:5d}   p50 {lat['p50_ms']} ms   p95 {lat['p95_ms']} ms   p99 {lat['p99_ms']} ms   "
        f"max {lat['max_ms']} ms   throughput {s['throughput_ok_per_s']} answers/s",
        f"503 busy      {s['busy_503']:5d}   (bounded queue; p50 {s['latency_busy_503']['p50_ms']} ms to refuse; "
        f"{s['busy_503_answers_seen']} 503 answers seen in all, up to {s['retry_busy']} retries each)",
        f"errors        {sum(s['errors'].values()):5d}   {s['errors'] or ''}",
    ]
    if s["not_sent_after_max_seconds"]:
        lines.append(f"not sent      {s['not_sent_after_max_seconds']:5d}   (after --max-seconds)")
    lines.append(f"answers {s['answers']}  urgency {s['urgency_levels']}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running server (loopback only)")
    p.add_argument("--requests", "-n", type=int, default=200, help="uploads to send (default 200)")
    p.add_argument("--concurrency", "-c", type=int, default=8, help="uploads in flight at once (default 8)")
    p.add_argument(
        "--images",
        type=Path,
        default=DEFAULT_IMAGES,
        help="folder of JPEG/PNG/WebP images, sampled without replacement then cycled "
        "(default: the 286 HAM10000 images embedded in lesionnet/data/sample/images)",
    )
    p.add_argument("--seed", type=int, default=0, help="which images are sampled")
    p.add_argument("--warmup", type=int, default=2, help="sequential requests sent first and not counted")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before one request is given up")
    p.add_argument("--max-seconds", type=float, default=600.0, help="no new request after this many seconds")
    p.add_argument(
        "--retry-busy",
        type=int,
        default=0,
        help="retry a 503 up to this many times after its Retry-After (default 0: count it and move on)",
    )
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    host = urlsplit(args.url).hostname
    if host not in LOOPBACK:
        p.error(f"--url must be a loopback server (127.0.0.1, localhost, ::1), not {host!r}")
    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests must be within 1..{MAX_REQUESTS}")
    if not 1 <= args.concurrency <= min(args.requests, 256):
        p.error("--concurrency must be within 1..min(--requests, 256)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    summary = asyncio.run(run(args))
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
