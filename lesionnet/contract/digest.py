"""A digest of a JSON document that also names the field that changed: written beside what a file records, it
detects a mistaken or hand edit and says where it is. It is not a signature: anyone who edits the file can recompute
it. Used by ``scores.json`` (each row bound to what it scored, :mod:`lesionnet.contract.scores`).

The document is hashed as canonical JSON (sorted keys, no spaces). To name a change without storing the document
twice, every leaf (a value that is not a non-empty object, nor a list holding objects) also gets a short fingerprint
of its path and value; the fingerprints are stored grouped by the leaf's first two path components (``row.melanoma``),
in path order. A group whose leaves no longer line up (a field added or removed) is named as a whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

FINGERPRINT_HEX = 4  # per leaf: names the changed field; the sha256 of the whole document detects the change

LeafPath = tuple[str | int, ...]


def canonical(document: Any) -> str:
    """``document`` (JSON types only) as one canonical string: sorted keys, no spaces, no NaN."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_of(document: Any) -> str:
    return hashlib.sha256(canonical(document).encode()).hexdigest()


def path_text(path: LeafPath) -> str:
    """``("row", "melanoma", "val_threshold")`` -> ``row.melanoma.val_threshold``; list indices as ``[i]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def leaves(document: Any, path: LeafPath = ()) -> Iterator[tuple[LeafPath, Any]]:
    """Every (path, value) of ``document`` whose value is not a non-empty object nor a list holding objects."""
    if isinstance(document, dict) and document:
        for key, value in document.items():
            yield from leaves(value, (*path, str(key)))
    elif isinstance(document, list) and any(isinstance(item, dict) for item in document):
        for index, item in enumerate(document):
            yield from leaves(item, (*path, index))
    else:
        yield path, document


def _grouped(document: Any) -> dict[str, list[tuple[str, str]]]:
    """Group (first two path components) -> [(leaf path, fingerprint)], in path order."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for path, value in sorted(leaves(document), key=lambda leaf: leaf[0]):
        fingerprint = hashlib.sha256(canonical([list(path), value]).encode()).hexdigest()[:FINGERPRINT_HEX]
        groups.setdefault(path_text(path[:2]), []).append((path_text(path), fingerprint))
    return groups


def fingerprints(document: Any) -> dict[str, str]:
    """Group -> its leaves' fingerprints concatenated: what :func:`changed_fields` compares against."""
    return {group: "".join(fp for _, fp in items) for group, items in _grouped(document).items()}


def changed_fields(document: Any, stored: dict[str, str]) -> list[str]:
    """The paths of ``document`` whose fingerprints differ from ``stored`` (a whole group where fields were added or
    removed); empty when none can be named (the sha256 still tells the document changed)."""
    current = _grouped(document)
    changed: list[str] = []
    for group in [*current, *(g for g in stored if g not in current)]:
        items = current.get(group, [])
        now, before = "".join(fp for _, fp in items), stored.get(group)
        if now == before:
            continue
        if before is None or len(before) != len(now):
            changed.append(group)
            continue
        step = FINGERPRINT_HEX
        changed += [path for k, (path, fp) in enumerate(items) if before[k * step : (k + 1) * step] != fp] or [group]
    return changed
