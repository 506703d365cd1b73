"""Shared by the examples: use a running server (--url) or start one with a2ats."""

from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running SGLang server (default: start one with --attention-backend a2ats)")
    parser.add_argument("--model-path", help="model for the started server (default: the embedded default model)")


@contextmanager
def server_url(args, backend: str = "a2ats", url: str | None = None, extra_args=()):
    """Yield (url, server or None) for ``backend``: ``url`` if given, else a freshly started
    server (with ``extra_args``)."""
    url = url if url is not None else args.url
    if url:
        with nullcontext():
            yield url.rstrip("/"), None
        return
    from a2ats_sglang.harness.offline_models import model_or_default
    from a2ats_sglang.harness.server import launch_server

    model = model_or_default(args.model_path)
    with launch_server(model, backend, ["--max-total-tokens", "20000", "--enable-cache-report", "--decode-log-interval", "1",
                                       *extra_args]) as srv:
        yield srv.url, srv
