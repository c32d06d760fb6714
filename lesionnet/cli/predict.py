"""``lesionnet predict PHOTO... [serve overrides]``: the app's answer for each photo, in the terminal.

The same service as ``lesionnet serve`` (serve.yaml: with no ``ckpt``, the shipped model, its scores.json and gates),
so a photo gets the same status, class, referral and reasons as on the page. Arguments with ``=`` are Hydra
overrides (``ckpt=...``, ``gradcam=false``); the others are image files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lesionnet.cli import CONF_DIR

PHOTOS: list[Path] = []


def describe(path: Path, answer: dict[str, Any]) -> str:
    """Status, top class, referral and why, in a few lines."""
    lines = [f"{path}: {answer['status']}: {answer['message']}"]
    top = answer.get("top_class")
    if top is not None:
        lines.append(f"  top class: {top['name']} ({top['code']}), shown probability {top['probability']:.1%}")
    urgency = answer["urgency"]
    lines.append(f"  urgency: {urgency['level']}: {urgency['message']}")
    lines += [f"  why: {reason}" for reason in urgency["reasons"]]
    if answer.get("demo_model"):
        lines.append("  (a demo model: trained on a small sample, not usable)")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    from lesionnet.app.build import build_service, upload_limits
    from lesionnet.app.upload import UploadError, decode_image

    service, limits = build_service(cfg), upload_limits(cfg)
    failed = 0
    for path in PHOTOS:
        try:
            image = decode_image(path.read_bytes(), limits)
        except (OSError, UploadError) as err:
            print(f"{path}: not analysed: {err}", file=sys.stderr)
            failed += 1
            continue
        answer = service.analyse(image)
        answer.pop("heatmap", None)
        print(describe(path, answer), flush=True)
    if failed:
        sys.exit(1)


def split_arguments(argv: list[str]) -> tuple[list[Path], list[str]]:
    """(photos, Hydra arguments): overrides contain "="; flags (--help, -c) go to Hydra too."""
    photos = [Path(a) for a in argv if "=" not in a and not a.startswith("-")]
    return photos, [a for a in argv if "=" in a or a.startswith("-")]


if __name__ == "__main__":
    PHOTOS[:], rest = split_arguments(sys.argv[1:])
    if not PHOTOS and not any(a.startswith("-") for a in rest):
        print("usage: lesionnet predict PHOTO... [serve overrides, e.g. ckpt=<run>]", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *rest, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    main()
