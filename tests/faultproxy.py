"""A real HTTP proxy in front of the S3 test server that answers chosen requests with an error, as
a flaky network or a throttling store would: the storage code under test talks real S3 through it.
It forwards reads, listings and deletes (plain bodies); tests write through the server directly."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from s3server import free_ports


class FaultProxy:
    """Forwards everything to ``upstream``; the first ``times`` requests whose path ends with
    ``suffix`` get ``status`` instead (403 AccessDenied by default: the AWS SDK does not retry it)."""

    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.suffix, self.times, self.status, self.failed = "", 0, 403, 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = urlparse(self.path).path
                with proxy.lock:
                    fail = bool(proxy.suffix) and path.endswith(proxy.suffix) and proxy.failed < proxy.times
                    if fail:
                        proxy.failed += 1
                if fail:
                    payload = b"" if self.command == "HEAD" else (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                        b"<Message>injected by the test proxy</Message></Error>")
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if payload:
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer keeps the object's length (that is how clients learn a file's size).
                head_length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", head_length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD" and data:
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FaultProxy":
        self.thread.start()
        return self

    def fail(self, suffix: str, times: int, status: int = 403) -> None:
        with self.lock:
            self.suffix, self.times, self.status, self.failed = suffix, times, status, 0

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
