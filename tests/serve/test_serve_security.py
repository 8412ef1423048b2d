"""TLS, mutual TLS and a bearer token; a server reachable from other machines is refused without one of them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from moeflow.serve.client import MoeflowClient
from moeflow.serve.config import ServerConfig
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
    assert main(["serve", "--host", host, "--port", "0"]) == 2  # refused before the model loads
    with pytest.raises(MoeflowError, match="the HTTP API has neither TLS nor a token check"):
        ServerConfig(host=host, token_file=pki / "token", http_port=0)
    ServerConfig(host=host, insecure=True, http_port=0)
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
