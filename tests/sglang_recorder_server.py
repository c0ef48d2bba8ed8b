"""An SGLang stand-in for the load-source tests: SGLang's own ExpertDistributionRecorder (``stat``
mode, SGLang's ExpertLocationMetadata of a small DeepSeek-V3 model) behind a tiny HTTP handler
with SGLang's endpoint names and answers.

    python sglang_recorder_server.py MODEL_DIR REDUNDANT ARCHIVE_DIR

prints ``PORT`` on its first stdout line, then serves until killed. The recorder writes its dumps
into ``$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` exactly as in a server (its own
``dump_record``); each dump is also copied into ARCHIVE_DIR, so a test can compare what SGLang
wrote with what the agent reported after the agent has consumed (deleted) the dump.

Endpoints, all serialised by one lock as SGLang's scheduler serialises its event loop:
``GET /server_info`` (the recorder fields, SGLang's version, ``startup_time``), ``GET|POST
/start_expert_distribution_record``, ``GET|POST /dump_expert_distribution_record``; for the tests
``POST /restart`` (a fresh recorder, not recording, and a new ``startup_time``: what a restarted
server has) and ``POST /forward`` with ``{"topk_ids": {"<hidden layer>": [[physical id, ...], ...]}}``:
one forward pass through SGLang's recorder hooks (``with_forward_pass``, ``with_current_layer``,
``on_select_experts``), as SGLang's MoE layers call them.

Why this is not a whole SGLang server: SGLang's serving path needs CUDA (or its CPU engine, which
needs sgl_kernel's CPU build, not installed here). Two CPU adjustments, both of SGLang's
accelerator probes and neither on the counting path: the recorder's gatherer asks
``get_device()``, which answers only with an accelerator or the CPU engine, so it is told
"cpu"; and the stat accumulator's first dump empties the accelerator cache
(``torch.get_device_module().empty_cache()``, absent from ``torch.cpu``), so that first-dump
step is marked done.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from engine_env import allow_torchvision_import, deepseek_v3_dir


def location(model_dir: str, redundant: int):
    """SGLang's published ServerArgs (stat recorder, unbounded buffer) and its trivial
    ExpertLocationMetadata for ``model_dir``, on one gloo rank (a stat dump all-reduces)."""
    allow_torchvision_import()
    import torch.distributed as dist
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb import expert_distribution
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.runtime_context import get_context

    get_context().override_server_args(
        tp_size=1, ep_size=1, ep_num_redundant_experts=redundant, device="cpu",
        model_path=model_dir, expert_distribution_recorder_mode="stat",
        expert_distribution_recorder_buffer_size=-1).install()
    store = Path(tempfile.mkdtemp(prefix="sglang-gloo-")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    expert_distribution.get_device = lambda device_id=None: "cpu"
    return ExpertLocationMetadata.init_trivial(ModelConfig(model_dir), 0)


def new_recorder(metadata):
    """A fresh recorder, not recording, as a (re)started server has."""
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder

    rec = ExpertDistributionRecorder.init_new(metadata, 0)
    rec._accumulator._first_dump = False
    return rec


class Handler(BaseHTTPRequestHandler):
    metadata = None
    rec = None
    started_at = 0.0
    lock = threading.Lock()
    archive: Path
    passes = 0

    def log_message(self, *args) -> None:      # quiet
        pass

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        import sglang
        from sglang.srt.runtime_context import get_exec

        with Handler.lock:
            if self.path == "/server_info" and self.command == "GET":
                moe = get_exec().moe
                self._answer(200, json.dumps({
                    "version": sglang.__version__,
                    "expert_distribution_recorder_mode": moe.expert_distribution_recorder_mode,
                    "expert_distribution_recorder_buffer_size":
                        moe.expert_distribution_recorder_buffer_size,
                    "enable_eplb": False, "startup_time": Handler.started_at}))
            elif self.path == "/start_expert_distribution_record":
                Handler.rec.start_record()
                self._answer(200, "Start recording the expert distribution.\n")
            elif self.path == "/dump_expert_distribution_record":
                self._dump()
                self._answer(200, "Dump expert distribution record.\n")
            elif self.path == "/restart" and self.command == "POST":
                Handler.rec, Handler.started_at = new_recorder(Handler.metadata), time.time()
                self._answer(200, "{}")
            elif self.path == "/forward" and self.command == "POST":
                self._forward(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self._answer(200, "{}")
            else:
                self._answer(404, '{"detail":"Not Found"}')

    def _dump(self) -> None:
        directory = Path(os.environ["SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"])
        before = set(directory.glob("expert_distribution_recorder_*.pt"))
        Handler.rec.dump_record()
        for path in set(directory.glob("expert_distribution_recorder_*.pt")) - before:
            shutil.copy(path, Handler.archive / path.name)

    def _forward(self, body: dict) -> None:
        import torch

        Handler.passes += 1
        with Handler.rec.with_forward_pass(Handler.passes, None):
            for layer, ids in body["topk_ids"].items():
                with Handler.rec.with_current_layer(int(layer)):
                    Handler.rec.on_select_experts(torch.tensor(ids, dtype=torch.int64))

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(model_dir: str, redundant: str, archive: str) -> None:
    Handler.metadata = location(model_dir, int(redundant))
    Handler.rec, Handler.started_at = new_recorder(Handler.metadata), time.time()
    Handler.archive = Path(archive)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


@contextmanager
def running(root: Path, hidden: int, experts: int, dense: int, redundant: int):
    """This stand-in in a subprocess for a small DeepSeek-V3 model (``deepseek_v3_dir``) under
    ``root``: yields (its URL, its recorder directory, the archive of its dumps); killed after."""
    recorder, archive = root / "recorder", root / "archive"
    root.mkdir(parents=True, exist_ok=True)
    recorder.mkdir()
    archive.mkdir()
    model = deepseek_v3_dir(root / "model", hidden, experts, dense)
    proc = subprocess.Popen(
        [sys.executable, __file__, model, str(redundant), str(archive)],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(recorder)})
    try:
        port = proc.stdout.readline().strip()
        assert port.isdigit(), f"the SGLang stand-in did not start (exit {proc.poll()})"
        yield f"http://127.0.0.1:{port}", recorder, archive
    finally:
        proc.kill()
        proc.wait(30)


if __name__ == "__main__":
    main(*sys.argv[1:])
