"""TLS, mutual TLS and a bearer token, over gRPC and over the HTTP API; a server reachable from other machines is
refused without one of them."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import openai
import pytest
from moeflow.serve.client import MoeflowClient
from moeflow.serve.config import ServerConfig
from moeflow.serve.http import start_http
from test_serve import serving  # a server on a free loopback port over a fresh engine at 25%

from moeflow.cli import main
from moeflow.errors import MoeflowError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the certificates are made with openssl")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints: dict) -> Path:
    return tiny_checkpoints["mixtral"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by that CA; a token file."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=moeflow test CA")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=moeflow test {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    (d / "token").write_text("s3cret-token\n")
    return d


def _refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def test_tls_and_mutual_tls(checkpoint, pki):
    with serving(checkpoint, tls_cert=pki / "server.pem", tls_key=pki / "server.key") as running:
        with MoeflowClient(running.address, timeout=30, tls_ca=pki / "ca.pem") as c:
            assert c.health() == "SERVING" and len(c.generate("abc", max_new_tokens=3).token_ids) == 3
        with MoeflowClient(running.address, timeout=5) as plain:
            assert _refused(plain.health).code() == grpc.StatusCode.UNAVAILABLE
    mutual = dict(tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem")
    with serving(checkpoint, **mutual) as running:
        with MoeflowClient(running.address, timeout=5, tls_ca=pki / "ca.pem") as anonymous:
            assert _refused(anonymous.health).code() == grpc.StatusCode.UNAVAILABLE
        client_cert = dict(tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem", tls_key=pki / "client.key")
        with MoeflowClient(running.address, timeout=30, **client_cert) as c:
            assert len(c.generate("abc", max_new_tokens=3).token_ids) == 3


def test_bearer_token(checkpoint, pki):
    with serving(checkpoint, token_file=pki / "token") as running:
        for token in (None, "wrong", "S3CRET-TOKEN", "s3cret-toke"):
            with MoeflowClient(running.address, timeout=30, token=token) as c:
                for call in (lambda: c.generate("abc", max_new_tokens=2), c.stats, lambda: list(c.stream("abc"))):
                    e = _refused(call)
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in e.details()
                assert c.health() == "SERVING", "health checks need no token"
        with MoeflowClient(running.address, timeout=30, token="s3cret-token") as c:
            assert len(c.generate("abc", max_new_tokens=3).token_ids) == 3
            assert c.stats()["requests_completed"] == 1


def test_cli_client_with_tls_and_token(checkpoint, pki, capsys):
    with serving(checkpoint, tls_cert=pki / "server.pem", tls_key=pki / "server.key", token_file=pki / "token") as r:
        args = ["client", "--port", str(r.port), "--prompt", "abc", "--max-new-tokens", "3", "--json"]
        assert main([*args, "--tls-ca", str(pki / "ca.pem"), "--token-file", str(pki / "token")]) == 0
        replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert sum(len(r["token_ids"]) for r in replies) == 3
        assert main([*args, "--tls-ca", str(pki / "ca.pem")]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.org"])
def test_a_bind_other_machines_reach_needs_tls_a_token_or_insecure(pki, host, capsys):
    with pytest.raises(MoeflowError, match="give --tls-cert and --tls-key, and/or --token-file, or --insecure"):
        ServerConfig(host=host)
    ServerConfig(host=host, insecure=True)
    ServerConfig(host=host, token_file=pki / "token")
    ServerConfig(host=host, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    assert main(["serve", "--host", host, "--port", "0", "--http-port", "0"]) == 2  # refused before the model loads
    ServerConfig(host=host, token_file=pki / "token", http_port=0)  # HTTP checks the same token and serves the TLS
    assert f"--host {host} is reachable from other machines" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_need_nothing(host):
    ServerConfig(host=host)


def test_security_settings_are_checked(pki, tmp_path):
    with pytest.raises(MoeflowError, match="needs both --tls-cert and --tls-key"):
        ServerConfig(tls_cert=pki / "server.pem")
    with pytest.raises(MoeflowError, match="--tls-client-ca .* needs --tls-cert"):
        ServerConfig(tls_client_ca=pki / "ca.pem")
    with pytest.raises(MoeflowError, match="no such file"):
        ServerConfig(token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MoeflowError, match="is empty"):
        ServerConfig(token_file=tmp_path / "empty").token()


@contextmanager
def http_serving(checkpoint: Path, **config: object):
    """The HTTP API (and gRPC) on free loopback ports with these security settings."""
    with serving(checkpoint, **config) as running:
        http = start_http(running.worker, ServerConfig(port=0, http_port=0, **config), model_name="m")
        try:
            yield http
        finally:
            http.shutdown()


def _http(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """GET `url` (a completion POST for /v1/completions); the status and JSON body, errors included."""
    body = json.dumps({"prompt": "abc", "max_tokens": 3}).encode() if url.endswith("/completions") else None
    headers = {"Content-Type": "application/json"} | ({} if token is None else {"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60,
                                    context=context) as r:  # fmt: skip
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_bearer_token(checkpoint, pki):
    with http_serving(checkpoint, token_file=pki / "token") as http:
        for token in (None, "wrong", "S3CRET-TOKEN", "s3cret-toke"):
            for route in ("/v1/completions", "/v1/models", "/metrics"):
                status, body = _http(http.url + route, token=token)
                assert status == 401 and "Authorization: Bearer" in body["error"]["message"], route
            assert _http(http.url + "/health", token=token) == (200, {"status": "ok"}), "health needs no token"
        status, body = _http(http.url + "/v1/completions", token="s3cret-token")
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="s3cret-token", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == "m"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{http.url}/v1", api_key="wrong", max_retries=0, timeout=60).models.list()


def test_http_tls_and_mutual_tls(checkpoint, pki):
    trusting = ssl.create_default_context(cafile=pki / "ca.pem")
    with http_serving(checkpoint, tls_cert=pki / "server.pem", tls_key=pki / "server.key") as http:
        assert http.url.startswith("https://")
        status, body = _http(http.url + "/v1/completions", context=trusting)
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _http(http.url + "/health")  # the system's CAs do not know this server
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            _http(http.url.replace("https://", "http://") + "/health")  # plain HTTP to a TLS port
    mutual = dict(tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem")
    with http_serving(checkpoint, **mutual) as http:
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _http(http.url + "/health", context=trusting)  # no client certificate
        trusting.load_cert_chain(pki / "client.pem", pki / "client.key")
        status, body = _http(http.url + "/v1/completions", context=trusting)
        assert status == 200 and body["usage"]["completion_tokens"] == 3
