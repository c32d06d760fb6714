"""Decode + augment throughput of the DataModule alone, against the model's training throughput.

For each config (``lesionnet/conf/experiment``, composed like ``train.py experiment=<name>``), the train loader of
``HAM10000DataModule`` (the experiment's image size, crop and augmentations, batch size, shuffling) is iterated
with ``num_workers`` in ``--workers``, without a model: ``--warmup`` batches (worker start-up) not counted, then
``--batches`` timed batches. Reported: images/s, and user+system CPU time per image of the process and its
workers (what the pipeline takes away from the model when both share the CPU).

The model side is one of, or both:

* **model-only**: the plain train step of ``bench/train_throughput.py`` (same model, optimizer, loss) on one real
  batch repeated, measured in this run: how fast the model could eat with the data pipeline taken out;
* **train** (``--train-json``): the median end-to-end training images/s of the Lightning and plain arms of a
  ``bench/train_throughput.py --json`` run (data loading included).

The issue's target is data >= 3x model. On a machine with few cores, read it with the CPU column: the loader
workers and the model share the same cores, so a pipeline measured alone with 2 workers on 2 cores had the whole
machine, which it does not have during training. ``feed_cpu_share`` = model images/s x data CPU seconds per image /
usable CPUs is the share of the machine that feeding the model at its speed costs.

    python bench/data_throughput.py --root ../shared/data/ham10000_200x150 --train-json train.json --json data.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench/throughput, the parts of train_throughput.py: config composition, Clock, the plain train step, the report
from throughput.arms import DEFAULT_CONFIGS
from throughput.config import base_parser, compose_config, set_threads
from throughput.markdown_report import finish_report
from throughput.plain_loop import model_only_throughput
from throughput.probes import Clock, load_average
from throughput.run_info import cpu_info, run_metadata
from throughput.summary import median

TARGET = 3.0


def loader_throughput(datamodule: Any, num_workers: int, warmup: int, batches: int) -> dict[str, Any]:
    """Iterate the train loader with ``num_workers`` workers (epochs wrap around); time ``batches`` batches."""
    datamodule.num_workers = num_workers
    loader = datamodule.train_dataloader()
    clock = Clock(warmup, batches)
    while not clock.done:
        for images, _ in loader:
            clock.step_end(int(images.shape[0]))
            if clock.done:
                break
    result = clock.result()
    del loader  # shuts the (persistent) workers down before the next measurement
    gc.collect()
    keep = (
        "warmup_steps",
        "steps",
        "images",
        "seconds",
        "images_per_s",
        "cpu_seconds_main",
        "cpu_seconds_workers",
        "cpu_ms_per_image",
    )
    return {"num_workers": num_workers, **{k: result[k] for k in keep}}


def train_figures(path: Path | None, config: str) -> dict[str, Any] | None:
    if path is None:
        return None
    report = json.loads(path.read_text())
    entry = report.get("configs", {}).get(config)
    if not entry:
        return None
    summary = entry["summary"]
    return {
        "source": str(path),
        "date_utc": report.get("date_utc"),
        "lightning_images_per_s": summary["median_train_images_per_s"]["lightning"],
        "plain_images_per_s": summary["median_train_images_per_s"]["plain"],
    }


def measure_config(args: argparse.Namespace, config: str) -> dict[str, Any]:
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lesionnet-data-bench-") as tmp:
        cfg = compose_config(config, tmp, args.root, args.override, pretrained=False, loggers=False)
    L.seed_everything(cfg.seed, workers=True)
    dm = instantiate(cfg.data)
    start = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    configured_workers = dm.num_workers
    runs = []
    for r in range(1, args.rounds + 1):
        for nw in args.workers:
            run = {"round": r, "load_before": load_average(), **loader_throughput(dm, nw, args.warmup, args.batches)}
            runs.append(run)
            print(
                f"{config} round {r} workers {nw}: {run['images_per_s']:.0f} img/s, "
                f"{run['cpu_ms_per_image']:.2f} CPU ms/img",
                file=sys.stderr,
                flush=True,
            )
    per_workers = {nw: median([x["images_per_s"] for x in runs if x["num_workers"] == nw]) for nw in args.workers}
    cpu_ms = {nw: median([x["cpu_ms_per_image"] for x in runs if x["num_workers"] == nw]) for nw in args.workers}
    dm.num_workers = configured_workers
    model = (
        None
        if args.no_model
        else {
            "load_before": load_average(),
            **model_only_throughput(cfg, dm, args.model_warmup, args.model_steps),
        }
    )
    train = train_figures(args.train_json, config)
    cpus = cpu_info()["usable_cpus"]
    comparisons = {}
    for name, ips in (
        ("model_only", model and model["images_per_s"]),
        ("train_lightning", train and train["lightning_images_per_s"]),
        ("train_plain", train and train["plain_images_per_s"]),
    ):
        if ips:
            comparisons[name] = {
                "model_images_per_s": ips,
                "data_over_model": {nw: round(per_workers[nw] / ips, 2) for nw in args.workers},
                "feed_cpu_share": {nw: round(ips * cpu_ms[nw] / 1000 / cpus, 3) for nw in args.workers},
            }
    return {
        "config": config,
        "backbone": cfg.model.backbone,
        "image_size": list(dm.data_config["input_size"][1:]),
        "batch_size": dm.batch_size,
        "configured_num_workers": configured_workers,
        "augment": OmegaConf.to_container(cfg.data.augment, resolve=True),
        "train_images": len(dm.datasets["train"]),
        "setup_seconds": round(setup_s, 2),
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "median_images_per_s": per_workers,
        "median_cpu_ms_per_image": cpu_ms,
        "model_only": model,
        "train": train,
        "comparisons": comparisons,
        "meets_target_at_configured_workers": {
            name: c["data_over_model"].get(configured_workers, 0) >= TARGET
            for name, c in comparisons.items()
            if configured_workers in c["data_over_model"]
        },
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Data pipeline throughput ({report['date_utc']})",
        "",
        f"CPU: {report['cpu']['model']} ({report['cpu']['usable_cpus']} usable CPUs); load average before "
        f"{report['load_before']}, after {report['load_after']}; commit {str(report['git']['commit'])[:10]}",
        "",
    ]
    for res in report["configs"].values():
        lines += [
            f"## {res['config']}: {res['backbone']}, {res['image_size'][0]}x{res['image_size'][1]}, batch "
            f"{res['batch_size']} (configured num_workers {res['configured_num_workers']})",
            "",
        ]
        comps = {k: v for k, v in res["comparisons"].items() if k != "train_plain"}  # plain: in the JSON
        head = "| workers | data img/s | CPU ms/img |"
        rule = "|---:|---:|---:|"
        for name, c in comps.items():
            head += f" data / {name} ({c['model_images_per_s']:.1f} img/s) | CPU share to feed {name} |"
            rule += "---:|---:|"
        lines += [head, rule]
        for nw, ips in res["median_images_per_s"].items():
            row = f"| {nw} | {ips:.0f} | {res['median_cpu_ms_per_image'][nw]:.2f} |"
            for c in comps.values():
                row += f" **{c['data_over_model'][nw]:.1f}x** | {100 * c['feed_cpu_share'][nw]:.0f}% |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2], help="num_workers values")
    p.add_argument("--rounds", type=int, default=2, help="repeat the workers sweep (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="batches not counted (worker start-up)")
    p.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    p.add_argument("--model-warmup", type=int, default=5)
    p.add_argument("--model-steps", type=int, default=30)
    p.add_argument("--no-model", action="store_true", help="skip the model-only measurement")
    p.add_argument("--train-json", type=Path, help="a bench/train_throughput.py --json report to compare with")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override, e.g. -o data.batch_size=64 (repeatable)",
    )
    p.add_argument("--json", type=Path, help="write every raw number here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "data_throughput",
        **run_metadata(),
        "target_data_over_model": TARGET,
        "load_before": load_average(),
        "configs": {},
    }
    report["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for config in args.configs:
        report["configs"][config] = measure_config(args, config)
    return finish_report(report, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
