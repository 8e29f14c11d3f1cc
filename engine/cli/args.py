"""What the command groups share: argument groups, configs from arguments, progress, the predictor."""

from __future__ import annotations

import argparse
import sys

from ..config import CompileConfig, DataConfig


class UserError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="pneumoniamnist", help="MedMNIST 2D subset (default: pneumoniamnist)")
    p.add_argument("--data-dir", default="", help="folder with <dataset>.npz (default: $MEDMNIST_DIR, else ~/.medmnist)")
    p.add_argument("--size", type=int, default=28, help="image size: 28 (default) or 64/128/224 where the file exists")
    p.add_argument("--no-download", action="store_true", help="never try medmnist's download")
    p.add_argument("--models-dir", default=None, help="model registry (default: $ENGINE_MODELS_DIR, else ./models)")


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="saved model name (default: the dataset's newest model)")
    p.add_argument("--cache-dir", default=None, help="circuit cache (default: $ENGINE_CACHE_DIR, else ./.cache)")


def compile_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compile (default: the settings saved with the model)")
    g.add_argument("--rounding-bits", type=int, default=None, help="rounding_threshold_bits (>= 2)")
    g.add_argument("--rounding-method", choices=["approximate", "exact"], default=None)
    g.add_argument("--p-error", type=float, default=None, help="error probability per PBS, e.g. 0.01")


def modes_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--modes", default=default, help="'all' or a comma list of float,quantized,simulate,fhe")


def server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None,
                   help="run the fhe mode through this service (URL; several, comma separated, are replicas); "
                        "default: an in-process service")
    tenant_args(p)


def tenant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None, help="the tenant's bearer token for the service (default: $ENGINE_TOKEN)")
    p.add_argument("--ca-file", default=None,
                   help="CA certificate that signed an https:// service's certificate (default: $ENGINE_CA_FILE)")


def byte_size(text: str) -> int:
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgib")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (use e.g. 1073741824, 1GiB, 512MiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return int(value)


def data_cfg(a) -> DataConfig:
    return DataConfig(dataset=a.dataset.lower(), size=a.size, data_dir=a.data_dir, allow_download=not a.no_download)


def compile_cfg(a, base: CompileConfig) -> CompileConfig:
    """``base`` with the compile flags given over it (every other field kept)."""
    from ..learn.recipes import apply

    return apply(base, rounding_threshold_bits=a.rounding_bits, rounding_method=a.rounding_method, p_error=a.p_error)


def progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="img", file=sys.stderr, leave=False, mininterval=0.5, disable=None)

    def update(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    return bar, update


def say(msg: str) -> None:
    print(f"[engine] {msg}", file=sys.stderr)


def predictor(a):
    from ..learn.data import dataset_info
    from ..study.infer import Predictor, parse_modes

    dataset_info(a.dataset)  # unknown dataset: one clear error before anything loads
    if getattr(a, "modes", None):
        parse_modes(a.modes)

    p = Predictor.open(a.dataset.lower(), a.model, a.models_dir, cache_dir=a.cache_dir, progress_text=say)
    p.compile_config = compile_cfg(a, p.saved.config.compile)
    if getattr(a, "server", None):
        from ..serve.transports import HTTPTransport

        p.transport = HTTPTransport(a.server, token=a.token, ca_file=a.ca_file)
    return p


def stability_args(p) -> None:
    p.add_argument("--stability-images", type=int, default=300,
                   help="validation images for the stability check (repeated simulations; 0: skip)")
    p.add_argument("--no-auto-stable", action="store_true",
                   help="keep the compile setting even if the stability check finds it unstable "
                        "(default: adopt the nearest stable one)")


def settle_stability(saved, cc, a, compiled=None, cache_dir=None, latency_images: int = 3):
    """The stability check after a compile or a training, printed; an unstable setting is
    replaced by the nearest stable one as the model's own unless ``--no-auto-stable``."""
    from ..learn.data import DataError
    from ..study import stability

    try:
        s = stability.settle(saved, cc, data_cfg(a), a.stability_images, compiled, cache_dir,
                             adopt=not a.no_auto_stable, latency_images=latency_images, say=say)
    except DataError as exc:
        say(f"stability not measured: {exc}")
        return None
    for line in stability.report_lines(s.current, s.proposal, tried=not s.current.stable):
        print(line)
    if s.adopted:
        c = s.proposal.compile
        print(f"adopted: {saved.dataset}/{saved.name} now compiles with rounding {c.rounding_threshold_bits} bits "
              f"({c.rounding_method}), p_error {c.p_error:g} (--no-auto-stable keeps the setting asked for)")
    elif s.proposal is not None:
        print("kept the setting asked for (--no-auto-stable)")
    return s
