"""Fixtures: a loopback HTTP module server, a sample module, and a cache in a temp directory."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator

import pytest

import wasm_ecds
from ecds_testkit import make_module


@dataclass
class ModuleServer:
    """Serves `files` (path -> body) on 127.0.0.1 and counts GET requests per path."""

    files: Dict[str, bytes] = field(default_factory=dict)
    hits: Dict[str, int] = field(default_factory=dict)
    delay: float = 0.0
    base: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits.get(path, 0)

    def add(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url(path)


@pytest.fixture
def server() -> Iterator[ModuleServer]:
    state = ModuleServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            with state.lock:
                state.hits[self.path] = state.hits.get(self.path, 0) + 1
            if state.delay:
                time.sleep(state.delay)
            body = state.files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/wasm")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def module() -> bytes:
    return make_module(b"module-one")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[wasm_ecds.Cache]:
    # One attempt, short backoff: a failing fetch fails fast.
    with wasm_ecds.Cache(cache_dir=tmp_path / "cache", max_attempts=1) as c:
        yield c
