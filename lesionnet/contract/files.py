"""Reading and writing the versioned JSON files of the contract: one writer, one reader, one error for both.

Each file carries ``schema_version``; a file of another version (or none, written before versioning) is refused with
its path and the fix, instead of being half-understood.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Schema = TypeVar("Schema", bound=BaseModel)


class ContractError(ValueError):
    """A run's file is missing, of another version, or does not belong with the other inputs; says how to fix it."""


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` through a temporary file and a rename: a reader starting at the same time never sees half a
    file. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(document: BaseModel, path: str | Path) -> Path:
    """Atomically write ``document`` (a reader starting at the same time never sees half a file)."""
    return write_text_atomic(path, document.model_dump_json(indent=2))


def read_json(schema: type[Schema], path: str | Path, version: int, what: str, fix: str) -> Schema:
    """Parse ``path`` as ``schema`` at ``version``; any problem is a ContractError naming the file and ``fix``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ContractError(f"{what} not found: {path}. {fix}") from err
    except (OSError, ValueError) as err:
        raise ContractError(f"Cannot read {what} {path}: {err}. {fix}") from err
    found = raw.get("schema_version") if isinstance(raw, dict) else None
    if found != version:
        origin = "written before files were versioned" if found is None else "written by another LesionNet release"
        raise ContractError(
            f"{path} is a {what} of schema version {found} ({origin}); this LesionNet reads version {version}. {fix}"
        )
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ContractError(f"{path} is not a valid {what}: {err}. {fix}") from err
