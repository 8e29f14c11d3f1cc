"""Typed configuration that travels through the pipeline.

One :class:`PipelineConfig` holds everything a stage needs (data, model, training, compile);
each stage reads only its own part. Configs round-trip through plain dicts (JSON) so a saved
model carries the exact config that produced it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """Folder holding MedMNIST ``.npz`` files: ``$MEDMNIST_DIR``, else ``~/.medmnist``."""
    return Path(os.environ.get("MEDMNIST_DIR") or Path.home() / ".medmnist")


SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the team's data beside a clone (tests and benches read it)


def shared_medmnist_dir() -> Path:
    """The MedMNIST files tests and benches read: ``$MEDMNIST_DIR``, else ``../shared/data/medmnist``."""
    return Path(os.environ.get("MEDMNIST_DIR") or SHARED_DATA / "medmnist")


def default_models_dir() -> Path:
    """Model registry root: ``$ENGINE_MODELS_DIR``, else ``models/`` in the repository."""
    return Path(os.environ.get("ENGINE_MODELS_DIR") or REPO_ROOT / "models")


def default_cache_dir() -> Path:
    """Compiled-circuit and key cache: ``$ENGINE_CACHE_DIR``, else ``.cache/`` in the repo."""
    return Path(os.environ.get("ENGINE_CACHE_DIR") or REPO_ROOT / ".cache")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "pneumoniamnist"
    size: int = 28
    data_dir: str = ""  # empty: default_data_dir()
    allow_download: bool = True
    # Labelled images to train on besides (or instead of) the MedMNIST file: a folder or .zip with
    # one subfolder per class (engine.learn.labelled), put through the upload path.
    images: str = ""
    images_only: bool = False  # train on the images alone (MedMNIST's validation split still reports)
    label_map: str = ""  # NAME=INDEX pairs for class folders named otherwise
    holdout: float = 0.1  # stratified share of the images held out for validation

    @property
    def path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 1:
            raise ValueError("the held-out share of the images must be in [0, 1)")
        if self.images_only and not self.images:
            raise ValueError("--images-only needs --images DIR|ZIP")


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (16,)
    weight_bits: int = 3
    act_bits: int = 3
    input_bits: int = 3
    # Unstructured L1 pruning: keep at most this many non-zero inputs per neuron (bounds
    # the accumulator bit-width). 0 disables pruning.
    max_active_inputs: int = 0
    # Average-pool the image by this factor on the client, before quantization and encryption
    # (1: the full image). Fewer encrypted inputs: cheaper encryption and linear layer.
    input_pool: float = 1  # whole factors crop to a multiple; fractional ones average by area (2.8: 28 px -> 10x10)
    # Client-side intensity histogram appended to the pooled image: for each channel, the share of
    # its pixels brighter than each of this many evenly spaced levels (0: off). A fixed transform,
    # like the pooling; it hands each neuron's few inputs a summary of the whole image.
    input_levels: int = 0
    # The client's feature stage (engine.learn.features): "pixels" (the pooled image, every model
    # shipped before it) or "scattering" (Kymatio's 2D wavelet scattering of the image, J scales and
    # L orientations, averaged onto a feature_grid x feature_grid grid, standardized by the model).
    features: str = "pixels"
    scattering_j: int = 2
    scattering_l: int = 8
    feature_grid: int = 2

    def __post_init__(self) -> None:
        if float(self.input_pool).is_integer():  # 2.0 and 2 are one model (and one content hash)
            object.__setattr__(self, "input_pool", int(self.input_pool))
        if self.input_pool < 1:
            raise ValueError("input_pool must be at least 1")
        if not 0 <= self.input_levels <= 32:
            raise ValueError(f"input_levels must be between 0 (off) and 32, got {self.input_levels}")
        if self.features not in ("pixels", "scattering"):
            raise ValueError(f"Unknown feature stage '{self.features}': use pixels or scattering")
        if not 1 <= self.scattering_j <= 4 or not 1 <= self.scattering_l <= 16 or not 1 <= self.feature_grid <= 8:
            raise ValueError("scattering needs J in 1..4, L in 1..16 and a feature grid of 1..8")

    @staticmethod
    def parse_hidden(text: str) -> tuple[int, ...]:
        """``"32, 16"`` -> ``(32, 16)``; empty text -> ``()`` (a linear model)."""
        try:
            return tuple(int(h) for h in text.replace(" ", "").split(",") if h)
        except ValueError:
            raise ValueError(f"Hidden widths must be whole numbers separated by commas, got '{text}'.") from None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    class_weighting: bool = True
    limit_train: int = 0  # 0: the whole training split (tests use a small slice)
    augment_shift: int = 0  # random translations of up to this many pixels each epoch (0: off)
    augment_rotate: float = 0.0  # random rotations of up to this many degrees (0: off)
    augment_scale: float = 0.0  # random zoom by a factor in [1 - s, 1 + s] (0: off)
    # squeeze or stretch one axis by a factor in [1 / (1 + s), 1 + s] (0: off): uploads resized
    # to a square without keeping their aspect ratio
    augment_stretch: float = 0.0
    # share of the training images that go through an upload's round trips each epoch (other
    # exposure, resize filters, blur, JPEG: engine.learn.augment; 0: off)
    augment_upload: float = 0.0
    # Knowledge distillation: weight of a clear CNN teacher's soft labels in the loss (0: off).
    distill: float = 0.0
    distill_temperature: float = 4.0
    teacher_epochs: int = 30
    # Noise-aware training: uniform noise of up to this many rounding steps (the accumulator's
    # range / 2**rounding_threshold_bits) added to each hidden pre-activation during training,
    # the circuit's approximate-rounding and lookup error (0: off).
    rounding_noise: float = 0.0
    # Random real-upload versions made of each labelled image (engine.learn.augment.real_upload);
    # each epoch trains on one of them or the image as uploaded.
    image_copies: int = 8
    # With pruning (ModelConfig.max_active_inputs): the share of the epochs trained dense before
    # each neuron keeps its strongest inputs and fine-tunes under the mask (0: after one epoch).
    prune_after: float = 0.0
    # Prune gradually over this many epochs from then on (each neuron's inputs cut on a cubic
    # schedule down to max_active_inputs, the weights learning between cuts); 0 or 1: in one step.
    prune_epochs: int = 0
    # Train this many runs (seeds seed, seed + 1, ...) and keep the best on validation (1: one run).
    seeds: int = 1
    # With labelled images: the held-out part validates in every upload framing (as given, centre
    # crops, natural aspect ratio, squeezed: engine.learn.augment.UPLOAD_FRAMINGS), not as given only.
    select_framed: bool = False
    # Binary tasks: after training, shift the decision (the output layer's bias) to the offset that
    # maximizes the mean balanced accuracy over MedMNIST's validation split and the held-out images
    # in each framing (engine.learn.train.balance_decision). A class-weighted loss balances the
    # errors on the training mix, which is not the mix an upload comes in.
    balance_decision: bool = False

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        if self.prune_epochs < 0:
            raise ValueError(f"prune_epochs must be 0 or more, got {self.prune_epochs}")

    @property
    def augments(self) -> bool:
        return bool(self.augment_shift or self.augment_rotate or self.augment_scale or self.augment_stretch
                    or self.augment_upload)


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CompileConfig:
    rounding_threshold_bits: int = 6
    rounding_method: str = "approximate"  # "approximate" adds no lookups; "exact" does
    p_error: float = 0.01
    inputset_size: int = 512
    # Images per encrypted call. A circuit for B images has the same key parameters as the
    # 1-image circuit, so one key set serves both; a batch pays the per-call cost (key
    # preparation in Concrete's runtime) once for B images. Batch 1 is the interactive circuit.
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not self.rounding_threshold_bits or self.rounding_threshold_bits < 2:
            raise ValueError(
                "rounding_threshold_bits must be >= 2: compiling without rounding makes key "
                "generation take minutes and gigabytes"
            )
        if self.rounding_method not in ("approximate", "exact"):
            raise ValueError("rounding_method must be 'approximate' or 'exact'")
        if not 0 < self.p_error < 1:
            raise ValueError("p_error must be in (0, 1)")
        if not 1 <= self.batch_size <= self.inputset_size:
            raise ValueError("batch_size must be between 1 and inputset_size")

    @classmethod
    def settings(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` as a complete settings dict: fields a writer did not know yet (a cache
        entry or a service from before ``batch_size``) take their defaults, so two
        descriptions of one circuit compare equal."""
        return dataclasses.asdict(_build(cls, values))


@dataclass(frozen=True)
class ServiceConfig:
    """What ``python -m engine serve`` runs with (the HTTP service and its in-process twin)."""

    models_dir: str = ""  # empty: default_models_dir()
    cache_dir: str = ""  # empty: default_cache_dir()
    key_store_bytes: int = 4 * 2**30  # key sets in memory, deserialized and prepared
    # Every key set also stays serialized (engine.serve.keyvault) in key_dir (kept across
    # restarts) or, if empty, a temporary folder, bounded by key_disk_bytes: a key set that
    # leaves memory is reloaded from there, and the client uploads it again only once it is gone.
    key_dir: str = ""
    key_disk_bytes: int = 16 * 2**30
    key_ttl_s: float = 0.0  # idle time-to-live of a key set in memory (0: none)
    key_grace_s: float = 0.0  # a new key set is not evicted before its first use within this time
    key_linger_s: float = 0.3  # a key set used this recently stays in memory (its client's next request comes)
    key_wait_s: float = 30.0  # an upload or a reload waits this long for room in memory, then 429
    # FHE runs in flight; 0: one per core. A run alone spreads over every core; runs side by
    # side use one core each (engine.serve.workpool), so the CPU is never oversubscribed.
    workers: int = 0
    max_queue: int = 64  # runs waiting, over all clients; past it: 429
    backend: str = "local"  # or "dask"
    scheduler: str = ""  # dask scheduler address for backend "dask"
    # TLS to the Dask cluster (tls://HOST:PORT): the CA, and this service's certificate and key
    # (PEM). Empty: Dask's own configuration (distributed.comm.tls.*) applies.
    dask_tls_ca: str = ""
    dask_tls_cert: str = ""
    dask_tls_key: str = ""
    # > 1: also host each model's circuit for this many images per call, as its own circuit id
    # that runs with the keys registered for the 1-image circuit (the key parameters are equal)
    batch_size: int = 1
    # datasets whose circuits are hosted first, in this order (comma-separated; the others follow):
    # a client of one of them is answered while the others still load
    first: str = ""

    def __post_init__(self) -> None:
        if self.backend not in ("local", "dask"):
            raise ValueError(f"Unknown backend '{self.backend}': use local or dask")
        if self.backend == "dask" and not self.scheduler:
            raise ValueError("--backend dask needs --scheduler tcp://HOST:PORT")
        if self.key_store_bytes <= 0 or self.key_disk_bytes <= 0 or self.workers < 0 or self.max_queue < 1:
            raise ValueError("key-store bytes and queue size must be positive, workers 0 (one per core) or more")
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if self.batch_size > 1 and self.backend == "dask":
            raise ValueError("batched circuits are served by the local backend only")
        tls = (self.dask_tls_ca, self.dask_tls_cert, self.dask_tls_key)
        if any(tls) and not all(tls):
            raise ValueError("--dask-tls-ca, --dask-tls-cert and --dask-tls-key go together")


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PipelineConfig":
        model = dict(d.get("model", {}))
        if "hidden" in model:
            model["hidden"] = tuple(int(h) for h in model["hidden"])
        return cls(
            data=_build(DataConfig, d.get("data", {})),
            model=_build(ModelConfig, model),
            train=_build(TrainConfig, d.get("train", {})),
            compile=_build(CompileConfig, d.get("compile", {})),
        )

    def replace(self, **parts: Any) -> "PipelineConfig":
        """Copy with some parts replaced, e.g. ``cfg.replace(compile=CompileConfig(...))``."""
        return dataclasses.replace(self, **parts)


def _build(cls: type, values: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
