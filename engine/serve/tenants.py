"""Who calls the service: bearer tokens, per-tenant quotas, key ownership and the audit trail.

The tokens file (JSON) holds, per tenant, a name, the SHA-256 of its token (never the token),
and optional limits (``max_key_sets``, ``rps``); ``python -m engine token --tokens FILE NAME``
adds one and prints the token once. A key set belongs to the tenant that uploaded it (the
service's key folder records whose it is, across restarts): another tenant's requests with its
id get 404, as if it did not exist. Requests per second are a token
bucket per tenant. The audit log is one JSON line per request (Python's rotating file handler),
with no payload, key or token in it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ANONYMOUS = "-"  # the tenant of a service without tokens


class TokenError(ValueError):
    """The tokens file is missing, unreadable or names a tenant twice."""


@dataclass
class Tenant:
    name: str
    max_key_sets: int = 0  # 0: the service's default
    rps: float = 0.0  # requests per second; 0: the service's default


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_tokens(path: Path) -> dict[str, Tenant]:
    """token hash -> tenant."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["tokens"]
    except FileNotFoundError:
        raise TokenError(f"{path} does not exist: create tokens with `python -m engine token --tokens {path} NAME`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"{path} is not a tokens file ({type(exc).__name__})") from None
    out: dict[str, Tenant] = {}
    names = set()
    for row in rows:
        if row["name"] in names:
            raise TokenError(f"{path} names tenant '{row['name']}' twice")
        names.add(row["name"])
        out[row["sha256"]] = Tenant(row["name"], int(row.get("max_key_sets", 0)), float(row.get("rps", 0.0)))
    return out


def add_token(path: Path, name: str, max_key_sets: int = 0, rps: float = 0.0) -> str:
    """A new random token for ``name`` (its hash stored in ``path``, written atomically)."""
    path = Path(path)
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise TokenError("a tenant name takes letters, digits, '-', '_' and '.'")
    rows = json.loads(path.read_text())["tokens"] if path.exists() else []
    if any(r["name"] == name for r in rows):
        raise TokenError(f"{path} already has a token for '{name}'")
    token = secrets.token_urlsafe(32)
    rows.append({"name": name, "sha256": token_hash(token), "max_key_sets": max_key_sets, "rps": rps,
                 "created": int(time.time())})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump({"tokens": rows}, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return token


@dataclass
class _Bucket:
    rate: float
    level: float
    at: float = field(default_factory=time.monotonic)

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self.level = min(max(self.rate, 1.0), self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= 1:
            self.level -= 1
            return 0.0
        return (1 - self.level) / self.rate


class Tenants:
    """Authentication, quotas and key ownership for one service."""

    def __init__(self, tokens: dict[str, Tenant] | None, max_key_sets: int = 0, rps: float = 0.0):
        self.tokens = tokens  # None: no authentication (loopback or --insecure-open)
        self.max_key_sets, self.rps = max_key_sets, rps
        # where key sets are kept says whose they are (set by the app: the service's key folder)
        self.owner_of: Callable[[str], str | None] = lambda _key_id: None
        self.count_of: Callable[[str], int] = lambda _tenant: 0
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [ANONYMOUS] if self.tokens is None else sorted(t.name for t in self.tokens.values())

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an ``Authorization: Bearer`` header; None if it is missing or unknown."""
        if self.tokens is None:
            return Tenant(ANONYMOUS)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = token_hash(token.strip())
        for known, tenant in self.tokens.items():  # constant time per comparison
            if hmac.compare_digest(known, digest):
                return tenant
        return None

    def limit(self, tenant: Tenant) -> float:
        """0 if the tenant may make a request now, else the seconds to wait (its rate limit)."""
        rate = tenant.rps or self.rps
        if rate <= 0:
            return 0.0
        with self._lock:
            bucket = self._buckets.setdefault(tenant.name, _Bucket(rate, max(rate, 1.0)))
            return bucket.take()

    def key_sets(self, tenant: Tenant) -> int:
        """Key sets of the tenant the service still holds (in memory or in its key folder)."""
        return self.count_of(tenant.name)

    def may_add_key_set(self, tenant: Tenant) -> bool:
        cap = tenant.max_key_sets or self.max_key_sets
        return cap <= 0 or self.key_sets(tenant) < cap

    def owns(self, tenant: Tenant, key_id: str) -> bool:
        """Whether ``key_id`` is the tenant's (a key id nobody registered is nobody's)."""
        return self.owner_of(key_id) == tenant.name


def audit_logger(path: Path | None, max_bytes: int = 10 * 2**20, backups: int = 5) -> logging.Logger | None:
    """A logger writing one JSON line per call to ``path``, rotated by size (None: no audit)."""
    if path is None:
        return None
    log = logging.getLogger(f"engine.audit.{Path(path).resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log
