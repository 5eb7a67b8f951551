"""``headstore serve``: a static file server that answers HTTP Range requests.

Sharded stores are read with byte ranges (a shard's index, then the inner chunks an analyzer needs);
Python's ``http.server`` ignores the ``Range`` header and sends whole files, which a reader cannot
tell from a damaged shard. Any server that honours ranges works (nginx, caddy, S3, the Hugging Face
Hub); this one needs nothing beyond the standard library.
"""

from __future__ import annotations

import os
import re
import shutil
from email.utils import formatdate
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` plus single byte ranges (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``)."""

    def send_head(self) -> Any:
        spec = self.headers.get("Range")
        path = self.translate_path(self.path)
        if spec is None or os.path.isdir(path):
            return super().send_head()
        m = _RANGE.match(spec.strip())
        try:
            f = open(path, "rb")  # closed by the base class after copyfile
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        if m is None or m.group(1) == m.group(2) == "":
            f.close()
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "one byte range, please")
            return None
        a, b = m.group(1), m.group(2)
        start, stop = (size - int(b), size) if a == "" else (int(a), min(int(b) + 1, size) if b else size)
        start = max(start, 0)
        if start >= size or stop <= start:
            f.close()
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", formatdate(os.fstat(f.fileno()).st_mtime, usegmt=True))
        self.end_headers()
        f.seek(start)
        self._remaining: int | None = stop - start
        return f

    def copyfile(self, source: Any, outputfile: Any) -> None:
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            shutil.copyfileobj(source, outputfile)
            return
        self._remaining = None
        while remaining > 0:
            buf = source.read(min(remaining, 1 << 20))
            if not buf:
                break
            outputfile.write(buf)
            remaining -= len(buf)

    def end_headers(self) -> None:
        if self.headers.get("Range") is None:
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


def make_server(directory: str, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> ThreadingHTTPServer:
    """A threading server over ``directory`` (port 0: any free port, see ``server.server_address``)."""

    class Handler(RangeRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            if not quiet:
                super().log_message(format, *args)

    return ThreadingHTTPServer((host, port), Handler)
