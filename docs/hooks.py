"""MkDocs hook: before each build, write docs/generated/ from the results files and the CLI's parser.

The figure tables come from ``bench/report.py`` (``bench/results/*.json``) and the CLI reference
from ``engine.cli.reference`` (``python -m engine CMD --help`` for every command), so neither is
ever copied by hand. A file is rewritten only when its text changes (``mkdocs serve`` watches it).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_generated() -> list[Path]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    from engine.cli.reference import PAGE, markdown as cli_markdown

    out = REPO / "docs" / "generated"
    out.mkdir(exist_ok=True)
    pages = {out / f"{name}.md": text for name, text in report.render().items()}
    pages[PAGE] = cli_markdown()  # committed (readable on GitHub); the suite checks it is current
    written = []
    for path, text in pages.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def on_pre_build(config, **kwargs) -> None:
    write_generated()
