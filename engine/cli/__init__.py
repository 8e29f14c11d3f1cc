"""Command line: ``python -m engine {train,framing,compile,predict,evaluate,bench,search,sweep,serve,loadtest,models,token} ...``."""

from __future__ import annotations

import argparse
import sys

from . import measure, model, service, train
from .args import UserError

# The order of ``--help``: each command group's module adds its own commands.
ORDER = ("train", "framing", "compile", "predict", "evaluate", "bench", "search", "sweep", "serve", "loadtest", "models", "token")
COMMANDS = {**train.COMMANDS, **model.COMMANDS, **measure.COMMANDS, **service.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Encrypted MedMNIST classification (Concrete ML).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ORDER:
        COMMANDS[name][0](sub)
    return parser


def _user_errors() -> tuple[type, ...]:
    """Exceptions that mean "the input or the setup is wrong": one line, exit code 2. Taken only
    from the modules this command imported: importing engine.learn.data (medmnist, hence torch) just
    for its error class would cost ``serve`` about 500 MB of resident memory."""
    out: list[type] = [UserError, FileExistsError, ValueError]
    for module, name in [("engine.learn.data", "DataError"), ("engine.learn.images", "ImageError"),
                         ("engine.serve.transports", "ServiceUnavailable"), ("engine.learn.registry", "ModelNotFound")]:
        if module in sys.modules:
            out.append(getattr(sys.modules[module], name))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except Exception as exc:  # noqa: BLE001 - user errors get one line, anything else its traceback
        if not isinstance(exc, _user_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
