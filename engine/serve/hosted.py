"""A circuit the service hosts (:class:`HostedCircuit`): its compiled model, its server, its
warm-up material and the sizes its keys and inputs must have; compiling one apart from the
service process; checking an upload's body against it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import CompileConfig
from ..fhe.circuit import CompiledModel, compile_model
from ..fhe.runtime import FHEServer, WarmUp
from ..learn import registry
from .errors import BadRequest, TooLarge


@dataclass
class HostedCircuit:
    id: str
    dataset: str
    model: str
    model_hash: str
    compiled: CompiledModel
    server: FHEServer
    warm: WarmUp
    key_bytes: int  # serialized evaluation keys: always this size for this circuit
    ciphertext_bytes: int  # one serialized input
    footprint: int  # memory of one registered, prepared key set (measured at start-up)
    server_zip_digest: str = ""
    # the client's whole feature stage and the model's scaling of it (engine.learn.features.describe)
    feature_stage: dict = field(default_factory=dict)
    keys_from: str = ""  # a batched circuit: the 1-image circuit whose registered keys it runs with

    @property
    def key_owner(self) -> str:
        """Whose keys these are: a key id registered at either circuit of a pair serves both."""
        return self.keys_from or self.id

    @property
    def max_key_body(self) -> int:
        return self.key_bytes + 4096

    @property
    def max_ciphertext_body(self) -> int:
        return self.ciphertext_bytes + 4096

    @classmethod
    def build(cls, saved: registry.SavedModel, compiled: CompiledModel, say: Callable[[str], None],
              pair: "HostedCircuit | None" = None) -> "HostedCircuit":
        """``compiled`` made ready to serve: its server artifacts loaded, warm-up material made
        under a throwaway key, the memory of one key set measured (``pair``: the 1-image circuit
        whose key sets a batched twin runs with, and whose measurement it shares)."""
        import hashlib

        from ..fhe.footprint import key_set_footprint
        from ..fhe.runtime import warmup_material

        cid = compiled.report.cache_key
        warm = warmup_material(compiled, say=say)
        server = FHEServer(compiled.deployment_dir, library=warm.library)
        zip_digest = hashlib.sha256((compiled.deployment_dir / "server.zip").read_bytes()).hexdigest()
        if pair is not None:  # runs with the pair's key sets: no memory of its own to measure
            if warm.key_bytes != pair.key_bytes:
                raise ValueError(f"{cid}: its keys differ from those of {pair.id}")
            footprint = pair.footprint
        else:
            footprint = key_set_footprint(compiled, server)
        return cls(cid, saved.dataset, saved.name, saved.hash, compiled, server, warm, warm.key_bytes,
                   len(warm.ciphertext), footprint, zip_digest, feature_stage=saved.stage_description(),
                   keys_from=pair.id if pair else "")

    def describe(self) -> dict:
        r = self.compiled.report
        return {"id": self.id, "dataset": self.dataset, "model": self.model, "model_hash": self.model_hash,
                "compile": r.compile, "input_shape": r.input_shape, "max_bit_width": r.max_bit_width,
                "pbs_count": r.pbs_count, "evaluation_key_bytes": self.key_bytes,
                "ciphertext_bytes": self.ciphertext_bytes, "key_set_memory_bytes": self.footprint,
                # a client from before feature_stage reads the pooling and the levels alone
                "input_pool": self.feature_stage.get("input_pool", 1),
                "input_levels": self.feature_stage.get("input_levels", 0), "feature_stage": self.feature_stage,
                "batch_size": int(r.input_shape[0]), "keys_from": self.key_owner}


def compile_apart(saved: registry.SavedModel, cache_dir: Path, cc: CompileConfig) -> None:
    """Compile into the cache in a child process: compiling imports torch and concrete-ml, which
    the service process itself never needs (about 230 MB)."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=_compile_child,
                                           args=(str(saved.path), str(cache_dir), dataclasses.asdict(cc)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"compiling {saved.dataset}/{saved.name} failed (exit code {proc.exitcode})")


def _compile_child(model_path: str, cache_dir: str, settings: dict) -> None:
    compile_model(registry._read(Path(model_path)), CompileConfig(**settings), Path(cache_dir))




def check_body(body: bytes, size: int, limit: int, fits: Callable[[bytes], bool], what: str) -> None:
    """413 past ``limit``; 400 unless exactly ``size`` bytes with the circuit's structure."""
    if len(body) > limit:
        raise TooLarge(f"{what} for this circuit: {size:,} bytes; got {len(body):,}")
    if len(body) != size:
        raise BadRequest(f"{what} for this circuit: {size:,} bytes; got {len(body):,}")
    if not fits(body):
        raise BadRequest(f"malformed {what}: their structure or parameters are not this circuit's")
