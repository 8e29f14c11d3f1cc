"""Is a compiled circuit stable: does the same image always get the same answer?

A TFHE lookup is exact only with probability 1 - ``p_error``, and approximate rounding adds its
own off-by-one; near a decision boundary that can flip a prediction between two runs of the
same image. :func:`measure` runs FHE simulation (the circuit's own error model) several times on
validation images and reports the mean agreement between pairs of runs, as the design-space
search does. Under :data:`STABLE` agreement (99%: what a model's defaults promise, simulate =
encrypted on at least 99% of images; 300 images resolve it to about +-0.4 points, so a 99.5% bar
flipped between two checks of one circuit: 99.33% and 99.67%; the design-space search keeps its
own 99.5% bar for the shipped models), :func:`nearest_stable` compiles the nearby safer
settings (one or two more rounding bits, a lower ``p_error``, both, exact rounding), checks
them from the cheapest up by Concrete's cost estimate, and returns the first stable one with
its encrypted latency, measured through real encryption.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..config import CompileConfig

STABLE = 0.99  # the agreement the defaults promise (simulate = encrypted on >= 99%); 300 images resolve about +-0.4 points
RUNS = 4  # simulations per check: 6 pairs
MAX_ROUNDING = 8
LOWEST_P_ERROR = 1e-6


@dataclass
class Stability:
    compile: CompileConfig
    agreement: float  # mean over pairs of runs: share of images with the same prediction
    images: int
    runs: int
    latency_s: float | None = None  # encrypted, median over a few images (measured for proposals)
    pairs: tuple[float, ...] = ()  # each pair of runs' agreement (the mean is ``agreement``)

    @property
    def stable(self) -> bool:
        return self.agreement >= STABLE

    def to_dict(self) -> dict:
        return {"compile": dataclasses.asdict(self.compile), "agreement": self.agreement, "images": self.images,
                "runs": self.runs, "stable": self.stable, "latency_s": self.latency_s}


def measure(predictor, images: np.ndarray, runs: int = RUNS, first=None) -> Stability:
    """Agreement of ``runs`` FHE simulations of ``images`` (uint8) with the predictor's circuit;
    ``first``: a simulation of the same images already made (it counts as one of the runs)."""
    from .evaluate import agreement

    results = [first] if first is not None else []
    results += [predictor.run(images, ["simulate"])["simulate"] for _ in range(runs - len(results))]
    pairs = tuple(float(agreement(a, b)) for a, b in itertools.combinations(results, 2))
    return Stability(predictor.compile_config or predictor.saved.config.compile, float(np.mean(pairs)), len(images),
                     runs, pairs=pairs)


def validation_images(data_cfg, n: int = 300) -> np.ndarray:
    """The first ``n`` validation images: what stability is measured on (never the test split)."""
    from ..learn.data import load_split

    return load_split(data_cfg, "val").head(n).images


def check(saved, cc: CompileConfig, data_cfg, n: int = 300, compiled=None, cache_dir=None) -> Stability:
    """Stability of ``saved`` compiled with ``cc`` on its first ``n`` validation images."""
    from .infer import Predictor

    p = Predictor(saved=saved, compile_config=cc, compiled=compiled, cache_dir=cache_dir)
    return measure(p, validation_images(data_cfg, n))


def propose(saved, cc: CompileConfig, data_cfg, n: int = 300, cache_dir=None,
            say: Callable[[str], None] = lambda _m: None) -> Stability | None:
    """:func:`nearest_stable` on the first ``n`` validation images, latency on the first three."""
    images = validation_images(data_cfg, n)
    return nearest_stable(saved, cc, images, images[:3], cache_dir, say)


def candidates(cc: CompileConfig) -> list[CompileConfig]:
    """Safer settings, nearest first: +1 rounding bit, p_error / 10, +2 bits, p_error / 100, +1 bit
    and p_error / 10, rounding to 6 bits at p_error 1e-5; then, for approximate rounding, exact
    rounding (more lookups, no rounding noise)."""
    more = [dataclasses.replace(cc, rounding_threshold_bits=cc.rounding_threshold_bits + k) for k in (1, 2)
            if cc.rounding_threshold_bits + k <= MAX_ROUNDING]
    lower = [dataclasses.replace(cc, p_error=cc.p_error / f) for f in (10, 100) if cc.p_error / f >= LOWEST_P_ERROR]
    both = [dataclasses.replace(m, p_error=lo.p_error) for m in more[:1] for lo in lower[:1]]
    # Last: the shipped models' kind of setting (what the search found stable), if not tried yet.
    safe = dataclasses.replace(cc, rounding_threshold_bits=max(cc.rounding_threshold_bits, 6), p_error=min(cc.p_error, 1e-5))
    out = more[:1] + lower[:1] + more[1:] + lower[1:] + both + [safe]
    if cc.rounding_method == "approximate":  # approximate rounding's own off-by-one: exact rounding removes it
        exact = dataclasses.replace(cc, rounding_method="exact", p_error=min(cc.p_error / 10, 1e-3))
        out += [exact, dataclasses.replace(safe, rounding_method="exact")]
    seen, unique = {cc}, []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def latency(predictor, images: np.ndarray) -> float:
    """Median encrypted end-to-end latency over ``images`` (keys generated first, not timed)."""
    res = predictor.run(images, ["fhe"])["fhe"]
    return float(np.median(res.latency_s))


def nearest_stable(saved, cc: CompileConfig, images: np.ndarray, latency_images: np.ndarray,
                   cache_dir=None, say: Callable[[str], None] = lambda _m: None) -> Stability | None:
    """The cheapest stable one of :func:`candidates`, with its latency.

    Every candidate is compiled first (about a second each, cached). A candidate that gives the
    same circuit as ``cc`` (one more rounding bit when the accumulators already fit: the same
    program at the same ``p_error``) is skipped: its stability could only differ by chance.
    The others are checked from the lowest cost up, by Concrete's own estimate of a run
    (its optimizer's complexity), and the first stable one is returned. An RGB subset's
    circuit, for example, is stable with exact rounding at 0.43 s per image, or with one more
    rounding bit at 1.9 s: the nearest setting is not always the cheap one."""
    from .infer import Predictor

    base = Predictor(saved=saved, compile_config=cc, cache_dir=cache_dir).ensure_compiled()
    seen = {(base.program, cc.p_error)}
    options = []
    for cand in candidates(cc):
        p = Predictor(saved=saved, compile_config=cand, cache_dir=cache_dir)
        c = p.ensure_compiled()
        if (c.program, cand.p_error) in seen:
            continue
        seen.add((c.program, cand.p_error))
        options.append((c.complexity, cand, p))
    for cost, cand, p in sorted(options, key=lambda o: o[0]):  # ties keep the candidates' order
        say(f"trying rounding {cand.rounding_threshold_bits} bits ({cand.rounding_method}), p_error {cand.p_error:g} "
            f"(cost estimate {cost / base.complexity:.2f}x)")
        s = measure(p, images)
        s.compile = cand
        if s.stable:
            t0 = time.perf_counter()
            s.latency_s = latency(p, latency_images)
            say(f"stable ({100 * s.agreement:.2f}%); latency measured in {time.perf_counter() - t0:.0f} s")
            return s
    return None


@dataclass
class Settled:
    """What :func:`settle` found: the circuit's stability, the nearest stable setting if it was
    not stable, whether the model now compiles with that one, and the encrypted latency of
    the setting the model keeps."""

    current: Stability
    proposal: Stability | None
    adopted: bool
    saved: object  # the model, as stored after the check
    latency_s: float | None


def settle(saved, cc: CompileConfig, data_cfg, n: int = 300, compiled=None, cache_dir=None, adopt: bool = True,
           latency_images: int = 3, say: Callable[[str], None] = lambda _m: None) -> Settled:
    """Check the stability of ``saved`` compiled with ``cc`` on ``n`` validation images; if it
    is not stable, find the nearest stable setting and, with ``adopt``, store it as the model's
    compile settings. Measures the encrypted latency of the setting kept (median over
    ``latency_images`` validation images, keys generated first)."""
    from ..learn import registry
    from .infer import Predictor

    images = validation_images(data_cfg, n)
    p = Predictor(saved=saved, compile_config=cc, compiled=compiled, cache_dir=cache_dir)
    current = measure(p, images)
    proposal, adopted, lat = None, False, None
    if not current.stable:
        proposal = nearest_stable(saved, cc, images, images[:max(latency_images, 3)], cache_dir, say)
        if proposal is not None and adopt:
            saved = registry.set_compile(saved, proposal.compile)
            adopted, lat = True, proposal.latency_s
    if lat is None and latency_images:
        lat = latency(p, images[:latency_images])
    return Settled(current, proposal, adopted, saved, lat)


def report_lines(current: Stability, proposal: Stability | None, tried: bool) -> list[str]:
    """What the CLI prints and the Compile page shows."""
    lines = [f"stability: repeated simulations agree on {100 * current.agreement:.2f}% of {current.images} "
             f"validation images ({current.runs} runs){'' if current.stable else f' — UNSTABLE (under {100 * STABLE:.1f}%)'}"]
    if not current.stable:
        if proposal is not None:
            c = proposal.compile
            lines.append(f"nearest stable setting: --rounding-bits {c.rounding_threshold_bits} --p-error {c.p_error:g} "
                         f"--rounding-method {c.rounding_method} ({100 * proposal.agreement:.2f}% agreement, "
                         f"{1000 * proposal.latency_s:.0f} ms per image encrypted)")
        elif tried:
            lines.append("no nearby setting is stable: retrain with wider margins (fewer bits, pooling, more epochs)")
    return lines
