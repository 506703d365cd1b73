"""The harness that starts real servers: a port taken between finding it and binding it."""

import os
import socket
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
