"""Transport security of the gRPC port: TLS / mutual TLS that follows its files, and one bearer-token check.

The certificate files are re-read when they change (cert-manager rotates them in place), so a new connection
gets the new certificate without a restart; SIGHUP forces a re-read. The token check is one interceptor in
front of every service except health and reflection, which stay open for probes and grpcurl.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import grpc.aio

from recserve.server.metrics import Metrics
from recserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

# Services that answer without a token: Kubernetes probes carry none, and reflection only describes the API.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# How often the token file's stat is checked, at most: a call must not pay a syscall.
_TOKEN_CHECK_S = 1.0

# (st_ino, st_mtime_ns, st_size) of each file: a rewrite or an atomic symlink swap changes one of them.
Stamp = tuple[tuple[int, int, int], ...]


class SecurityError(Exception):
    """A TLS or token file that cannot be used; the message names the setting (a one-line start-up error)."""


def _stamp(paths: Sequence[Path]) -> Stamp:
    stats = [os.stat(p) for p in paths]
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)


def _encrypted_key() -> NoReturn:
    # NOTE: without a password callback OpenSSL would prompt on the terminal for an encrypted key.
    raise SecurityError("the key is encrypted: give gRPC an unencrypted PEM key")


@dataclass(frozen=True, slots=True)
class _Pem:
    key: bytes
    chain: bytes
    client_ca: bytes | None

    def config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.chain)], self.client_ca)


class CertificateFiles:
    """The server's certificate chain, key and (for mutual TLS) client CA bundle, as PEM files.

    `credentials()` gives gRPC a fetcher that it calls before every TLS handshake; the fetcher hands over
    the files' new contents once they changed and still form a valid pair, and otherwise keeps the current
    ones (a half-rotated pair is retried on the next connection, never served).
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._paths = [p for p in (cert, key, client_ca) if p is not None]
        self._lock = threading.Lock()
        self._forced = False
        self._failed: Stamp | None = None
        self._stamp, self._pem = self._read()

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> CertificateFiles | None:
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._pem.config(), self._fetch, require_client_authentication=self.mutual
        )

    def reload(self) -> None:
        """Re-read the files before the next handshake even if they look unchanged (SIGHUP)."""
        self._forced = True

    def _read(self) -> tuple[Stamp, _Pem]:
        """The files' stamp and contents, checked with OpenSSL; SecurityError naming the bad setting."""
        try:
            stamp = _stamp(self._paths)
            client_ca = self.client_ca.read_bytes() if self.client_ca is not None else None
            pem = _Pem(self.key.read_bytes(), self.cert.read_bytes(), client_ca)
        except OSError as exc:
            raise SecurityError(f"cannot read a TLS file: {exc}") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key, password=_encrypted_key)
        except (ssl.SSLError, OSError) as exc:
            raise SecurityError(
                f"--tls-cert-file {self.cert} and --tls-key-file {self.key} are not a PEM certificate chain"
                f" and its private key ({exc})"
            ) from None
        if pem.client_ca is not None:
            try:
                context.load_verify_locations(cadata=pem.client_ca.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
                raise SecurityError(
                    f"--tls-client-ca-file {self.client_ca} is not a PEM CA bundle ({exc})"
                ) from None
        # NOTE: OpenSSL read the pair by path; if a file changed meanwhile, what was checked is not what
        # was read, so the reader tries again later.
        if _stamp(self._paths) != stamp:
            raise SecurityError("the TLS files changed while they were read")
        return stamp, pem

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core on its own threads, before every handshake: None keeps the current config.
        try:
            with self._lock:
                return self._changed()
        except Exception:  # an exception here would fail the handshake
            log.exception("TLS reload failed; the previous certificate stays")
            return None

    def _changed(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = _stamp(self._paths)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._stamp and not self._forced:
            return None
        if stamp is not None and stamp == self._failed and not self._forced:
            return None
        self._forced = False
        try:
            self._stamp, self._pem = self._read()
        except SecurityError as exc:
            self._failed = stamp
            log.warning("TLS files changed but cannot be used; the previous certificate stays: %s", exc)
            return None
        log.info("TLS certificate reloaded", extra={"cert": str(self.cert)})
        return self._pem.config()


class BearerToken:
    """The token calls must send: a fixed value, or a file's content (re-read when the file changes)."""

    def __init__(self, value: str | None = None, file: Path | None = None) -> None:
        if (value is None) == (file is None):
            raise ValueError("give exactly one of value and file")
        self.file = file
        self._checked = time.monotonic()
        self._stamp: Stamp | None = None
        if file is not None:
            self._stamp, value = self._read(file)
        assert value is not None
        if not value.strip():
            raise SecurityError("the auth token is empty")
        self._token = value.strip().encode()

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> BearerToken | None:
        if settings.auth_token_file is not None:
            return cls(file=settings.auth_token_file)
        if settings.auth_token is not None:
            return cls(value=settings.auth_token.get_secret_value())
        return None

    @staticmethod
    def _read(file: Path) -> tuple[Stamp, str]:
        try:
            stamp = _stamp([file])
            text = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecurityError(f"--auth-token-file: cannot read {file}: {exc}") from None
        if not text:
            raise SecurityError(f"--auth-token-file {file} is empty")
        return stamp, text

    def reload(self, force: bool = True) -> None:
        """Re-read the file (changed or not with `force`); a file that became unusable keeps the old token."""
        if self.file is None:
            return
        self._checked = time.monotonic()
        try:
            stamp = _stamp([self.file])
            if stamp == self._stamp and not force:
                return
            self._stamp, text = self._read(self.file)
        except (OSError, SecurityError) as exc:
            log.warning("the auth token file cannot be used; the previous token stays: %s", exc)
            return
        self._token = text.encode()

    def matches(self, presented: str) -> bool:
        if self.file is not None and time.monotonic() - self._checked >= _TOKEN_CHECK_S:
            self.reload(force=False)
        return hmac.compare_digest(presented.encode(), self._token)


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


_MISSING = "this server needs a token: send the metadata `authorization: Bearer <token>`"
_WRONG = "the bearer token is wrong: send `authorization: Bearer <token>` with this server's token"


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses, with UNAUTHENTICATED, every call without the right bearer token, except OPEN_SERVICES.

    A refused call never reaches its handler (nor the request's deserialisation); it is counted in
    requests_total{code="UNAUTHENTICATED"} and failures_total{reason="unauthenticated"}.
    """

    def __init__(self, token: BearerToken, metrics: Metrics) -> None:
        self.token = token
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        service, _, rpc = method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return await continuation(details)
        presented = bearer(details.invocation_metadata)
        if presented is not None and self.token.matches(presented):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        return self._refusing(handler, rpc, _MISSING if presented is None else _WRONG)

    def _refusing(self, handler: grpc.RpcMethodHandler, rpc: str, message: str) -> grpc.RpcMethodHandler:
        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            log.info("call refused", extra={"rpc": rpc, "code": "UNAUTHENTICATED", "peer": context.peer()})
            # NOTE: no model label: the request was never parsed, so which model it named is unknown.
            self.metrics.call_finished("", rpc, grpc.StatusCode.UNAUTHENTICATED.name, "unauthenticated")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # The refusal has the handler's shape; no request deserializer, so nothing is parsed for it.
        serializer = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=serializer)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse, response_serializer=serializer)
        return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serializer)


@dataclass(frozen=True)
class Security:
    """What secures one server: its TLS files and its token, each None when not configured."""

    tls: CertificateFiles | None
    token: BearerToken | None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Security:
        """Reads and checks every file now; SecurityError with a one-line message when one is unusable."""
        return cls(CertificateFiles.from_settings(settings), BearerToken.from_settings(settings))

    def interceptors(self, metrics: Metrics) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.token is None else [TokenAuth(self.token, metrics)]

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, self.tls.credentials()))

    def reload(self) -> None:
        """SIGHUP: the TLS files before the next handshake and the token file now, changed or not."""
        if self.tls is not None:
            self.tls.reload()
        if self.token is not None:
            self.token.reload()
        log.info("credentials reload requested")

    def describe(self) -> dict[str, object]:
        """For the start-up log line: which protections are on (never the token)."""
        return {
            "tls": self.tls is not None,
            "mutual_tls": self.tls is not None and self.tls.mutual,
            "token_auth": self.token is not None,
        }
