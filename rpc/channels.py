"""Client channels and servers with the project's defaults: message limits, keepalive, retries."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from expertplane.rpc.loop_thread import LoopThread
from expertplane.rpc.security import (
    SecurityConfig,
    channel_credentials,
    client_interceptors,
    server_credentials,
    server_interceptors,
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
UNIX_SOCKET_SERVER_NAME = "localhost"   # the TLS name expected of servers on unix:/path targets

# Idempotent unary calls are retried by gRPC itself on UNAVAILABLE with exponential backoff.
_RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "expertplane.v1.PlanService"},
                 {"service": "expertplane.v1.AgentService"},
                 {"service": "expertplane.v1.WorkerService", "method": "PullCounters"},
                 {"service": "expertplane.v1.WorkerService", "method": "Status"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})

_COMMON_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


# so_reuseport off: a second server on a taken port must fail, not share it.
_SERVER_OPTIONS = _COMMON_OPTIONS + [("grpc.so_reuseport", 0),
                                     ("grpc.http2.min_ping_interval_without_data_ms", 5_000)]


def make_channel(target: str, security: SecurityConfig | None = None) -> grpc.Channel:
    """A channel to ``target`` (host:port or unix:/path) with retries and keepalive; TLS (with a
    client certificate for mTLS) and the bearer token on every call as ``security`` says. Over
    TLS a Unix socket's server must present a certificate for ``localhost`` (gRPC would check
    the socket path) unless ``security.server_name`` names another."""
    security = security or SecurityConfig()
    options = _COMMON_OPTIONS + [
        ("grpc.service_config", _RETRY_SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]
    server_name = security.server_name or (UNIX_SOCKET_SERVER_NAME if target.startswith("unix:")
                                           and security.tls else None)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    creds = channel_credentials(security)
    channel = grpc.insecure_channel(target, options=options) if creds is None \
        else grpc.secure_channel(target, creds, options=options)
    return grpc.intercept_channel(channel, *client_interceptors(security))


def make_server(security: SecurityConfig | None = None, *, max_workers: int = 16,
                max_concurrent_rpcs: int = 256) -> grpc.Server:
    """A thread-pool server; beyond ``max_concurrent_rpcs`` calls get RESOURCE_EXHAUSTED."""
    security = security or SecurityConfig()
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=server_interceptors(security),
        options=_SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )


class _AioInterceptor(grpc.aio.ServerInterceptor):
    """A synchronous ``grpc.ServerInterceptor`` on a ``grpc.aio`` server: the handler it returns
    (the continuation's, or one wrapping it) is served as is. The authorization interceptor keeps
    each behaviour's kind, and its streaming checks act when iterated, as grpc.aio needs for a
    synchronous streaming handler (called on the loop, iterated in the pool)."""

    def __init__(self, interceptor: grpc.ServerInterceptor):
        self._sync = interceptor

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return self._sync.intercept_service(lambda _details: handler, handler_call_details)


def make_aio_server(executor: futures.ThreadPoolExecutor,
                    security: SecurityConfig | None = None, *,
                    max_concurrent_rpcs: int = 256) -> grpc.aio.Server:
    """``make_server``'s twin on asyncio (create it inside the loop that will run it): coroutine
    handlers run on the loop; synchronous ones on ``executor``, which the caller owns and shuts
    down after stopping the server (while the loop still runs: synchronous handlers read their
    requests through it)."""
    security = security or SecurityConfig()
    return grpc.aio.server(
        executor,
        interceptors=[_AioInterceptor(i) for i in server_interceptors(security)],
        options=_SERVER_OPTIONS, maximum_concurrent_rpcs=max_concurrent_rpcs)


@contextlib.contextmanager
def aio_server_thread(add_servicers: Callable[[grpc.aio.Server], None], address: str,
                      security: SecurityConfig | None = None, *, max_workers: int = 4,
                      max_concurrent_rpcs: int = 256) -> Iterator[int]:
    """A ``make_aio_server`` server on its own event-loop thread (for benchmarks and tests that
    drive it from synchronous code): ``add_servicers(server)`` registers the services; binds
    ``address`` with ``security``; yields the bound port; stops the server (1 s grace), its
    executor (``max_workers`` threads for synchronous handlers) and the loop (drained:
    ``LoopThread.close``) on exit."""
    loop = LoopThread("aio-server")
    executor = futures.ThreadPoolExecutor(max_workers=max_workers)

    async def start() -> tuple[grpc.aio.Server, int]:
        server = make_aio_server(executor, security, max_concurrent_rpcs=max_concurrent_rpcs)
        add_servicers(server)
        port = bind(server, address, security)
        await server.start()
        return server, port

    loop.start()
    try:
        server, port = loop.run(start())
        try:
            yield port
        finally:
            loop.run(server.stop(1))
    finally:
        executor.shutdown()
        loop.close()


def bind(server: grpc.Server, address: str, security: SecurityConfig | None = None) -> int:
    """Bind ``address`` with TLS when configured; returns the bound port (0 for unix sockets)."""
    creds = server_credentials(security or SecurityConfig())
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"could not bind {address}")
    return port


def bind_local(server: grpc.Server, address: str, security: SecurityConfig | None = None) -> str:
    """Bind a node-local endpoint (``unix:/path`` or ``host:port``, port 0 = any free one) and
    return the address to advertise (the real port filled in). A Unix socket file left by a
    previous process at ``path`` is removed first: the address is ours to reuse."""
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
        bind(server, address, security)
        return address
    port = bind(server, address, security)
    return f"{address.rpartition(':')[0]}:{port}"
