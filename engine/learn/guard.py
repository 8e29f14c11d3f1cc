"""Client-side guardrails for uploaded images: does this image look like the training data, and
how sure is the model?

The client owns the image, so it can check it before encrypting (the server never sees it).

* **Foreign-input score.** Four distances of what the model sees (scaled to [0, 1]) to the
  training images, each with its threshold at the :data:`VAL_QUANTILE` quantile of the
  *validation* images' distances (so at least 95% of real validation images pass all four;
  the rate is stored): the Mahalanobis distance of simple statistics (mean, contrast, share of
  black and of white pixels), the Mahalanobis distance inside the training images' first
  principal components (unusual structure), and the reconstruction error off them (noise, text,
  anything the training images never contain); and the graininess (pixel-to-pixel change) of
  the image and of the original upload, since shrinking averages noise away. Plain
  checks on the uploaded file add what resizing hides: a very elongated or tiny original, or a
  colour image for a greyscale model.
* **Sharpness.** The training images' median graininess is stored too: an upload shrunk to the
  model's size from a sharper original is softened to it (:func:`engine.learn.images.load_image`).
* **Calibrated confidence.** Temperature scaling of the model's logits (Guo et al., 2017),
  fitted on upload-like copies of the validation images, then raised until answers at 90% or
  more are right at least 95% of the time on them; a prediction whose top two calibrated probabilities are within
  :data:`UNCERTAIN_MARGIN` is marked uncertain.

The fitted guard is stored beside the model (``guard.npz``, about 70 KB), so it works without
the dataset file: shipped models ship theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .framing import Framing
from .images import graininess

GUARD_FILE = "guard.npz"
COMPONENTS = 24
VAL_QUANTILE = 0.995  # each distance's threshold: this quantile of the validation images' distances
UNCERTAIN_MARGIN = 0.2
MAX_ASPECT = 2.0  # longer side / shorter side of the original
MIN_SIDE = 8  # pixels
MIN_CONTRAST = 0.02  # standard deviation of grey levels (/255) below which an image is flat: no scan is
COLOUR_SATURATION = 0.08  # mean |channel - grey| / 255 above which a greyscale model sees a colour image


@dataclass
class Verdict:
    """The guard's view of one image."""

    foreign: bool
    score: float  # max of the two calibrated distances: <= 1 passes
    reasons: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)


@dataclass
class Confidence:
    probabilities: np.ndarray  # calibrated
    top: float
    margin: float
    # why no confidence is given: the input check flagged the image, and a confidence calibrated
    # on images of the right kind says nothing about another kind ('' when it is given)
    withheld: str = ""

    @property
    def uncertain(self) -> bool:
        return bool(self.withheld) or self.margin < UNCERTAIN_MARGIN

    @property
    def shown(self) -> float | None:
        """The confidence to show: None when withheld."""
        return None if self.withheld else self.top

    def text(self) -> str:
        """How the dashboard and the CLI state it (markdown)."""
        if self.withheld:
            return "**uncertain**: no confidence is given for an image the input check flagged"
        return f"calibrated confidence {100 * self.top:.0f}%" + (
            " — **uncertain** (the top two classes are close)" if self.uncertain else "")


@dataclass
class Guard:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D)
    variances: np.ndarray  # (k,)
    maha_threshold: float
    recon_threshold: float
    stats_mean: np.ndarray  # (4,)
    stats_icov: np.ndarray  # (4, 4)
    stats_threshold: float
    temperature: float
    channels: int
    multi_label: bool
    val_pass_rate: float
    texture_threshold: float = float("inf")  # mean absolute difference between neighbouring pixels
    texture_median: float | None = None  # the training images' median graininess: uploads are softened to it
    framing: "Framing | None" = None  # the squeeze estimator stored beside the model (framing.npz), if any
    # soften uploads grainier than texture_median (models that learned from MedMNIST's crops only);
    # a model trained with --images learned real uploads as the upload path makes them: no correction
    soften: bool = True

    @property
    def sharpness(self) -> float | None:
        """The graininess the upload path softens an upload to (None: it does not)."""
        return self.texture_median if self.soften else None

    # -- scoring
    @staticmethod
    def _vectors(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32) / 255.0
        return x.reshape(len(x), -1)

    @staticmethod
    def _stats(x: np.ndarray) -> np.ndarray:
        return np.stack([x.mean(1), x.std(1), (x < 0.04).mean(1), (x > 0.96).mean(1)], axis=1)

    def _stats_distance(self, x: np.ndarray) -> np.ndarray:
        d = self._stats(x) - self.stats_mean
        return np.sqrt(np.einsum("ni,ij,nj->n", d, self.stats_icov, d))

    texture = staticmethod(graininess)  # the image's and the upload's graininess (shrinking averages noise away)

    def distances(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(statistics, Mahalanobis inside the subspace, reconstruction error), each divided by its threshold."""
        x = self._vectors(images)
        d = x - self.mean
        z = d @ self.components.T
        maha = np.sqrt(((z**2) / self.variances).mean(axis=1))
        recon = np.sqrt(((d - z @ self.components) ** 2).mean(axis=1))
        return (self._stats_distance(x) / self.stats_threshold, maha / self.maha_threshold,
                recon / self.recon_threshold)

    def check(self, image: np.ndarray, original: np.ndarray | None = None) -> Verdict:
        """``image``: what the model sees (uint8, H x W[ x C]); ``original``: the decoded upload."""
        stats, maha, recon = (float(v[0]) for v in self.distances(image[None]))
        reasons = []
        if stats > 1:
            reasons.append(f"its brightness and contrast are unlike the training images' ({stats:.1f}x the usual distance)")
        if maha > 1:
            reasons.append(f"its brightness/structure is unlike the training images ({maha:.1f}x the usual distance)")
        if recon > 1:
            reasons.append(f"it contains patterns the training images never show ({recon:.1f}x the usual residual)")
        if float(np.asarray(image, dtype=np.float32).std()) / 255 < MIN_CONTRAST:
            reasons.append("it is flat (one shade, no structure): not a scan")
        grain = max(float(self.texture([image])[0]), float(self.texture([original])[0]) if original is not None else 0.0)
        if grain > self.texture_threshold:
            reasons.append(f"it is far grainier than the training images (pixel-to-pixel change "
                           f"{grain / self.texture_threshold:.1f}x the usual), like noise")
        if original is not None:
            h, w = original.shape[:2]
            if max(h, w) / max(1, min(h, w)) > MAX_ASPECT:
                reasons.append(f"the original is {w}x{h} px: far from square (the model sees square crops)")
            if min(h, w) < MIN_SIDE:
                reasons.append(f"the original is only {w}x{h} px")
            if self.channels == 1 and original.ndim == 3 and original.shape[2] >= 3:
                rgb = original[..., :3].astype(np.float32)
                saturation = float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean() / 255)
                if saturation > COLOUR_SATURATION:
                    reasons.append("it is a colour image; the model was trained on greyscale images")
        return Verdict(bool(reasons), max(stats, maha, recon), reasons)

    def passes(self, images: np.ndarray) -> np.ndarray:
        stats, maha, recon = self.distances(images)
        return (stats <= 1) & (maha <= 1) & (recon <= 1) & (self.texture(images) <= self.texture_threshold)

    # -- confidence
    def confidence(self, logits: np.ndarray, verdict: "Verdict | None" = None) -> Confidence:
        """The calibrated confidence of one answer; withheld (and the answer uncertain) when
        ``verdict`` flagged the image as foreign."""
        withheld = verdict.message or "flagged" if verdict is not None and verdict.foreign else ""
        z = np.asarray(logits, dtype=np.float64).reshape(-1) / self.temperature
        if self.multi_label:
            p = 1 / (1 + np.exp(-z))
            margin = float(np.min(np.abs(p - 0.5)) * 2)  # the least certain label
            return Confidence(p, float(np.max(p)), margin, withheld)
        e = np.exp(z - z.max())
        p = e / e.sum()
        top2 = np.sort(p)[-2:] if len(p) > 1 else np.array([0.0, p[0]])
        return Confidence(p, float(top2[-1]), float(top2[-1] - top2[-2]), withheld)

    # -- storage
    # the scalar fields, stored each under its own name; files written before names were stored
    # keep them in one array, in this order (read through the same names)
    SCALARS = ("maha_threshold", "recon_threshold", "stats_threshold", "temperature", "channels", "multi_label",
               "val_pass_rate", "texture_threshold", "texture_median", "soften")
    ARRAYS = ("mean", "components", "variances", "stats_mean", "stats_icov")

    def save(self, folder: Path) -> Path:
        path = Path(folder) / GUARD_FILE
        scalars = {name: np.float64(np.nan if getattr(self, name) is None else getattr(self, name))
                   for name in self.SCALARS}
        np.savez_compressed(path, **{name: getattr(self, name) for name in self.ARRAYS}, **scalars)
        return path

    @classmethod
    def load(cls, folder: Path) -> "Guard | None":
        path = Path(folder) / GUARD_FILE
        if not path.exists():
            return None
        with np.load(path) as f:
            arrays = {name: f[name] for name in cls.ARRAYS}
            if "scalars" in f.files:  # an older file: the same values by position
                stored = dict(zip(cls.SCALARS, (float(v) for v in f["scalars"])))
            else:
                stored = {name: float(f[name]) for name in cls.SCALARS if name in f.files}
        median = stored.get("texture_median", np.nan)
        return cls(**arrays, maha_threshold=stored["maha_threshold"], recon_threshold=stored["recon_threshold"],
                   stats_threshold=stored["stats_threshold"], temperature=stored["temperature"],
                   channels=int(stored["channels"]), multi_label=bool(stored["multi_label"]),
                   val_pass_rate=stored["val_pass_rate"],
                   texture_threshold=stored.get("texture_threshold", float("inf")),
                   texture_median=median if np.isfinite(median) else None,
                   framing=Framing.load(folder), soften=bool(stored.get("soften", True)))


def _fit_temperature(logits: np.ndarray, labels: np.ndarray, multi_label: bool) -> float:
    """The temperature minimising validation negative log-likelihood (a 1-D search in log space)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)

    def nll(t: float) -> float:
        s = z / t
        if multi_label:
            p = np.clip(1 / (1 + np.exp(-s)), 1e-9, 1 - 1e-9)
            return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        s = s - s.max(axis=1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y.reshape(-1).astype(int)].mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 121))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.05, 0.05, 21))
    return float(min(fine, key=nll))


def fit(train_images: np.ndarray, val_images: np.ndarray, val_logits: np.ndarray, val_labels: np.ndarray,
        channels: int, multi_label: bool, components: int = COMPONENTS,
        shifted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, grainy: np.ndarray | None = None,
        framed: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Guard:
    """Fit the subspace on training images, the thresholds and the temperature on validation.

    ``shifted`` (images, logits, labels): upload-like copies of the validation images
    (:func:`engine.learn.augment.upload_copies`). Each threshold is then the higher of its quantile
    over the validation images and over their copies, so an image of the right kind passes however it was
    framed and resized; the temperature is fitted on the copies, so the confidence is that of
    an upload, not of MedMNIST's own crops (on which the model is surer than on anything else).
    ``grainy``: edge-enhanced copies, for the graininess threshold alone (a real scan resized
    from a sharp original is grainier than MedMNIST's images; sharpening would loosen the
    structure thresholds until another kind of scan passes).
    ``framed`` {framing: (logits, labels)}: held-out real images in each framing an upload comes
    in; the temperature is then raised until the promise holds in every framing, not only on
    their pool (:func:`_keep_promise`)."""
    x = Guard._vectors(train_images)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = min(components, len(s))
    variances = (s[:k] ** 2) / max(1, len(x) - 1) + 1e-8
    st = Guard._stats(x)
    icov = np.linalg.inv(np.cov(st, rowvar=False) + 1e-6 * np.eye(st.shape[1]))
    g = Guard(mean.astype(np.float32), vt[:k].astype(np.float32), variances.astype(np.float32), 1.0, 1.0,
              st.mean(axis=0), icov, 1.0, 1.0, channels, multi_label, 0.0,
              texture_median=float(np.median(graininess(train_images))))
    # each threshold: the quantile over the validation images, or over their copies if higher
    sets = [val_images] if shifted is None else [val_images, shifted[0]]
    q = np.max([[np.quantile(d, VAL_QUANTILE) for d in g.distances(im)] for im in sets], axis=0)
    g.stats_threshold, g.maha_threshold, g.recon_threshold = (float(v) for v in q)
    g.texture_threshold = float(max(np.quantile(Guard.texture(im), VAL_QUANTILE)
                                    for im in sets + ([grainy] if grainy is not None else [])))
    g.val_pass_rate = float(g.passes(val_images).mean())
    logits, labels = (val_logits, val_labels) if shifted is None else shifted[1:]
    g.temperature = _fit_temperature(logits, labels, multi_label)
    if not multi_label:
        groups = [(logits, labels), *(framed or {}).values()]
        g.temperature = max(_keep_promise(z, y, g.temperature) for z, y in groups)
    return g


CONFIDENT = 0.9  # an answer given at this calibrated confidence or more ...
CONFIDENT_RIGHT = 0.95  # ... is right at least this often on the images the temperature is fitted on


def _keep_promise(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """The least temperature, from ``temperature`` up, at which answers given at
    :data:`CONFIDENT` or more are right at least :data:`CONFIDENT_RIGHT` of the time. Minimising
    the log-likelihood alone leaves the model too sure of itself on upload-like images (right
    94% and 87% of the time at 90% confidence for the shipped models)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).reshape(-1).astype(int)
    for t in temperature * 1.05 ** np.arange(0, 80):
        s = z / t
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        sure = p.max(axis=1) >= CONFIDENT
        if not sure.any() or (p.argmax(axis=1)[sure] == y[sure]).mean() >= CONFIDENT_RIGHT:
            return float(t)
    return float(t)


SHIFTED_COPIES = 4  # upload-like copies of each validation image the guard is fitted on


def fit_for(saved, data_cfg=None, images=None) -> Guard:
    """Fit and store the guard of a saved model from its dataset's train and validation splits
    (and upload-like copies of the validation images).

    ``images`` (:class:`engine.learn.labelled.TrainingImages`, a model trained with ``--images``):
    their training part joins the training images, and their held-out part, as uploaded and as
    two real-upload versions each, joins the upload-like copies that set the thresholds and the
    temperature: the confidence is then calibrated on held-out real images too. It keeps its
    promise in each framing an upload comes in (:data:`engine.learn.augment.UPLOAD_FRAMINGS`), the
    held-out files read again from where they were."""
    import torch

    from .augment import upload_copies
    from .data import load_split

    cfg = data_cfg or saved.config.data
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    model = saved.load_torch()
    copies = upload_copies(val.images, SHIFTED_COPIES)
    copy_labels = np.concatenate([val.labels] * SHIFTED_COPIES)
    train_images = train.images
    framed = {}
    if images is not None and len(images.holdout_index):
        framed = images.framed(val.info, cfg.size, val.info.n_channels, Framing.load(saved.path))
        held, own = images.holdout_index, images.train_index
        real = np.concatenate([images.clean[held], *images.copies[:2, held]])
        copies = np.concatenate([copies, real])
        copy_labels = np.concatenate([copy_labels, np.tile(images.labels[held], 1 + min(2, len(images.copies)))
                                      .reshape(-1, 1)])
        train_images = np.concatenate([train.images, images.clean[own]])
    with torch.no_grad():
        logits = model(torch.from_numpy(saved.features(np.concatenate([val.images, copies])))).numpy()
        framed = {kind: (model(torch.from_numpy(saved.features(x))).numpy(), y) for kind, (x, y) in framed.items()}
    n = len(val)
    shifted = (copies, logits[n:], copy_labels)
    g = fit(train_images, val.images, logits[:n], val.labels, val.info.n_channels, val.info.multi_label,
            shifted=shifted, grainy=upload_copies(val.images, 1, seed=1, sharpen=1.0), framed=framed)
    g.soften = images is None
    g.save(saved.path)
    g.framing = Framing.load(saved.path)
    return g


def for_model(saved, data_cfg=None) -> Guard | None:
    """The model's stored guard; fitted (and stored) now if the dataset is on this machine."""
    g = Guard.load(saved.path)
    if g is not None:
        return g
    try:
        return fit_for(saved, data_cfg)
    except Exception:  # noqa: BLE001 - no dataset here: the caller says the guard is unavailable
        return None
