"""TLS/mTLS credentials, bearer tokens and per-caller authorization shared by every gRPC
endpoint (the callers table and its interceptor: ``rpc/authz.py``)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from expertplane.rpc.authz import AuthorizationInterceptor, CallerTable, read_token_file


@dataclass(frozen=True)
class SecurityConfig:
    """Where to find certificates and the token; all optional (plaintext, no auth).

    ``tls_cert``/``tls_key``: this endpoint's certificate chain and key (PEM files).
    ``tls_ca``: CA bundle; on a server it turns on mTLS (clients must present a cert signed by it),
    on a client it verifies the server. ``token``: bearer token sent (client), and without
    ``callers`` the one token a server requires (any holder may call every method).
    ``callers``: the callers a server accepts, each with its roles (``rpc/authz.py``).
    ``server_name``: override for the TLS target name (clients).
    """

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    token: str | None = None
    server_name: str | None = None
    callers: CallerTable | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_ca)


# Where the agent's and the worker's node-local token comes from without --local-token-file (kept
# apart from EXPERTPLANE_TOKEN, the controller's, so that setting one never turns on the other).
LOCAL_TOKEN_ENV = "EXPERTPLANE_LOCAL_TOKEN"


def _read(path: str | None) -> bytes | None:
    return pathlib.Path(path).read_bytes() if path else None


def add_security_arguments(parser, prefix: str = "", token_env: str = "EXPERTPLANE_TOKEN") -> None:
    """Add --{prefix}tls-cert/-key/-ca and --{prefix}token-file options to an argparse parser (or
    argument group); without a token file the token is read from the ``token_env`` variable."""
    p = f"--{prefix}" if prefix else "--"
    parser.add_argument(f"{p}tls-cert", help="PEM certificate chain of this endpoint")
    parser.add_argument(f"{p}tls-key", help="PEM private key of this endpoint")
    parser.add_argument(f"{p}tls-ca", help="PEM CA bundle (server: require client certs = mTLS; client: verify server)")
    parser.add_argument(f"{p}token-file", help=f"file holding the bearer token (or set {token_env}), "
                        "or a callers file: YAML/JSON of callers with tokens or certificate "
                        "identities and roles (docs/security.md)")


def security_from_args(args, prefix: str = "", token_env: str = "EXPERTPLANE_TOKEN") -> SecurityConfig:
    """Build a SecurityConfig from options added by ``add_security_arguments`` (same arguments)."""
    import os

    p = prefix.replace("-", "_")
    token_file = getattr(args, f"{p}token_file")
    tokens = read_token_file(token_file) if token_file else None
    token = tokens.token if tokens else os.environ.get(token_env)
    return SecurityConfig(
        tls_cert=getattr(args, f"{p}tls_cert"),
        tls_key=getattr(args, f"{p}tls_key"),
        tls_ca=getattr(args, f"{p}tls_ca"),
        token=token or None,
        callers=tokens.callers if tokens else None,
    )


def server_credentials(cfg: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS server credentials (mTLS when ``tls_ca`` is set), or None for plaintext."""
    if not cfg.tls_cert:
        return None
    if not cfg.tls_key:
        raise ValueError("tls_key: required with tls_cert")
    ca = _read(cfg.tls_ca)
    return grpc.ssl_server_credentials(
        [(_read(cfg.tls_key), _read(cfg.tls_cert))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(cfg: SecurityConfig) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (with a client cert when cert/key are set), or None for plaintext."""
    if not cfg.tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.tls_ca),
        private_key=_read(cfg.tls_key),
        certificate_chain=_read(cfg.tls_cert),
    )


def call_metadata(cfg: SecurityConfig) -> tuple[tuple[str, str], ...]:
    """Metadata to attach to every call (the bearer token, if any)."""
    return (("authorization", f"Bearer {cfg.token}"),) if cfg.token else ()


class _CallDetails(NamedTuple):
    """A concrete ``grpc.ClientCallDetails`` (grpc only ships the abstract class)."""

    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on a channel, unless the call already
    carries an ``authorization`` entry. Works on plaintext channels too (unlike gRPC's call
    credentials), so a token can guard a loopback endpoint without TLS."""

    def __init__(self, cfg: SecurityConfig):
        self._metadata = call_metadata(cfg)

    def _details(self, details) -> _CallDetails:
        metadata = tuple(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata += self._metadata
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def client_interceptors(cfg: SecurityConfig) -> list[grpc.UnaryUnaryClientInterceptor]:
    """Interceptors for a channel built from ``cfg``: the bearer token on every call, if any."""
    return [TokenClientInterceptor(cfg)] if cfg.token else []


def server_interceptors(cfg: SecurityConfig) -> list[grpc.ServerInterceptor]:
    """Interceptors for a server built from ``cfg``: authorization against its callers table, or
    against the single token (full access), if either is set. Raises ValueError when the table
    recognises callers by certificate but the server does not require client certificates."""
    table = cfg.callers or (CallerTable.single(cfg.token) if cfg.token else None)
    if table is None:
        return []
    if table.has_identities and not (cfg.tls_cert and cfg.tls_ca):
        raise ValueError("callers: an 'identity' entry needs mTLS on this server (tls_cert, "
                         "tls_key and tls_ca)")
    return [AuthorizationInterceptor(table)]
