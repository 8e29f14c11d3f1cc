"""The CLI reference, generated from the argparse parser (``docs/cli.md``).

Each command's section is exactly what ``python -m engine CMD --help`` prints at 100 columns.
``python -m engine.cli.reference`` (and every docs build, ``docs/hooks.py``) rewrites the page,
and the test suite fails when the committed page differs from the parser: it cannot drift."""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path

WIDTH = "100"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


@contextmanager
def _columns(width: str = WIDTH):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width  # argparse wraps at the terminal's width: fixed here
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def helps() -> dict[str, str]:
    """``{"": top-level help, command: its help}`` in ``--help`` order."""
    from . import ORDER, build_parser

    with _columns():
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {"": parser.format_help(), **{name: sub.choices[name].format_help() for name in ORDER}}


def markdown() -> str:
    from . import ORDER

    h = helps()
    lines = ["<!-- generated from the argparse parser by engine.cli.reference: do not edit -->", "",
             "# CLI reference", "",
             "Every command of `python -m engine`, as its `--help` prints it. User errors exit with code 2 "
             "and one line on stderr.", "", "```text", h[""].rstrip(), "```", ""]
    for name in ORDER:
        lines += [f"## {name}", "", "```text", h[name].rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    PAGE.write_text(markdown())
    print(f"wrote {PAGE}")
