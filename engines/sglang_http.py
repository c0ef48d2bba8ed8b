"""SGLang's HTTP endpoints the agent's load source calls: ``/server_info``,
``/start_expert_distribution_record`` and ``/dump_expert_distribution_record``.

Each call has a timeout and is retried (tenacity: random exponential backoff, a few attempts)
when SGLang cannot be reached, times out or answers 5xx; a 4xx answer (a wrong API key, an
unknown endpoint) is not retried. ``stopping`` interrupts a backoff wait. Failures raise
``SglangHttpError`` with one readable line; ``unreachable`` tells a server that did not answer
(down, restarting) from one that refused.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from tenacity import (Retrying, retry_if_exception, stop_after_attempt, stop_any,
                      wait_random_exponential)

from expertplane.errors import FieldError, one_line

START = "/start_expert_distribution_record"
DUMP = "/dump_expert_distribution_record"
SERVER_INFO = "/server_info"


class SglangHttpError(Exception):
    """An SGLang endpoint failed; ``unreachable``: no answer (retried), else an HTTP refusal."""

    def __init__(self, message: str, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class HttpPolicy:
    """``timeout``: seconds per request. ``attempts``: tries per call for unreachable / 5xx.
    ``backoff_initial``/``backoff_max``: seconds of the random exponential wait between tries."""

    timeout: float = 30.0
    attempts: int = 3
    backoff_initial: float = 0.2
    backoff_max: float = 2.0


def check_url(url: str) -> str:
    """``url`` without a trailing slash; raises ``FieldError`` naming ``sglang_url``."""
    parsed = urllib.parse.urlparse(url or "")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise FieldError("sglang_url", f"must be http(s)://HOST:PORT of the SGLang server, "
                                       f"got {url!r}")
    return url.rstrip("/")


class SglangHttp:
    """Calls one SGLang server at ``url``; ``api_key`` (SGLang's ``--api-key`` or
    ``--admin-api-key``) is sent as a bearer token when given."""

    def __init__(self, url: str, *, api_key: str | None = None, policy: HttpPolicy = HttpPolicy(),
                 stopping: threading.Event | None = None):
        self.url = check_url(url)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._policy = policy
        self._stopping = stopping or threading.Event()

    def server_info(self) -> dict:
        """SGLang's resolved server arguments and version (``GET /server_info``)."""
        body = self._call("GET", SERVER_INFO)
        try:
            info = json.loads(body)
        except ValueError:
            raise SglangHttpError(f"{self.url}{SERVER_INFO} did not answer JSON", False) from None
        if not isinstance(info, dict):
            raise SglangHttpError(f"{self.url}{SERVER_INFO} did not answer a JSON object", False)
        return info

    def start_record(self) -> None:
        """Start (and clear) SGLang's expert-distribution recorder."""
        self._call("POST", START)

    def dump_record(self) -> None:
        """Make SGLang write its recorder's window to its recorder directory and reset it."""
        self._call("POST", DUMP)

    def _call(self, method: str, path: str) -> bytes:
        p = self._policy

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, SglangHttpError) and exc.unreachable

        retrying = Retrying(
            retry=retry_if_exception(transient),
            wait=wait_random_exponential(multiplier=p.backoff_initial, max=p.backoff_max),
            stop=stop_any(stop_after_attempt(p.attempts), lambda _s: self._stopping.is_set()),
            sleep=self._stopping.wait, reraise=True)
        return retrying(self._once, method, path)

    def _once(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         data=b"" if method == "POST" else None,
                                         headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self._policy.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = one_line(exc.read().decode("utf-8", "replace")[:200] or exc.reason)
            raise SglangHttpError(f"{method} {self.url}{path}: HTTP {exc.code} {detail}",
                                  unreachable=exc.code >= 500) from None
        except (urllib.error.URLError, OSError) as exc:   # refused, reset, DNS, timeout
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise SglangHttpError(f"{method} {self.url}{path}: {one_line(reason) or 'timed out'}",
                                  unreachable=True) from None
