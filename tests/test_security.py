"""Transport security and hostile bytes, end to end on the fake model: TLS, mutual TLS, certificate rotation,
bearer tokens, where and how /metrics is served, and malformed requests on every RPC.

Certificates are generated here (trustme): a CA, a server certificate for 127.0.0.1 and localhost, a client
certificate from the same CA, and an unrelated CA whose certificates must be refused.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from recserve.client import Client, Unauthenticated, Unavailable
from recserve.server import command
from recserve.server.app import serve
from recserve.server.metrics import Name, total
from recserve.server.security import SecurityError
from recserve.server.settings import ServerSettings
from recserve.v1 import inference_pb2 as pb
from tests.support.fake_model import fake_model
from tests.support.serving import ServerThread, serving, settings_for

FAKE = Path("fake")
NO_METRICS = {"metrics": False}
TOKEN = "s3cret-token"
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Pki:
    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    other_ca: trustme.CA
    other_server: trustme.LeafCert
    other_client: trustme.LeafCert

    def roots(self, ca: trustme.CA | None = None) -> bytes:
        return (ca or self.ca).cert_pem.bytes()


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    return Pki(
        ca=ca,
        server=ca.issue_cert("127.0.0.1", "localhost"),
        client=ca.issue_cert("client.example"),
        other_ca=other,
        other_server=other.issue_cert("127.0.0.1", "localhost"),
        other_client=other.issue_cert("client.example"),
    )


def _replace(path: Path, data: bytes) -> None:
    # As cert-manager and the kubelet do: a new file renamed over the old one.
    staging = path.with_suffix(path.suffix + ".new")
    staging.write_bytes(data)
    os.replace(staging, path)


def write_pair(directory: Path, cert: trustme.LeafCert) -> dict[str, Path]:
    """`cert` and its key as PEM files in `directory`; the settings that serve them."""
    chain, key = directory / "tls.crt", directory / "tls.key"
    _replace(chain, b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    _replace(key, cert.private_key_pem.bytes())
    return {"tls_cert_file": chain, "tls_key_file": key}


def client_pair(cert: trustme.LeafCert) -> dict[str, bytes]:
    return {
        "certificate_chain": b"".join(blob.bytes() for blob in cert.cert_chain_pems),
        "private_key": cert.private_key_pem.bytes(),
    }


def assert_refused(client: Client) -> None:
    """The TLS handshake fails, so the call never reaches the server."""
    with client, pytest.raises(Unavailable):
        client.health("")


def health_status(channel: grpc.Channel, timeout: float = 5.0) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status)


# --- TLS and mutual TLS ------------------------------------------------------------------------------------


def test_tls_serves_calls_and_refuses_plaintext_and_unknown_servers(tmp_path: Path, pki: Pki) -> None:
    model = fake_model()
    with serving(FAKE, model, **write_pair(tmp_path, pki.server), **NO_METRICS) as server:
        with Client(server.address, root_certificates=pki.roots(), deadline=5) as client:
            np.testing.assert_allclose(
                client.embed(["a red shoe"]), model.expected(["a red shoe"]), atol=1e-6
            )
            assert client.health("") == "SERVING"
        # The name on the certificate is localhost: a client that dials an IP can check that name instead.
        with Client(
            server.address, root_certificates=pki.roots(), server_name="localhost", deadline=5
        ) as client:
            assert client.info().model_name == "fake-embedding"
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as plain:
            health_status(channel)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not accept this server.
        assert_refused(Client(server.address, root_certificates=pki.roots(pki.other_ca), deadline=5))


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca(
    tmp_path: Path, pki: Pki
) -> None:
    files = write_pair(tmp_path, pki.server)
    ca_file = tmp_path / "client-ca.pem"
    ca_file.write_bytes(pki.roots())
    with serving(FAKE, fake_model(), **files, tls_client_ca_file=ca_file, **NO_METRICS) as server:
        with Client(
            server.address, root_certificates=pki.roots(), **client_pair(pki.client), deadline=5
        ) as c:
            assert c.embed(["a text"]).shape == (1, 8)
        assert_refused(Client(server.address, root_certificates=pki.roots(), deadline=5))
        wrong_ca = Client(
            server.address, root_certificates=pki.roots(), **client_pair(pki.other_client), deadline=5
        )
        assert_refused(wrong_ca)


def test_a_rotated_certificate_is_served_to_new_connections(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_pair(tmp_path, pki.server)
    with serving(FAKE, fake_model(), **files, **NO_METRICS) as server:
        # Its own subchannel pool: the new clients below must not borrow this connection.
        kept = grpc.secure_channel(
            server.address,
            grpc.ssl_channel_credentials(pki.roots()),
            options=[("grpc.use_local_subchannel_pool", 1)],
        )
        assert health_status(kept) == SERVING

        # Half a rotation (a new certificate beside the old key) is never served: the old pair stays.
        _replace(files["tls_cert_file"], b"".join(b.bytes() for b in pki.other_server.cert_chain_pems))
        with (
            caplog.at_level(logging.WARNING, logger="recserve.server.security"),
            Client(server.address, root_certificates=pki.roots(), deadline=5) as client,
        ):
            assert client.health("") == "SERVING"
        assert any("cannot be used" in r.getMessage() for r in caplog.records)

        write_pair(tmp_path, pki.other_server)
        with Client(server.address, root_certificates=pki.roots(pki.other_ca), deadline=5) as client:
            assert client.health("") == "SERVING"
        assert_refused(Client(server.address, root_certificates=pki.roots(), deadline=5))
        # A connection made before the rotation goes on with the certificate it was made with.
        with kept:
            assert health_status(kept) == SERVING


def test_unusable_tls_settings_are_one_line_errors(tmp_path: Path, pki: Pki) -> None:
    files = write_pair(tmp_path, pki.server)
    with pytest.raises(ValidationError, match="set both --tls-cert-file and --tls-key-file"):
        settings_for(FAKE, tls_cert_file=files["tls_cert_file"])
    with pytest.raises(ValidationError, match="needs --tls-cert-file"):
        settings_for(FAKE, tls_client_ca_file=files["tls_cert_file"])
    with pytest.raises(ValidationError, match="not both"):
        settings_for(FAKE, auth_token=TOKEN, auth_token_file=files["tls_key_file"])

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other_key = tmp_path / "other.key"
    other_key.write_bytes(pki.other_server.private_key_pem.bytes())
    for cert, key, flag in (
        (garbage, files["tls_key_file"], "--tls-cert-file"),
        (files["tls_cert_file"], other_key, "--tls-key-file"),  # a key that is not the certificate's
        (files["tls_cert_file"], tmp_path / "missing.key", "cannot read"),
    ):
        # The files are checked before the model loads: the repository "fake" is never opened.
        settings = settings_for(FAKE, tls_cert_file=cert, tls_key_file=key)
        with pytest.raises(SecurityError, match=flag) as caught:
            asyncio.run(serve(settings))
        assert "\n" not in str(caught.value)
    settings = settings_for(FAKE, **files, tls_client_ca_file=garbage)
    with pytest.raises(SecurityError, match="--tls-client-ca-file"):
        asyncio.run(serve(settings))


# --- bearer token ------------------------------------------------------------------------------------------


def test_a_missing_or_wrong_token_is_unauthenticated_and_health_stays_open() -> None:
    with serving(FAKE, fake_model(), auth_token=TOKEN) as server:
        with server.channel() as channel:
            assert health_status(channel) == SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for a in answers for s in a.list_services_response.service}
            assert "recserve.v1.Inference" in names
            stub = server.stub()
            for metadata, detail in (
                ((), "this server needs a token: send the metadata `authorization: Bearer <token>`"),
                ((("authorization", "Bearer nope"),), "the bearer token is wrong"),
                ((("authorization", TOKEN),), "needs a token"),  # no scheme: not a bearer token
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Embed(pb.EmbedRequest(texts=["a"]), metadata=metadata, timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert detail in (caught.value.details() or "")
        with Client(server.address, token="nope", deadline=5) as client, pytest.raises(Unauthenticated):
            client.info()
        with Client(server.address, token=TOKEN, deadline=5) as client:
            assert client.embed(["a", "b"]).shape == (2, 8)
        sample = server.registry.get_sample_value
        # A refused token: the request was never parsed, so no model is named.
        assert sample(total(Name.REQUESTS), {"model": "", "rpc": "Embed", "code": "UNAUTHENTICATED"}) == 3
        assert sample(total(Name.REQUESTS), {"model": "", "rpc": "Info", "code": "UNAUTHENTICATED"}) == 1
        assert sample(total(Name.FAILURES), {"model": "", "reason": "unauthenticated"}) == 4
        assert sample(total(Name.REQUESTS), {"model": "fake", "rpc": "Embed", "code": "OK"}) == 1


def test_a_token_file_is_reread_on_sighup(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with serving(FAKE, fake_model(), auth_token_file=token_file, **NO_METRICS) as server:
        with Client(server.address, token=TOKEN, deadline=5) as client:
            assert client.info().model_name == "fake-embedding"
        _replace(token_file, b"the-next-token\n")
        assert server.server is not None and server.server.security is not None
        server.server.security.reload()  # what SIGHUP does
        with Client(server.address, token="the-next-token", deadline=5) as client:
            assert client.info().model_name == "fake-embedding"
        with Client(server.address, token=TOKEN, deadline=5) as client, pytest.raises(Unauthenticated):
            client.info()


# --- the metrics endpoint ---------------------------------------------------------------------------------


def test_metrics_bind_loopback_by_default_and_can_be_turned_off() -> None:
    with serving(FAKE, fake_model(), host="0.0.0.0") as server:
        assert server.server is not None and server.server.metrics_server is not None
        assert server.server.metrics_server.address[0] == "127.0.0.1"
    parser = argparse.ArgumentParser()
    command.configure(parser)
    args = parser.parse_args(["--model-repo", "fake", "--no-metrics", "--metrics-host", "0.0.0.0"])
    settings = ServerSettings(**{k: v for k, v in vars(args).items() if k in ServerSettings.model_fields})
    assert settings.metrics is False and settings.metrics_host == "0.0.0.0"
    with serving(FAKE, fake_model(), metrics=False) as server:
        assert server.server is not None
        assert server.server.metrics_server is None and server.server.metrics_port is None


def test_metrics_answer_without_a_thread_per_connection_and_stop_at_once() -> None:
    server = ServerThread(settings_for(FAKE), fake_model()).start()
    try:
        with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            families = {f.name for f in text_string_to_metric_families(response.read().decode())}
        assert Name.REQUESTS in families
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(server.metrics_url.replace("/metrics", "/other"), timeout=5)
        assert missing.value.code == 404

        assert server.server is not None
        address = ("127.0.0.1", server.server.metrics_port)
        threads = threading.active_count()
        idle = [socket.create_connection(address, timeout=5) for _ in range(50)]
        for sock in idle[:25]:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        # Keep-alive: two requests on one connection, as Prometheus does.
        with socket.create_connection(address, timeout=5) as sock:
            for _ in range(2):
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(64).startswith(b"HTTP/1.1 200 OK")
                drain(sock)
        assert threading.active_count() <= threads + 1
    finally:
        started = time.monotonic()
        server.stop()
        stopped = time.monotonic() - started
    # The endpoint closed its idle connections on the way out, instead of waiting for them.
    assert all(sock.recv(1) == b"" for sock in idle)
    for sock in idle:
        sock.close()
    assert stopped < 2.0


def drain(sock: socket.socket) -> None:
    """Reads the rest of one response (its Content-Length is small enough to arrive within a moment)."""
    sock.settimeout(0.2)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pass
    finally:
        sock.settimeout(5)


# --- malformed bytes ---------------------------------------------------------------------------------------

# (rpc, bytes, what the details must say): the message type, then protobuf's reason.
MALFORMED = [
    ("Embed", b"\xff\xff\xff", "recserve.v1.EmbedRequest: Wire format was corrupt"),
    ("Embed", b"\x0a\x02\xff\xfe", "recserve.v1.EmbedRequest: String field had bad UTF-8"),  # texts[0]
    ("Score", b"\xff\xff\xff", "recserve.v1.ScoreRequest: Wire format was corrupt"),
    ("Score", b"\x1a\x02\xff\xfe", "recserve.v1.ScoreRequest: String field had bad UTF-8"),  # candidates[0]
    ("Score", b"\x0a\x01\xc3", "recserve.v1.ScoreRequest: String field had bad UTF-8"),  # query_text, cut
    ("Info", b"\xff\xff\xff", "recserve.v1.InfoRequest: Wire format was corrupt"),
]


@pytest.fixture(scope="module")
def plain() -> Iterator[ServerThread]:
    with serving(FAKE, fake_model()) as server:
        yield server


def test_malformed_bytes_on_every_rpc_are_invalid_argument_counted_and_logged_once(
    plain: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    server = plain
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.INFO):
        for rpc, payload, detail in MALFORMED:
            raw = channel.unary_unary(f"/recserve.v1.Inference/{rpc}")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as caught:
                raw(payload, timeout=5, metadata=(("x-request-id", f"fuzz-{rpc}"),))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, payload)
            assert caught.value.details() == f"the request is not a valid {detail}"
        # The server goes on serving, on the same connection.
        reply = pb.EmbedResponse.FromString(
            channel.unary_unary("/recserve.v1.Inference/Embed")(
                pb.EmbedRequest(texts=["still here"]).SerializeToString(), timeout=5
            )
        )
        assert reply.dimension == 8
    refusals = [r for r in caplog.records if r.getMessage() == "call refused"]
    assert len(refusals) == len(MALFORMED)
    assert {getattr(r, "request_id", None) for r in refusals} == {"fuzz-Embed", "fuzz-Score", "fuzz-Info"}
    assert not [r for r in caplog.records if r.exc_info], "a malformed request logged a traceback"
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        samples = [s for f in text_string_to_metric_families(response.read().decode()) for s in f.samples]

    def count(name: str, **labels: str) -> float:
        # Bytes that did not parse named no model: the label is empty.
        want = {"model": "", **labels}
        return sum(s.value for s in samples if s.name == name and s.labels == want)

    requests = total(Name.REQUESTS)
    assert count(requests, rpc="Embed", code="INVALID_ARGUMENT") == 2
    assert count(requests, rpc="Score", code="INVALID_ARGUMENT") == 3
    assert count(requests, rpc="Info", code="INVALID_ARGUMENT") == 1
    assert count(total(Name.FAILURES), reason="invalid") == len(MALFORMED)
    assert count(requests, rpc="Embed", code="OK", model="fake") == 1


# --- the harness -------------------------------------------------------------------------------------------


def test_the_harness_reaches_a_target_with_mutual_tls_and_a_token(tmp_path: Path, pki: Pki) -> None:
    from recserve.benchmarks import command as bench_command
    from recserve.benchmarks.config import ConfigError
    from recserve.benchmarks.flags import run_config
    from recserve.benchmarks.targets import check_target, connected

    files = write_pair(tmp_path, pki.server)
    ca, cert, key, token = (tmp_path / name for name in ("ca.pem", "client.pem", "client.key", "token"))
    ca.write_bytes(pki.roots())
    cert.write_bytes(client_pair(pki.client)["certificate_chain"])
    key.write_bytes(client_pair(pki.client)["private_key"])
    token.write_text(TOKEN + "\n")
    parser = argparse.ArgumentParser()
    bench_command.configure(parser)
    secured = {**files, "tls_client_ca_file": ca, "auth_token": TOKEN, **NO_METRICS}
    with serving(FAKE, fake_model(), **secured) as server:
        flags = ["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
        config = run_config(
            parser.parse_args(["run", "--target", server.address, *flags, "--token-file", str(token)]),
            argv=[],
        )
        assert config.tls

        async def check() -> str:
            async with connected(
                config.target,
                config.tls,
                config.root_cert,
                config.tls_cert,
                config.tls_key,
                config.token_file,
            ) as client:
                return (await check_target(client, config.target)).model_name

        assert asyncio.run(check()) == "fake-embedding"
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        run_config(parser.parse_args(["run", "--tls-cert", str(cert)]), argv=[])
