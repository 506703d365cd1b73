"""The harness that starts real servers: a port taken between finding it and binding it; a
run stopped by SIGTERM stops its servers."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import requests

from a2ats_sglang.harness import server as harness

HEALTHY = textwrap.dedent("""
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_port_taken_before_the_server_binds_it_is_retried_on_another(tmp_path, monkeypatch):
    """free_port() can hand out a port another process takes before the server binds it
    (seen once in CI-like runs: uvicorn logs "address already in use" and waits): the server
    is stopped and started again on a new port."""
    taken = listening_socket()
    ports = iter([taken.getsockname()[1], harness.free_port()])
    monkeypatch.setattr(harness, "free_port", lambda: next(ports))
    monkeypatch.setattr(harness, "server_command", lambda model, backend, port, extra: [sys.executable, "-c", HEALTHY,
                                                                                       str(port)])
    try:
        with harness.launch_server("unused", "none", log_path=tmp_path / "log", timeout=30) as srv:
            assert requests.get(srv.url + "/health", timeout=5).status_code == 200
            assert int(srv.url.rsplit(":", 1)[1]) != taken.getsockname()[1]
    finally:
        taken.close()
    assert srv.process.poll() is not None  # stopped on the way out


def test_a_taken_port_raises_port_taken_and_stops_the_process(tmp_path):
    taken = listening_socket()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(harness.PortTaken, match=f"could not bind port {port}"):
            harness.start([sys.executable, "-c", HEALTHY, str(port)], port, tmp_path / "log", dict(os.environ), 30)
    finally:
        taken.close()


def test_sigterm_to_a_run_stops_the_servers_it_started(tmp_path):
    """A script holding a launch_server context gets SIGTERM (a killed benchmark, a CI timeout):
    it exits through the context's ``finally``, which stops the server process."""
    script = textwrap.dedent(f"""
        import sys, time
        from a2ats_sglang.harness import server as harness
        harness.server_command = lambda model, backend, port, extra: [sys.executable, "-c", {HEALTHY!r}, str(port)]
        with harness.launch_server("unused", "none", log_path={str(tmp_path / "log")!r}, timeout=30) as srv:
            print(srv.process.pid, flush=True)
            time.sleep(300)
    """)
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(run.stdout.readline())
    try:
        run.send_signal(signal.SIGTERM)
        assert run.wait(60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)  # stopped and reaped by the script on its way out
    finally:
        run.kill()
        try:
            os.kill(server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
