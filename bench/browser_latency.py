"""In-browser latency of the on-device mode: a running LesionNet server's page in headless Chromium, the model run by
onnxruntime-web (WebAssembly, one thread) through the page's own module (lesionnet/app/static/ondevice.js).

    lesionnet serve ckpt=<run> scores=<eval>/scores.json port=8231 &
    python bench/browser_latency.py --url http://127.0.0.1:8231 --n 30 --images ../shared/data/ham10000_200x150/images

Not a test. Per image, after --warmup images: ``analyse`` (decode, image check, resize and crop, the graph, the
answer: what a person waits for) and ``graph`` (``session.run`` alone on the preprocessed tensor). Also the first
load (runtime, policy and model; the server exports the model at its first request, so start the bench once before
timing a cold load). Needs Chromium at /usr/bin/chromium (or $LESIONNET_CHROMIUM) and Playwright for Python.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_app import DEFAULT_IMAGES, LOOPBACK, TYPES, percentile  # noqa: E402

LOAD = """async () => {
  const start = performance.now();
  window.onDevice = await (await import("/static/ondevice.js")).load();
  return performance.now() - start;
}"""
TIME_ONE = """async ({data, type}) => {
  const od = window.onDevice, blob = new Blob([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], {type});
  let start = performance.now();
  const answer = await od.analyse(blob);
  const analyse = performance.now() - start;
  const x = od.preprocess(await od.decode(blob), od.policy.preprocessing);
  start = performance.now();
  await od.run(x.data, x.dims);
  const top = answer.probabilities.length ? answer.probabilities[0].code : null;
  return {analyse, graph: performance.now() - start, status: answer.status, top};
}"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("-n", "--n", type=int, default=30, help="timed images (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--compare", action="store_true", help="also upload each image: same status and top class?")
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in LOOPBACK:
        sys.exit(f"Only loopback servers are benchmarked, not {args.url}.")
    from playwright.sync_api import sync_playwright

    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in TYPES)
    chosen = random.Random(args.seed).sample(files, min(args.n + args.warmup, len(files)))
    chromium = os.environ.get("LESIONNET_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.set_default_timeout(600_000)
        page.goto(args.url + "/")
        load_ms = page.evaluate(LOAD)
        rows = [
            page.evaluate(
                TIME_ONE, {"data": base64.b64encode(p.read_bytes()).decode(), "type": TYPES[p.suffix.lower()]}
            )
            for p in chosen
        ][args.warmup :]
        version = browser.version
        browser.close()
    result: dict[str, Any] = {
        "url": args.url,
        "images": str(args.images),
        "n": len(rows),
        "warmup": args.warmup,
        "chromium": version,
        "onnxruntime_web": json.loads((REPO / "package.json").read_text())["dependencies"]["onnxruntime-web"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "first_load_ms": round(load_ms, 1),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
    }
    if args.compare:  # the server's answers to the same files (uploads), after the timing
        import httpx

        agree = 0
        for path, row in zip(chosen[args.warmup :], rows, strict=True):
            files = {"file": (path.name, path.read_bytes(), TYPES[path.suffix.lower()])}
            body = httpx.post(args.url + "/api/v1/predict", files=files, timeout=60).json()
            top = body["probabilities"][0]["code"] if body["probabilities"] else None
            agree += (body["status"], top) == (row["status"], row["top"])
        result["same_status_and_top_class"] = f"{agree}/{len(rows)}"
    for key in ("analyse", "graph"):
        values = [r[key] for r in rows]
        result[f"{key}_ms"] = {q: round(percentile(values, p), 1) for q, p in (("p50", 50), ("p90", 90), ("max", 100))}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
