"""The service for real tenants, on loopback with its own CA: tokens, TLS, key ownership, quotas,
the audit log, per-tenant metrics, offline API docs, and a fuzz run with tokens (real tiny circuit)."""

import json
import ssl
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from engine.config import ServiceConfig
from engine.serve.client import EncryptedClient, ServiceUnavailable
from engine.serve.transports import HTTPTransport
from engine.serve.hosting import Service
from engine.serve.tenants import Tenants, add_token, audit_logger, read_tokens
from test_service import free_port


class TLSService:
    """``engine.serve.api`` over HTTPS (a CA made here) with tokens, in a thread on a free port."""

    def __init__(self, folder, models_dir, cache_dir):
        import uvicorn

        from engine.serve.api import create_app

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file, certfile, keyfile = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.verify = ssl.create_default_context(cafile=str(self.ca_file))
        cert.cert_chain_pems[0].write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))
        tokens = folder / "tokens.json"
        self.tokens = {"alice": add_token(tokens, "alice", max_key_sets=1), "bob": add_token(tokens, "bob"),
                       "carol": add_token(tokens, "carol", rps=1.0)}
        self.audit_path = folder / "audit.log"
        self.service = Service(ServiceConfig(models_dir=str(models_dir), cache_dir=str(cache_dir), key_grace_s=0.0))
        app = create_app(self.service, tenants=Tenants(read_tokens(tokens)), audit=audit_logger(self.audit_path))
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", verify=self.verify, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service did not become healthy")

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(verify=self.verify, timeout=120,
                            headers={"Authorization": f"Bearer {token}"} if token else None)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()


@pytest.fixture(scope="module")
def tls(tiny_saved, models_dir, cache_dir, tmp_path_factory):
    s = TLSService(tmp_path_factory.mktemp("tls"), models_dir, cache_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cid(tls, tiny_saved):
    listed = tls.http(tls.tokens["bob"]).get(f"{tls.url}/circuits").json()
    return next(c for c in listed if c["model_hash"] == tiny_saved.hash)["id"]


def test_tokens_tls_ownership_quotas_audit_and_docs(tls, cid, predictor, test_split, tmp_path):
    anonymous, stranger = tls.http(), tls.http("not-a-token")
    assert anonymous.get(f"{tls.url}/health").status_code == 200  # open routes
    assert anonymous.get(f"{tls.url}/metrics").status_code == 200
    for client in (anonymous, stranger):  # every other route needs a known token
        for method, path in (("GET", "/circuits"), ("GET", f"/circuits/{cid}/client.zip"), ("POST", f"/circuits/{cid}/keys"),
                             ("POST", f"/circuits/{cid}/predict"), ("DELETE", f"/circuits/{cid}/keys/x"),
                             ("GET", "/docs"), ("GET", "/openapi.json")):
            r = client.request(method, f"{tls.url}{path}", content=b"x" if method == "POST" else None)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
    # TLS: plain HTTP on the TLS port fails, and so does HTTPS without the CA
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls.port}/health", timeout=5)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{tls.url}/health", timeout=5)

    # alice predicts through the client API (token and CA), bob cannot use her key set
    feats = predictor.features(test_split.images[:2])
    alice = EncryptedClient.download(HTTPTransport(tls.url, token=tls.tokens["alice"], ca_file=str(tls.ca_file)),
                                     cid, tmp_path / "alice")
    logits, _ = alice.predict(feats[:1])
    assert np.argmax(logits) == np.argmax(predictor.ensure_compiled().run_clear(feats[:1]))
    key_id = alice.key_ids[tls.url]
    bob = tls.http(tls.tokens["bob"])
    ct = alice.fhe.encrypt(feats[:1])
    r = bob.post(f"{tls.url}/circuits/{cid}/predict", content=ct, headers={"x-key-id": key_id})
    assert r.status_code == 404 and "error" in r.json()
    assert bob.delete(f"{tls.url}/circuits/{cid}/keys/{key_id}").status_code == 404
    assert alice.predict(feats[1:2])[0].shape == (1, 2)  # still hers, still there
    # alice may hold one key set: a second upload is refused with Retry-After
    r = tls.http(tls.tokens["alice"]).post(f"{tls.url}/circuits/{cid}/keys", content=alice.fhe.evaluation_keys())
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "limit" in r.json()["error"]
    # carol may make one request per second
    carol = tls.http(tls.tokens["carol"])
    codes = [carol.get(f"{tls.url}/circuits").status_code for _ in range(3)]
    assert codes[0] == 200 and 429 in codes
    # a client without the token is told what to do
    with pytest.raises(ServiceUnavailable, match="wants a token"):
        HTTPTransport(tls.url, token="wrong", ca_file=str(tls.ca_file)).circuits()

    # offline API docs: the schema, and a page that loads nothing from elsewhere
    schema = bob.get(f"{tls.url}/openapi.json").json()
    assert "/circuits/{cid}/predict" in schema["paths"]
    page = bob.get(f"{tls.url}/docs").text
    assert "/circuits/{cid}/predict" in page and "Bearer token" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page

    # per-tenant metrics, with bounded label values
    text = anonymous.get(f"{tls.url}/metrics").text
    tenants_seen = {line.split('tenant="')[1].split('"')[0] for line in text.splitlines()
                    if line.startswith("engine_tenant_requests_total{")}
    assert {"alice", "bob", "unauthenticated"} <= tenants_seen <= {"alice", "bob", "carol", "unauthenticated"}

    # the audit trail: one JSON line per request, no token, key or payload
    lines = tls.audit_path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {"time", "tenant", "route", "circuit", "status", "bytes_in", "bytes_out", "queue_s", "server_s"} <= set(rows[-1])
    runs = [r for r in rows if r["route"] == "/circuits/{cid}/predict" and r["tenant"] == "alice" and r["status"] == 200]
    assert len(runs) == 2 and all(r["server_s"] > 0 and r["bytes_in"] == len(ct) for r in runs)
    assert any(r["tenant"] == "bob" and r["status"] == 404 for r in rows)
    text = tls.audit_path.read_text()
    assert all(tok not in text for tok in tls.tokens.values()) and key_id not in text and "Bearer" not in text


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_with_tokens_never_5xx(tls, cid, data):
    token = data.draw(st.sampled_from([None, "", "nope", tls.tokens["bob"], tls.tokens["bob"] + "x"]))
    scheme = data.draw(st.sampled_from(["Bearer", "bearer", "Basic", ""]))
    target = data.draw(st.sampled_from(["keys", "predict", "keys/abc", "../circuits"]))
    method = "DELETE" if target == "keys/abc" else ("GET" if target == "../circuits" else "POST")
    headers = {"content-type": "application/octet-stream", "x-key-id": data.draw(st.sampled_from(["", "k" * 32]))}
    if token is not None:
        headers["authorization"] = f"{scheme} {token}".strip()
    body = data.draw(st.binary(max_size=2048)) if method == "POST" else None
    r = httpx.request(method, f"{tls.url}/circuits/{cid}/{target}", content=body, headers=headers,
                      verify=tls.verify, timeout=60)
    assert r.status_code < 500, r.text


def test_token_command_and_serve_refuses_an_open_port(tmp_path):
    tokens = tmp_path / "tokens.json"

    def engine(*args):
        return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True, text=True, timeout=120)

    p = engine("token", "--tokens", str(tokens), "alice", "--rps", "5")
    assert p.returncode == 0, p.stderr
    token = p.stdout.splitlines()[-1]
    stored = json.loads(tokens.read_text())["tokens"]
    assert len(token) >= 40 and token not in tokens.read_text() and stored[0]["name"] == "alice" and stored[0]["rps"] == 5
    assert read_tokens(tokens)[stored[0]["sha256"]].name == "alice"
    again = engine("token", "--tokens", str(tokens), "alice")
    assert again.returncode == 2 and "already has a token for 'alice'" in again.stderr
    refused = engine("serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 2
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        line for line in refused.stderr.splitlines() if "without --tokens" in line]
