"""The operating point in force in this browser session (``engine.study.operating``): chosen on
the Validate page or uploaded there, kept per model, and named beside every answer. It lives in
the session only: the server never sees it."""

from __future__ import annotations

import streamlit as st

from engine.learn import registry
from engine.study.operating import OperatingPoint, PointError

KEY = "operating_points"  # session state: model hash -> OperatingPoint


def current(saved: registry.SavedModel) -> OperatingPoint | None:
    return st.session_state.get(KEY, {}).get(saved.hash)


def use(saved: registry.SavedModel, point: OperatingPoint) -> OperatingPoint:
    """Put ``point`` in force for ``saved`` (a point made for another model: :class:`PointError`)."""
    st.session_state.setdefault(KEY, {})[saved.hash] = point.check(saved)
    return point


def clear(saved: registry.SavedModel) -> None:
    st.session_state.get(KEY, {}).pop(saved.hash, None)


def load(saved: registry.SavedModel, data: bytes) -> OperatingPoint:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PointError("not an operating point file: not text") from None
    return use(saved, OperatingPoint.from_json(text))


def in_force(saved: registry.SavedModel) -> str:
    """Which rule decides the answers, in words."""
    point = current(saved)
    return point.describe() if point is not None else "argmax (no operating point chosen)"


def decision(saved: registry.SavedModel, logits, info, guard=None, verdict=None) -> str:
    """The answer decided under the point in force, with the probability it was decided on ('' without
    a point: the argmax answer is the decision); a flagged input stays uncertain whatever the point."""
    point = current(saved)
    if point is None:
        return ""
    p = float(point.probability(logits[None], info, guard)[0])
    return (f"{point.answer(p, info.labels, verdict is not None and verdict.foreign)} "
            f"(P({point.finding_name}) {100 * p:.0f}%, threshold {100 * point.threshold:.0f}%)")


def decisions(saved: registry.SavedModel, items, logits, info, guard=None) -> list[str]:
    """:func:`decision` for each decodable item of a batch, in order."""
    good = [it for it in items if it.error is None]
    return [decision(saved, z, info, guard, it.verdict) for it, z in zip(good, logits)]
