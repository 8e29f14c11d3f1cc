"""Saved models: ``<models_dir>/<dataset>/<name>/`` with weights, config, metrics, history.

A model's content hash (weights + config) keys its compiled circuits in the cache. Listing and
reading models imports neither torch nor medmnist (the service process stays small); loading
weights or calibration images does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import PipelineConfig, default_models_dir

if TYPE_CHECKING:
    import torch

    from .features import FeatureNorm
    from .model import QATFCNN
    from .train import TrainResult

WEIGHTS = "weights.pt"
CALIBRATION = "calibration.npz"
META = "model.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ModelNotFound(Exception):
    """No saved model matches the request."""


@dataclass
class SavedModel:
    dataset: str
    name: str
    path: Path
    config: PipelineConfig
    hash: str
    created: float
    metrics: dict
    history: list[dict]
    thresholds: list[float] | None
    in_features: int
    n_outputs: int
    # What the model learned from: [{"kind": "medmnist", ...}, {"kind": "images", "sha256": ...}]
    sources: list[dict] = dataclasses.field(default_factory=list)
    # The per-feature standardization the client applies after the feature stage (None: pixels)
    feature_norm: "FeatureNorm | None" = None

    def features(self, images: np.ndarray) -> np.ndarray:
        """The model's input for uint8 images: its feature stage and scaling, on the client."""
        from .features import features

        return features(images, self.config.model, self.feature_norm)

    def stage_description(self) -> dict:
        """The feature stage, the image it reads and the model's scaling, for remote clients."""
        from .data import dataset_info
        from .features import describe

        return describe(self.config.model, self.feature_norm, self.config.data.size,
                        dataset_info(self.dataset).n_channels)

    def stage_text(self) -> str:
        """One line naming the model's feature stage and its number of encrypted inputs."""
        from .features import summary

        return summary(self.config.model, self.in_features)

    def sources_text(self) -> str:
        """One line naming what the model learned from, with counts per class."""
        return describe_sources(self.sources, self.dataset)

    def load_torch(self) -> "QATFCNN":
        import torch

        from .model import build_model

        model = build_model(self.in_features, self.n_outputs, self.config.model)
        state = torch.load(self.path / WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        return model

    def calibration_features(self, n: int) -> np.ndarray:
        """Features of up to ``n`` stored training images: the compiler's input set."""
        with np.load(self.path / CALIBRATION) as f:
            images = f["images"]
        return self.features(images[:n])

    def summary(self) -> dict:
        m = self.config.model
        return {
            "dataset": self.dataset,
            "name": self.name,
            "hidden": list(m.hidden),
            "bits (w/a/in)": f"{m.weight_bits}/{m.act_bits}/{m.input_bits}",
            "val_accuracy": self.metrics.get("val", {}).get("accuracy"),
            "test_accuracy": self.metrics.get("test", {}).get("accuracy"),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created)),
            "hash": self.hash[:12],
        }


def _weights_bytes(model: "torch.nn.Module") -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


# Fields added later, left out of the hash at their default: a model without them keeps its hash
_LATER_FIELDS = {"input_levels": 0}
_STAGE_FIELDS = ("features", "scattering_j", "scattering_l", "feature_grid")  # hashed for other kinds only


def content_hash(weights: bytes, cfg: PipelineConfig, norm: "FeatureNorm | None" = None) -> str:
    h = hashlib.sha256()
    h.update(weights)
    # Only what changes the function the model computes (not data paths or epochs).
    model = dataclasses.asdict(cfg.model)
    for name, default in _LATER_FIELDS.items():
        if model[name] == default:
            del model[name]
    if model["features"] == "pixels":
        for name in _STAGE_FIELDS:
            del model[name]
    h.update(json.dumps(model, sort_keys=True).encode())
    h.update(cfg.data.dataset.encode() + str(cfg.data.size).encode())
    if norm is not None:
        h.update(json.dumps(norm.to_dict()).encode())
    return h.hexdigest()


def default_name(cfg: PipelineConfig) -> str:
    m = cfg.model
    arch = "-".join(map(str, m.hidden)) or "linear"
    return f"fcnn-{arch}-w{m.weight_bits}a{m.act_bits}i{m.input_bits}-{time.strftime('%Y%m%d-%H%M%S')}"


def save(result: "TrainResult", name: str | None = None, models_dir: Path | None = None, overwrite: bool = False) -> SavedModel:
    cfg = result.config
    name = name or default_name(cfg)
    if not NAME_RE.match(name):
        raise ValueError(f"Invalid model name '{name}': use letters, digits, '-', '_', '.' (max 64).")
    root = Path(models_dir or default_models_dir()) / cfg.data.dataset
    final = root / name
    if final.exists() and not overwrite:
        raise FileExistsError(f"A model named '{name}' already exists in {root}; pick another name.")
    weights = _weights_bytes(result.model)
    meta = {
        "dataset": cfg.data.dataset,
        "name": name,
        "hash": content_hash(weights, cfg, result.feature_norm),
        "created": time.time(),
        "config": cfg.to_dict(),
        "in_features": int(result.model.linears()[0].in_features),
        "n_outputs": int(result.model.linears()[-1].out_features),
        "metrics": result.metrics,
        "history": [dataclasses.asdict(h) for h in result.history],
        "thresholds": result.thresholds,
        "sources": result.sources,
    }
    if result.feature_norm is not None:
        meta["feature_norm"] = result.feature_norm.to_dict()
    # Data paths are machine-specific: the registry stores the dataset, not where it was read
    # (a labelled folder is named by its last part; its content hash is in "sources").
    meta["config"]["data"]["data_dir"] = ""
    if meta["config"]["data"].get("images"):
        meta["config"]["data"]["images"] = Path(meta["config"]["data"]["images"]).name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    (tmp / WEIGHTS).write_bytes(weights)
    (tmp / META).write_text(json.dumps(meta, indent=2))
    np.savez_compressed(tmp / CALIBRATION, images=result.calibration)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return load(cfg.data.dataset, name, models_dir)


def set_compile(saved: SavedModel, cc) -> SavedModel:
    """Store ``cc`` as the model's compile settings (what every later command compiles with);
    the weights and the content hash stay as they are. Written atomically."""
    meta_path = saved.path / META
    meta = json.loads(meta_path.read_text())
    meta["config"]["compile"] = dataclasses.asdict(cc)
    fd, tmp = tempfile.mkstemp(dir=saved.path, prefix=f".{META}.")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, meta_path)
    return _read(saved.path)


def load(dataset: str, name: str | None = None, models_dir: Path | None = None) -> SavedModel:
    """A saved model by name, or the dataset's default: the most recently created one."""
    if name is None:
        models = list_models(dataset, models_dir)
        if not models:
            root = Path(models_dir or default_models_dir()) / dataset
            raise ModelNotFound(
                f"No trained model for '{dataset}' in {root}. Train one first: "
                f"python -m engine train --dataset {dataset}"
            )
        return models[0]
    path = Path(models_dir or default_models_dir()) / dataset / name
    if not (path / META).exists():
        names = ", ".join(m.name for m in list_models(dataset, models_dir)) or "none"
        raise ModelNotFound(f"No model '{name}' for '{dataset}' (available: {names}).")
    return _read(path)


def _read(path: Path) -> SavedModel:
    meta = json.loads((path / META).read_text())
    return SavedModel(
        dataset=meta["dataset"],
        name=meta["name"],
        path=path,
        config=PipelineConfig.from_dict(meta["config"]),
        hash=meta["hash"],
        created=meta["created"],
        metrics=meta.get("metrics", {}),
        history=meta.get("history", []),
        thresholds=meta.get("thresholds"),
        in_features=meta["in_features"],
        n_outputs=meta["n_outputs"],
        sources=meta.get("sources") or [{"kind": "medmnist", "dataset": meta["dataset"], "split": "train"}],
        feature_norm=_norm(meta.get("feature_norm")),
    )


def _norm(d: dict | None):
    if not d:
        return None
    from .features import FeatureNorm

    return FeatureNorm.from_dict(d)


def describe_sources(sources: list[dict], dataset: str = "") -> str:
    """``sources`` of ``model.json`` as one line."""
    parts = []
    for s in sources:
        counts = s.get("train")
        count_text = f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else ""
        if s.get("kind") == "images":
            held = sum((s.get("holdout") or {}).values())
            parts.append(f"labelled images '{s.get('source')}': {sum((counts or {}).values())} trained on{count_text}, "
                         f"{held} held out; sha256 {str(s.get('sha256'))[:12]}")
        else:
            n = s.get("files")
            parts.append(f"MedMNIST {s.get('dataset', dataset)} {s.get('split', 'train')} split"
                         + (f": {n} images{count_text}" if n else ""))
    return "; ".join(parts) or "unknown"


def list_models(dataset: str | None = None, models_dir: Path | None = None) -> list[SavedModel]:
    """Saved models, newest first (optionally of one dataset). Unreadable folders are skipped."""
    root = Path(models_dir or default_models_dir())
    pattern = f"{dataset}/*/{META}" if dataset else f"*/*/{META}"
    out = []
    for meta in root.glob(pattern):
        try:
            out.append(_read(meta.parent))
        except (KeyError, ValueError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda m: m.created, reverse=True)
