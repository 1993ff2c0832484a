"""WebDataset tar shards as img2dataset writes them, built with `tarfile` (for source and report
tests)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

Sample = tuple[str, dict[str, Any]]  # (key, {extension: bytes, text, or a dict written as JSON})


def write_tar(path: Path, samples: list[Sample]) -> Path:
    """A WebDataset shard: each sample's members `<key>.<extension>`, consecutive, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, value in members.items():
                if isinstance(value, dict):
                    value = json.dumps(value)
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path
