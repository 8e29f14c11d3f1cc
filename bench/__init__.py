"""Benchmark scripts (``python bench/<script>.py``): each prints its figures and, when asked, writes
them to ``bench/results/``, where the docs' tables come from."""

from __future__ import annotations

import json
from pathlib import Path


def publish(result: dict, path: str | None) -> None:
    """Print ``result`` as JSON and, with ``path``, write it there too."""
    from engine.study.evaluate import write_json

    print(json.dumps(result, indent=2, default=str))
    if path:
        write_json(result, Path(path))
