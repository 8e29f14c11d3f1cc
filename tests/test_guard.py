"""Client-side guardrails on real images: the input check, calibrated confidence, batch uploads,
and the stability check of compiled circuits (real tiny circuits)."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from engine.learn import guard as guards
from engine.learn import screening
from engine.learn import registry
from engine.learn.data import DataConfig, load_split


def foreign_inputs(size: int = 28) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(what the model sees, the original) for inputs that are clearly not medical scans."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:96, 0:128]
    photo = np.stack([(xx * 2) % 256, (yy * 3) % 256, 255 - (xx + yy) % 256], -1).astype(np.uint8)  # a colourful scene
    photo[20:60, 30:90] = [30, 160, 40]
    grey_photo = np.asarray(Image.fromarray(photo).convert("L").resize((size, size)))
    noise = (rng.random((size, size)) * 255).astype(np.uint8)
    black = np.zeros((size, size), np.uint8)
    big_noise = (rng.random((120, 90)) * 255).astype(np.uint8)  # shrunk to the model's size, it averages out
    shrunk = np.asarray(Image.fromarray(big_noise[15:105]).resize((size, size), Image.BILINEAR))
    return {"black 3x3": (black, np.zeros((3, 3), np.uint8)), "black strip 10x2000": (black, np.zeros((10, 2000), np.uint8)),
            "noise": (noise, noise), "noise 90x120 upload": (shrunk, big_noise), "colour photo": (grey_photo, photo)}


@pytest.mark.parametrize("dataset", ["pneumoniamnist", "breastmnist"])
def test_shipped_guard_passes_real_validation_images_and_flags_foreign_ones(dataset, data_dir):
    saved = registry.load(dataset, None, REPO / "models")
    g = guards.Guard.load(saved.path)
    assert g is not None, "shipped models ship their guard.npz"
    val = load_split(DataConfig(dataset, data_dir=str(data_dir), allow_download=False), "val")
    rate = g.passes(val.images).mean()
    assert rate >= 0.95 and abs(rate - g.val_pass_rate) < 1e-9
    for name, (image, original) in foreign_inputs().items():
        v = g.check(image, original)
        assert v.foreign and v.message, name
    # The plain image statistics alone flag a black or a white square of the model's size.
    for value in (0, 255):
        assert g.check(np.full((28, 28), value, np.uint8)).foreign


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("dataset", ["pneumoniamnist", "breastmnist"])
def test_shipped_guard_flags_patterns_and_flat_images_uploaded_as_files(dataset):
    """Uploaded as a user would (the whole upload path, softening included): a sine-wave pattern,
    stripes, a checkerboard, a flat grey and a white page are flagged."""
    saved = registry.load(dataset, None, REPO / "models")
    g = guards.Guard.load(saved.path)
    yy, xx = np.mgrid[0:224, 0:224]
    files = {"sine.png": 127.5 + 127.5 * np.sin(xx / 6.0) * np.sin(yy / 9.0), "stripes.png": 127.5 + 127.5 * np.sin(xx / 4.0),
             "checker.png": (xx // 16 + yy // 16) % 2 * 255.0, "grey.png": np.full((224, 224), 128.0),
             "white.png": np.full((224, 224), 255.0)}
    items = screening.screen([(k, _png(v.astype(np.uint8))) for k, v in files.items()], g, 28, g.channels)
    assert [it.name for it in items if not it.verdict.foreign] == []


def test_guard_is_fitted_on_validation_and_stored_with_the_model(tiny_saved, data_dir):
    g = guards.fit_for(tiny_saved, DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False))
    assert (tiny_saved.path / guards.GUARD_FILE).exists()
    again = guards.Guard.load(tiny_saved.path)
    assert again.val_pass_rate == g.val_pass_rate >= 0.95 and again.temperature == g.temperature > 0
    # Calibrated confidence: equal logits are uncertain, a wide margin is not.
    assert g.confidence(np.array([0.0, 0.0])).uncertain
    sure = g.confidence(np.array([-8.0, 8.0]))
    assert not sure.uncertain and sure.top > 0.9 and np.isclose(sure.probabilities.sum(), 1)


def test_batch_upload_with_a_zip_gives_one_row_per_file(tiny_saved, predictor, data_dir):
    g = guards.fit_for(tiny_saved, DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False))
    val = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val")

    def png(arr) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue()

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("scans/a.png", png(val.images[0]))
        z.writestr("scans/b.png", png(val.images[1]))
        z.writestr("notes.txt", "not an image")
        z.writestr("__MACOSX/scans/._a.png", "resource fork")
    files = [("batch.zip", archive.getvalue()), ("black.png", png(np.zeros((3, 3), np.uint8))),
             ("broken.png", b"not a png")]
    items = screening.screen(files, g, 28, 1)
    assert [it.name for it in items] == ["batch.zip/scans/a.png", "batch.zip/scans/b.png", "black.png", "broken.png"]
    good = [it for it in items if it.error is None]
    res = predictor.run(np.stack([it.image for it in good]), ["quantized"])["quantized"]
    rows = screening.batch_rows(items, res.logits, res.predictions, str, g)
    assert [r["file"] for r in rows] == [it.name for it in items]
    assert [bool(r["warning"]) for r in rows] == [False, False, True, True]
    assert rows[3]["prediction"] is None and rows[0]["prediction"] == str(res.predictions[0])
    assert all(0.5 <= r["confidence"] <= 1 for r in rows[:2])
    # a flagged image gets no confidence, and its answer is uncertain
    assert rows[2]["confidence"] is None and rows[2]["uncertain"] is True
    c = g.confidence(np.array([-8.0, 8.0]), items[2].verdict)
    assert c.withheld and c.uncertain and c.shown is None and "no confidence" in c.text()
    assert g.confidence(np.array([-8.0, 8.0]), items[0].verdict).shown > 0.9


def test_a_zip_without_images_is_refused_clearly():
    from engine.learn.images import ImageError, expand_uploads

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ImageError, match="holds no image"):
        expand_uploads([("x.zip", archive.getvalue())])
    with pytest.raises(ImageError, match="not a readable zip"):
        expand_uploads([("y.zip", b"PK nope")])


def test_stability_report_on_an_unstable_and_a_stable_setting(tiny_saved, cache_dir, data_dir):
    from engine.study import stability
    from engine.config import CompileConfig
    from engine.study.infer import Predictor

    val = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val").head(150)  # enough: the shaky setting flips several of them, the steady one none
    shaky = CompileConfig(rounding_threshold_bits=3, rounding_method="approximate", p_error=0.05, inputset_size=128)
    steady = CompileConfig(rounding_threshold_bits=4, rounding_method="exact", p_error=1e-5, inputset_size=128)
    bad = stability.measure(Predictor(saved=tiny_saved, compile_config=shaky, cache_dir=cache_dir), val.images)
    good = stability.measure(Predictor(saved=tiny_saved, compile_config=steady, cache_dir=cache_dir), val.images)
    assert not bad.stable and bad.agreement < stability.STABLE <= good.agreement
    assert "UNSTABLE" in stability.report_lines(bad, None, tried=False)[0]
    assert "UNSTABLE" not in stability.report_lines(good, None, tried=False)[0]
    said = []
    proposal = stability.nearest_stable(tiny_saved, shaky, val.images, val.images[:2], cache_dir, said.append)
    assert proposal is not None and proposal.stable and proposal.compile in stability.candidates(shaky)
    # Tried from the cheapest up, by Concrete's cost estimate; the last tried is the proposal
    costs = [float(m.split("cost estimate ")[1].split("x")[0]) for m in said if m.startswith("trying")]
    assert costs and costs == sorted(costs)
    tried = [m for m in said if m.startswith("trying")][-1]
    assert f"rounding {proposal.compile.rounding_threshold_bits} bits ({proposal.compile.rounding_method})" in tried
    assert proposal.latency_s > 0
    lines = stability.report_lines(bad, proposal, tried=True)
    assert lines[1].startswith(f"nearest stable setting: --rounding-bits {proposal.compile.rounding_threshold_bits} ")


def test_an_unstable_setting_is_replaced_by_the_nearest_stable_one_unless_asked_not_to(tiny_saved, cache_dir, data_dir,
                                                                                     tmp_path):
    import shutil

    from engine.config import CompileConfig
    from engine.study import stability

    shutil.copytree(tiny_saved.path, tmp_path / "pneumoniamnist" / tiny_saved.name)
    mine = registry.load("pneumoniamnist", tiny_saved.name, tmp_path)  # a copy: the shared model stays as it is
    shaky = CompileConfig(rounding_threshold_bits=3, rounding_method="approximate", p_error=0.05, inputset_size=128)
    data = DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False)
    kept = stability.settle(mine, shaky, data, 100, cache_dir=cache_dir, adopt=False, latency_images=0)
    assert not kept.current.stable and kept.proposal.stable and not kept.adopted
    assert registry.load("pneumoniamnist", tiny_saved.name, tmp_path).config.compile == mine.config.compile
    s = stability.settle(mine, shaky, data, 100, cache_dir=cache_dir, latency_images=2)
    # (each search simulates afresh: near the threshold the two may stop at different candidates)
    assert s.adopted and s.proposal.stable and s.proposal.compile in stability.candidates(shaky) and s.latency_s > 0
    stored = registry.load("pneumoniamnist", tiny_saved.name, tmp_path)
    assert stored.config.compile == s.proposal.compile and stored.hash == mine.hash  # same weights, safer circuit


def test_validation_gives_a_flagged_image_no_confidence(tiny_saved, predictor, data_dir):
    from engine.study.validate import LabelledFile, validate

    g = guards.fit_for(tiny_saved, DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False))
    val = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val")
    noise = (np.random.default_rng(3).random((120, 90)) * 255).astype(np.uint8)
    files = [LabelledFile("normal/a.png", int(val.labels[0, 0]), _png(val.images[0])),
             LabelledFile("pneumonia/noise.png", 1, _png(noise))]
    r = validate(predictor, g, files, "quantized")
    rows = {im["file"]: im for im in r["images"]}
    flagged = rows["pneumonia/noise.png"]
    assert flagged["flagged"] and flagged["confidence"] is None and flagged["uncertain"] is True and flagged["warning"]
    assert not rows["normal/a.png"]["flagged"] and rows["normal/a.png"]["confidence"] >= 0.5
    assert r["flagged_share"] == 0.5 and r["confident_share"] <= 0.5  # the flagged one is never among the confident
