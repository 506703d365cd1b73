"""Start and stop a real SGLang server process (used by the demo, examples,
benchmarks and end-to-end tests).

    with launch_server(model_path, "a2ats", extra_args=[...]) as srv:
        requests.post(srv.url + "/generate", ...)

On a machine without CUDA it runs with ``--device cpu`` through the project's
opt-in platform (``SGLANG_PLATFORM=a2ats_cpu``) in float32, sleeping when idle.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def server_command(model_path, backend: str, port: int, extra_args=()) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--attention-backend", backend, "--host", "127.0.0.1", "--port", str(port)]
    if on_cpu():
        # Idle schedulers otherwise poll at full speed, taking cores from busy ones.
        cmd += ["--device", "cpu", "--dtype", "float32", "--sleep-on-idle"]
    return cmd + [str(a) for a in extra_args]


def server_env(env: dict | None = None) -> dict:
    out = dict(os.environ)
    if on_cpu():
        out.setdefault("SGLANG_PLATFORM", "a2ats_cpu")
    # Stopping a server (SIGTERM to its group) ends its scheduler first, which SGLang takes for a
    # crash: it would sleep 5 s "to let GPU activity settle" before py-spy and CUDA core dumps.
    for name in ("SGLANG_PYSPY_DUMP_BEFORE_CRASH", "SGLANG_CUDA_COREDUMP_BEFORE_CRASH"):
        out.setdefault(name, "0")
    out.pop("TRITON_INTERPRET", None)
    out.update(env or {})
    return out


PORT_ATTEMPTS = 3  # a port free_port() found can be taken before the server binds it: try another


class PortTaken(RuntimeError):
    """The server could not bind the port it was given (another process took it first)."""


def exit_on_sigterm() -> None:
    """Make SIGTERM to this process (a benchmark or test run stopped by ``kill`` or a CI
    timeout) raise SystemExit, so the ``finally`` of every :func:`launch_server` still running
    stops its server instead of leaving it behind. Only from the main thread, and only where
    SIGTERM still has its default action (a handler the caller installed is kept)."""
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextmanager
def launch_server(model_path, backend: str = "a2ats", extra_args=(), env: dict | None = None, timeout: float = 300.0,
                  log_path: Path | None = None, cwd: Path | None = None):
    """Yield a running :class:`Server` (its process in ``cwd``, default this one's); raise
    RuntimeError with the log tail if it dies or never gets healthy. Stopped on the way out,
    also when this process gets SIGTERM (:func:`exit_on_sigterm`)."""
    exit_on_sigterm()
    log_path = Path(log_path or tempfile.mkstemp(prefix=f"sglang-{backend}-", suffix=".log")[1])
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        try:
            srv = start(server_command(model_path, backend, port, extra_args), port, log_path, server_env(env), timeout,
                        cwd)
            break
        except PortTaken:
            if attempt == PORT_ATTEMPTS - 1:
                raise
    try:
        yield srv
    finally:
        stop(srv.process)


@contextmanager
def launch_router(worker_urls, policy: str = "cache_aware", extra_args=(), timeout: float = 120.0):
    """Yield SGLang's router (``sglang-router``) in front of running servers ``worker_urls``,
    routing by ``policy`` (``cache_aware``, ``round_robin``, ...), as a :class:`Server`."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--policy", policy, "--worker-urls", *worker_urls, *map(str, extra_args)]
    router = start(cmd, port, Path(tempfile.mkstemp(prefix=f"sglang-router-{policy}-", suffix=".log")[1]),
                   dict(os.environ), timeout)
    try:
        deadline = time.time() + timeout  # the router registers its workers after it answers /health
        while {w["url"] for w in requests.get(router.url + "/workers", timeout=5).json()["workers"]
               if w["is_healthy"]} != set(worker_urls):
            if time.time() > deadline:
                raise RuntimeError(f"router did not register {worker_urls} in {timeout:.0f}s:\n{router.log()[-4000:]}")
            time.sleep(0.5)
        yield router
    finally:
        stop(router.process)


def start(cmd: list[str], port: int, log_path: Path, env: dict, timeout: float, cwd: Path | None = None) -> Server:
    """Run ``cmd`` (an HTTP server on ``port``, output to ``log_path``) in its own process
    group until ``/health`` answers 200; stop it and raise RuntimeError with the log tail
    (:class:`PortTaken` if the port was taken) if it exits, cannot bind or never gets healthy."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.time() + timeout
    try:
        while True:
            if "address already in use" in srv.log().lower():  # uvicorn then waits for shutdown, not exiting
                raise PortTaken(f"{cmd[2]} could not bind port {port}:\n{srv.log()[-4000:]}")
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited with code {proc.returncode}:\n{srv.log()[-4000:]}")
            try:
                if requests.get(srv.url + "/health", timeout=2).status_code == 200:
                    return srv
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{cmd[2]} not healthy after {timeout:.0f}s:\n{srv.log()[-4000:]}")
            time.sleep(1)
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stream_token_times(url: str, prompt, max_new_tokens: int) -> list[tuple[int, float]]:
    """Stream one greedy request (``prompt``: text or token ids) -> [(tokens generated so
    far, perf_counter time)] for every streamed chunk."""
    import json

    key = "text" if isinstance(prompt, str) else "input_ids"
    marks = []
    with requests.post(url + "/generate", json={key: prompt, "stream": True, "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                marks.append((json.loads(line[6:])["meta_info"]["completion_tokens"], time.perf_counter()))
    return marks


def decode_ms_per_token(url: str, prompt, max_new_tokens: int) -> float:
    """Time one request's decode alone: (time of the last streamed token - time of the
    first) / tokens in between, in ms."""
    marks = stream_token_times(url, prompt, max_new_tokens)
    (n0, t0), (n1, t1) = marks[0], marks[-1]
    if n1 <= n0:
        raise RuntimeError(f"need at least 2 streamed tokens to time decode, got {marks}")
    return 1000 * (t1 - t0) / (n1 - n0)


def run_server_expecting_failure(model_path, backend: str, extra_args=(), env: dict | None = None, timeout: float = 300.0):
    """Run a server that must fail to start: -> (exit code, combined output)."""
    port = free_port()
    r = subprocess.run(server_command(model_path, backend, port, extra_args), env=server_env(env), capture_output=True,
                       text=True, timeout=timeout, start_new_session=True)
    return r.returncode, r.stdout + r.stderr
