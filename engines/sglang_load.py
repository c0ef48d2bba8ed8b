"""Agent load source for SGLang: the server's expert-distribution recorder, over its HTTP port.

Life of a window (every ``interval`` seconds, one thread)::

    POST /dump_expert_distribution_record     SGLang rank 0 writes expert_distribution_recorder_*.pt
      -> DumpInbox.wait / read                into the shared recorder directory and resets
      -> logical counts [num_hidden_layers, E] (engines.sglang_dumps), summed over new files
      -> MoE rows [L, E] (engines.sglang_layout) -> EngineLoadReport(expert_load)
      -> the agent's engine-load path (the same one AgentService.ReportEngineLoad feeds)

Before the first window the source checks ``GET /server_info`` (a tested SGLang version, a
recorder mode set: ``--expert-distribution-recorder-mode`` or ``--enable-eplb``) and starts the
recorder once (``POST /start_expert_distribution_record``). Until that succeeds it retries with
exponential backoff; the agent runs on meanwhile. A restarted server records nothing until its
recorder is started again: the source starts it again when a dump call finds SGLang unreachable,
and when a window without traffic comes from a server whose ``startup_time`` changed. A dump
file that does not appear within ``dump_wait`` seconds is reported in the log and the window goes
on; a file that appears later is read with the next window. Windows without traffic are not
reported.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from expertplane.engines.sglang_http import HttpPolicy, SglangHttp, SglangHttpError, check_url
from expertplane.engines.sglang_inbox import DumpInbox
from expertplane.engines.sglang_layout import HiddenLayout, learn_layout, moe_load
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor

log = logging.getLogger(__name__)

RECORDER_MODES = ("stat", "stat_approx", "per_pass", "per_token")


@dataclass(frozen=True)
class SglangSourceConfig:
    """``url``: the SGLang server (``http://HOST:PORT``). ``recorder_dir``: its
    ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``, shared with the agent. ``placement``: the
    placement its load is reported for. ``interval``: seconds between dumps. ``moe_layers``:
    hidden-layer index of each MoE layer (None: learned from the first window with traffic).
    ``dump_wait``: seconds a dump file may take to appear. ``reconnect_max``: the longest wait
    between tries to reach SGLang. ``api_key``: SGLang's ``--api-key``/``--admin-api-key``."""

    url: str
    recorder_dir: str
    placement: str
    interval: float = 10.0
    moe_layers: tuple[int, ...] | None = None
    dump_wait: float = 5.0
    reconnect_max: float = 30.0
    http: HttpPolicy = field(default_factory=HttpPolicy)
    api_key: str | None = None

    def __post_init__(self) -> None:
        check_url(self.url)
        if not self.placement:
            raise FieldError("placement", "required with an SGLang load source (the placement "
                                          "the server serves)")
        if not self.recorder_dir:
            raise FieldError("sglang_recorder_dir", "required (SGLang's "
                                                    "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR)")
        for name in ("interval", "reconnect_max"):
            if getattr(self, name) <= 0:
                raise FieldError(f"sglang_{name}", f"must be > 0, got {getattr(self, name)}")
        if self.dump_wait < 0:
            raise FieldError("sglang_dump_wait", f"must be >= 0, got {self.dump_wait}")
        if self.moe_layers is not None and (
                not self.moe_layers or min(self.moe_layers) < 0
                or list(self.moe_layers) != sorted(set(self.moe_layers))):
            raise FieldError("sglang_moe_layers", f"must be increasing hidden-layer indices, got "
                                                  f"{list(self.moe_layers)}")


@dataclass
class SourceCounts:
    """Recorder starts; windows dumped, reported (queued to the controller), without traffic,
    without a dump file in time, and failed (SGLang unreachable or refusing, unusable dumps)."""

    started: int = 0
    dumped: int = 0
    reported: int = 0
    idle: int = 0
    no_file: int = 0
    failed: int = 0


def check_server(info: dict, tested: tuple[str, ...]) -> str:
    """The recorder mode of an SGLang ``/server_info``; raises ``FieldError`` when the version
    is not tested or no recorder mode is set (SGLang's scheduler fails the recorder calls then)."""
    version = str(info.get("version", "unknown"))
    if version not in tested:
        raise FieldError("sglang_version", f"SGLang {version} is not supported (tested: "
                                           f"{', '.join(tested)})")
    mode = info.get("expert_distribution_recorder_mode")
    if mode not in RECORDER_MODES:
        raise FieldError("expert_distribution_recorder_mode",
                         f"is {mode!r} on the SGLang server: start it with "
                         f"--expert-distribution-recorder-mode stat (or --enable-eplb)")
    return mode


class SglangLoadSource:
    """Agent sidecar reporting an SGLang server's load per logical expert every window.

    ``reporting_to(engine_load, registry)`` binds the agent's engine-load entry and metrics
    registry (``SidecarContext.engine_load``/``.registry``) and returns the source, so
    ``lambda ctx: source.reporting_to(ctx.engine_load, ctx.registry)`` is its sidecar factory. ``layout`` is the hidden-layer layout once known (the plan-file
    writer uses it); ``counts`` are the windows so far.
    """

    def __init__(self, config: SglangSourceConfig, tested_versions: tuple[str, ...]):
        self.config = config
        self.counts = SourceCounts()
        self.layout: HiddenLayout | None = None
        self._tested = tested_versions
        self._stopping = threading.Event()
        self._http = SglangHttp(config.url, api_key=config.api_key, policy=config.http,
                                stopping=self._stopping)
        self._engine_load: Callable[[object], bool] | None = None
        self._events: Counter | None = None
        self._inbox: DumpInbox | None = None
        self._thread: threading.Thread | None = None
        self._recording = False
        self._window_start = 0
        self._started_at = None                # the server's startup_time when recording began
        self._epoch = secrets.randbits(63) or 1
        self._sequence = 0
        self._last_error = ""

    def reporting_to(self, engine_load: Callable[[object], bool],
                     registry: CollectorRegistry | None = None) -> "SglangLoadSource":
        """Report through ``engine_load``; count events in ``registry`` (the agent's Prometheus
        registry) as ``expertplane_agent_sglang_events_total{event}`` when given."""
        self._engine_load = engine_load
        if registry is not None:
            self._events = Counter("expertplane_agent_sglang_events",
                                   "SGLang load source: recorder starts and windows by outcome "
                                   "(started, dumped, reported, idle, no_file, failed)",
                                   ["event"], registry=registry)
        return self

    def _count(self, event: str) -> None:
        setattr(self.counts, event, getattr(self.counts, event) + 1)
        if self._events is not None:
            self._events.labels(event=event).inc()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._engine_load is None:
            raise RuntimeError("SglangLoadSource.start before reporting_to(engine_load)")
        if not Path(self.config.recorder_dir).is_dir():
            log.warning("sglang: recorder directory %s does not exist (yet): SGLang's dumps "
                        "must land there", self.config.recorder_dir)
        self._inbox = DumpInbox(self.config.recorder_dir)
        self._thread = threading.Thread(target=self._run, name="agent-sglang-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Dump the last window (bounded by the HTTP timeout), then end the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.http.timeout + self.config.dump_wait + 2.0)

    def _run(self) -> None:
        delay = min(1.0, self.config.reconnect_max)
        while not self._stopping.is_set():
            if not self._recording:
                if not self._connect():
                    self._stopping.wait(delay)
                    delay = min(delay * 2, self.config.reconnect_max)
                    continue
                delay = min(1.0, self.config.reconnect_max)
            if self._stopping.wait(self.config.interval):
                break
            self.window()
        if self._recording:
            self.window()                      # the last, partial window

    # ------------------------------------------------------------------ steps
    def _connect(self) -> bool:
        """Check the server and start its recorder; True when recording."""
        try:
            info = self._http.server_info()
            mode = check_server(info, self._tested)
            self._http.start_record()
        except (SglangHttpError, FieldError) as exc:
            self._note(f"sglang: not recording at {self.config.url}: {exc}")
            return False
        self._recording = True
        self._started_at = info.get("startup_time")
        self._count("started")
        self._window_start = time.time_ns()
        self._last_error = ""
        log.info("sglang: recording expert load at %s (mode %s), dumps in %s every %.3gs",
                 self.config.url, mode, self.config.recorder_dir, self.config.interval)
        return True

    def window(self) -> bool:
        """Dump one window and report it; True when a report was queued."""
        try:
            self._http.dump_record()
        except SglangHttpError as exc:
            self._count("failed")
            self._recording = self._recording and not exc.unreachable
            self._note(f"sglang: dump failed: {exc}")
            return False
        end = time.time_ns()
        start, self._window_start = self._window_start, end
        self._count("dumped")
        files = self._inbox.wait(self.config.dump_wait, self._stopping)
        if not files:
            self._count("no_file")
            log.warning("sglang: no dump appeared in %s within %.3gs of %s's dump: is it the "
                        "server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR (shared with the "
                        "agent)?", self.config.recorder_dir, self.config.dump_wait,
                        self.config.url)
            return False
        hidden = self._inbox.read(files)
        if hidden is None:
            return False
        try:
            self._learn(hidden)
        except FieldError as exc:
            self._count("failed")
            self._note(f"sglang: window not reported: {exc}")
            return False
        if self.layout is None or not hidden.any():
            self._count("idle")
            self._check_restarted()
            return False
        return self._report(hidden, start, end)

    def _learn(self, hidden: np.ndarray) -> None:
        """Know the layout from the first dump (``moe_layers`` given) or the first with traffic."""
        if self.layout is None:
            self.layout = learn_layout(hidden, self.config.moe_layers)
            if self.layout is not None:
                layers = self.layout.moe_layers
                log.info("sglang: %d hidden layers, MoE layers %d..%d (%d)",
                         self.layout.num_hidden_layers, layers[0], layers[-1], len(layers))

    def _check_restarted(self) -> None:
        """After a window without traffic: a server restarted since its recorder was started
        records nothing until started again (its ``startup_time`` changed)."""
        try:
            started_at = self._http.server_info().get("startup_time")
        except SglangHttpError:
            return
        if started_at != self._started_at:
            log.warning("sglang: %s restarted (startup_time %s, was %s): starting its recorder "
                        "again", self.config.url, started_at, self._started_at)
            self._recording = False

    def _report(self, hidden: np.ndarray, start_ns: int, end_ns: int) -> bool:
        try:
            loads = moe_load(hidden, self.layout)
            self._sequence += 1
            msg = pb.EngineLoadReport(placement=self.config.placement, engine="sglang",
                                      expert_load=double_tensor(loads), engine_epoch=self._epoch,
                                      sequence=self._sequence)
            msg.window_start.FromNanoseconds(start_ns)
            msg.window_end.FromNanoseconds(end_ns)
            queued = self._engine_load(msg)
        except FieldError as exc:
            self._count("failed")
            self._note(f"sglang: window not reported: {exc}")
            return False
        if queued:
            self._count("reported")
        self._last_error = ""
        return queued

    def _note(self, message: str) -> None:
        """Log ``message`` at WARNING the first time in a row, at DEBUG while it repeats."""
        log.log(logging.DEBUG if message == self._last_error else logging.WARNING, "%s", message)
        self._last_error = message

