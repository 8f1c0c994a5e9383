"""A real `qnext serve` process for black-box server tests (one per test module: starting one costs seconds).

    ckpt = tiny_checkpoint()                       # written once per test session (random weights)
    with ServerProcess(ckpt, "--api-key", "k") as srv:
        srv.base_url, srv.metrics(), srv.log_text()
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODEL_NAME = "tiny-coder"
_CKPT: Path | None = None


def tiny_checkpoint() -> Path:
    """The `tiny` preset (vocab 512, synthetic byte-level BPE tokenizer, Qwen3-Coder chat template)."""
    global _CKPT
    if _CKPT is None:
        from qnext.weights.checkpoint_writer import write_checkpoint

        root = tempfile.mkdtemp(prefix="qnext-srv-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CKPT = write_checkpoint(Path(root) / "tiny", "tiny", dtype="float32")
    return _CKPT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint: Path, *args: str, startup_timeout: float = 120.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="qnext-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "qnext", "serve", "--model", str(checkpoint), "--port", str(self.port),
               "--device", "cpu", "--served-model-name", MODEL_NAME, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_text()
                self.stop()
                raise RuntimeError(f"qnext serve exited with {self.proc.returncode}:\n{log}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        log = self.log_text()
        self.stop()
        raise RuntimeError(f"qnext serve not healthy after {timeout}s:\n{log}")

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples of /metrics: {'name{labels}': value}."""
        text = httpx.get(self.base_url + "/metrics", timeout=5.0).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Metrics once no request runs or waits and no KV page or state slot is held."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = all(m.get(k) == 0 for k in ("qnext:num_requests_running", "qnext:num_requests_waiting",
                                                 "qnext:kv_cache_pages_used", "qnext:state_slots_used"))
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
