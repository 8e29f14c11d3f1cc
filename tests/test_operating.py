"""Operating points (engine.study.operating): the figures and their intervals, the choice of a
threshold by a target, the refer band, the point's file and its model check."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from engine.study import operating as op


@pytest.fixture(scope="module")
def scored():
    """300 images: labels and a finding probability that ranks them fairly well, with ties."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    return y, np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2)


def test_auc_and_its_interval(scored):
    y, p = scored
    c = op.curves(y, p, finding=1)
    assert c["auc"] == pytest.approx(roc_auc_score(y, p))  # ties count a half, as scikit-learn's
    lo, hi = c["auc_ci"]
    assert lo < c["auc"] < hi and hi - lo < 0.15
    assert c["n"] == 300 and c["positives"] == int(y.sum())
    # the finding may be label 0 (BreastMNIST's malignant): the same images read the other way
    flipped = op.curves(1 - y, p, finding=0)
    assert flipped["auc"] == pytest.approx(c["auc"])


def test_the_table_counts_what_it_says(scored):
    y, p = scored
    row = op.at_thresholds(y, p, 1, [0.5])[0]
    called = p >= 0.5
    assert row["sensitivity"] == pytest.approx(called[y == 1].mean())
    assert row["specificity"] == pytest.approx((~called)[y == 0].mean())
    assert row["ppv"] == pytest.approx(y[called].mean())
    assert row["npv"] == pytest.approx(1 - y[~called].mean())
    assert row["finding_answers"] == int(called.sum())
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        assert row[f"{k}_ci"][0] <= row[k] <= row[f"{k}_ci"][1]


def test_a_target_is_met_with_the_fewest_false_alarms(scored):
    y, p = scored
    t = op.choose(y, p, 1, target_recall=0.95)
    sens = lambda th: (p >= th)[y == 1].mean()  # noqa: E731
    assert sens(t) >= 0.95 and sens(np.min(p[p > t])) < 0.95  # the next score up misses the target
    s = op.choose(y, p, 1, target_specificity=0.9)
    spec = lambda th: (p < th)[y == 0].mean()  # noqa: E731
    assert spec(s) >= 0.9 and spec(np.max(p[p < s])) < 0.9
    with pytest.raises(op.PointError):
        op.choose(y, p, 1, target_recall=0.9, target_specificity=0.9)
    with pytest.raises(op.PointError):
        op.choose(np.ones(5, int), p[:5], 1, target_recall=0.9)


def _saved(hash_="a" * 64):
    return SimpleNamespace(dataset="pneumoniamnist", name="m", hash=hash_)


def _info():
    return SimpleNamespace(labels={0: "normal", 1: "pneumonia"}, n_outputs=2, multi_label=False)


def test_a_point_decides_refers_and_survives_its_file(scored, tmp_path):
    y, p = scored
    files = [SimpleNamespace(name=f"{i}.png", label=int(v), data=bytes([i % 256])) for i, v in enumerate(y)]
    point = op.make_point(_saved(), _info(), y, p, files, target_recall=0.9, refer=[0.4, 0.5])
    assert point.decide(0.45) is None and point.decide(0.99) == 1 and point.decide(0.0) == 0
    assert point.answer(0.45, _info().labels) == op.REFER and point.answer(0.99, _info().labels, flagged=True) == op.UNCERTAIN
    again = op.OperatingPoint.load(point.save(tmp_path / "p.json"))
    assert again == point and again.images["content_hash"] == op.images_hash(list(reversed(files)))
    assert again.check(_saved()) is again
    with pytest.raises(op.PointError, match="chosen for"):
        again.check(_saved("b" * 64))
    audit = op.audit(point, y, p)
    band = (p >= 0.4) & (p < 0.5)
    assert audit["referred"] == int(band.sum()) and audit["answered"] == int((~band).sum())
    (tmp_path / "bad.json").write_text(json.dumps({"threshold": 2}))
    with pytest.raises(op.PointError):
        op.OperatingPoint.load(tmp_path / "bad.json")
    with pytest.raises(op.PointError):
        op.OperatingPoint(**{**json.loads(point.to_json()), "refer": [0.6, 0.5]})


def test_a_point_needs_a_binary_dataset():
    with pytest.raises(op.PointError, match="binary"):
        op.finding_of("dermamnist", SimpleNamespace(n_outputs=7, multi_label=False))
    assert op.finding_of("breastmnist", _info()) == 0 and op.finding_of("pneumoniamnist", _info()) == 1


def test_a_multi_class_report_gives_each_class_against_the_rest():
    from engine.learn.data import dataset_info
    from engine.study.validate import _operating, _operating_lines

    info = dataset_info("dermamnist")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    logits = rng.normal(size=(200, 7))
    logits[np.arange(200), labels] += 2
    report = {"images": []}
    _operating(report, SimpleNamespace(dataset="dermamnist"), info, None, labels, logits, None)
    assert "operating" not in report and report["decided_by"].startswith("argmax")
    ovr = report["one_vs_rest"]
    assert list(ovr) == list(info.labels.values())
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for c, name in info.labels.items():
        assert ovr[name]["auc"] == pytest.approx(roc_auc_score(labels == c, softmax[:, c]))
        assert ovr[name]["auc_ci"][0] <= ovr[name]["auc"] <= ovr[name]["auc_ci"][1]
    assert _operating_lines(report)[0].startswith("AUC of each class against the rest")
