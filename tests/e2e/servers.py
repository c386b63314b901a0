"""Tiny loopback servers for the end-to-end test, each run as its own process.

    python servers.py upstream        HTTP server answering 200 "upstream ok" to any method
    python servers.py files DIR       HTTP server serving the files of DIR (the Wasm module server);
                                      every request is logged to stderr as "GET /path -> status"
    python servers.py echo            TCP echo server

Each binds 127.0.0.1 on a port the kernel picks and prints "PORT <n>" as its first stdout line.
"""

import http.server
import os
import socketserver
import sys


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = b"upstream ok\n"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, fmt, *args):
        pass


class Files(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-"):
        sys.stderr.write(f"{self.command} {self.path} -> {code}\n")
        sys.stderr.flush()


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    mode = sys.argv[1]
    if mode == "upstream":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    elif mode == "files":
        directory = os.path.abspath(sys.argv[2])

        def handler(*a, **kw):
            return Files(*a, directory=directory, **kw)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    elif mode == "echo":
        server = ThreadingTCPServer(("127.0.0.1", 0), Echo)
    else:
        sys.exit(f"unknown mode {mode!r}")
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
