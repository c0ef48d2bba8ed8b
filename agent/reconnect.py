"""Keep a long-lived gRPC stream open: re-open it with exponential backoff and jitter (tenacity)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tenacity import Retrying, retry_if_exception_type, wait_random_exponential

log = logging.getLogger(__name__)


class StreamFailed(Exception):
    """A stream attempt ended before it made progress; the next attempt waits longer."""


def keep_open(name: str, attempt: Callable[[], None], stopping: threading.Event, *,
              initial: float, maximum: float) -> None:
    """Run ``attempt`` until ``stopping`` is set.

    ``attempt`` returns normally when its stream ended after making progress (re-opened at once,
    backoff reset) and raises ``StreamFailed`` when it could not (re-opened after a random
    exponential wait of at most ``maximum`` seconds, starting around ``initial``). Setting
    ``stopping`` interrupts a backoff wait.
    """

    def stop_when_stopping(_state) -> bool:
        return stopping.is_set()

    def before_sleep(state) -> None:
        log.info("%s stream: %s; retrying in %.2fs", name, state.outcome.exception(),
                 state.next_action.sleep if state.next_action else 0.0)

    while not stopping.is_set():
        retrying = Retrying(
            retry=retry_if_exception_type(StreamFailed),
            wait=wait_random_exponential(multiplier=initial, max=maximum),
            stop=stop_when_stopping,
            sleep=stopping.wait,
            before_sleep=before_sleep,
            reraise=False,
            retry_error_callback=lambda _state: None,
        )
        for try_ in retrying:
            with try_:
                if stopping.is_set():
                    return
                attempt()
