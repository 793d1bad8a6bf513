"""Live servers for the remote-store tests: a static HTTP host and a moto S3 server.

Nothing is mocked below the network: ``serve`` runs ``http.server`` in a thread (with byte
ranges, with or without directory listings), ``moto_s3`` runs moto's S3 server.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import logging
import os
import re
import socket
import sys
import threading
from pathlib import Path

import pytest


# ---- a static HTTP host -----------------------------------------------------------------
class _StaticHost(http.server.SimpleHTTPRequestHandler):
    """Serves files like a static host (S3 website, nginx, a CDN): byte ranges, optional listings.

    ``http.server`` alone answers a Range request with the whole file, and lists directories;
    this handler answers ranges with 206 when ``ranges`` and refuses listings (404) unless
    ``listings``. Paths of directory requests are recorded in ``dir_requests``.
    """

    listings = True
    ranges = True
    dir_requests: list[str]
    protocol_version = "HTTP/1.1"  # keep-alive, as real hosts do (HTTP/1.0 reconnects per file)
    disable_nagle_algorithm = True  # headers and body go out separately: no 40 ms ACK stalls

    def log_message(self, *args) -> None:
        pass

    def list_directory(self, path):
        self.dir_requests.append(self.path)
        if self.listings:
            return super().list_directory(path)
        self.send_error(404, "no directory listings here")
        return None

    def send_head(self):
        spec = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not self.ranges or not spec or os.path.isdir(path):
            return super().send_head()
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
        if m is None or not os.path.isfile(path):
            self.send_error(404 if m else 416)
            return None
        data = Path(path).read_bytes()
        a, b = m.groups()
        start, stop = (
            (max(0, len(data) - int(b)), len(data))
            if a == ""
            else (int(a), min(len(data), int(b) + 1) if b else len(data))
        )
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        return io.BytesIO(data[start:stop])


class _QuietServer(http.server.ThreadingHTTPServer):
    """Drops a client's closed keep-alive connection silently. socketserver prints such
    resets as a traceback on the process's stderr, which click's test runner (capturing that
    stderr) then counted as the command's own output."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(directory: Path, *, listings: bool = True, ranges: bool = True):
    """Serve ``directory`` on 127.0.0.1 and a free port; yield ``(base_url, dir_requests)``."""
    dir_requests: list[str] = []
    handler = type(
        "Host",
        (_StaticHost,),
        {"listings": listings, "ranges": ranges, "dir_requests": dir_requests},
    )
    server = _QuietServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", dir_requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---- S3 (moto) ----------------------------------------------------------------------------
@contextlib.contextmanager
def moto_s3(bucket: str):
    """A moto S3 server on 127.0.0.1 and a free port holding an empty ``bucket``; yields
    ``(endpoint, bucket, storage options)``. Skips the test if moto, s3fs or boto3 is absent."""
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// stores")
    boto3 = pytest.importorskip("boto3", reason="boto3 is needed to create the test bucket")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for S3 tests")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "x")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "x")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            endpoint = f"http://127.0.0.1:{port}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            options = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": endpoint}}
            yield endpoint, bucket, options
        finally:
            server.stop()
