"""Test support: a real S3 API on 127.0.0.1 (a moto server), and a fault-injecting HTTP proxy in front of it.

Needs the `test` extra (``moto[server]``); nothing here is imported by perp itself.

    with moto_s3() as endpoint:                   # http://127.0.0.1:<free port>, credentials set in os.environ
        open_store("s3://bucket/prefix", endpoint_url=endpoint)

    with FaultProxy(endpoint, fail_every=3) as proxy:   # every 3rd request answers 503 SlowDown
        open_store("s3://bucket/prefix", endpoint_url=proxy.url)

moto checks a conditional write's precondition and then stores the object in two steps without a lock, so two
racing ``If-None-Match: *`` PUTs can both succeed there; S3 and MinIO apply them atomically. `moto_s3` therefore
serialises conditional requests (PUT/POST carrying If-Match or If-None-Match) by default, so that the server
honours the contract the registry relies on (pass ``atomic_conditional_writes=False`` for moto as it is).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _AtomicConditionalWrites:
    """WSGI middleware: conditional writes run one at a time (check-and-store becomes atomic)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        conditional = environ.get("REQUEST_METHOD") in ("PUT", "POST") and (
            "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ)
        if not conditional:
            return self.app(environ, start_response)
        with self.lock:
            return list(self.app(environ, start_response))


def _ignore_hang_ups(handle_error: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """A client closing a kept-alive connection (boto3's pool at exit) is not a server error worth a traceback."""

    def handle(request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        handle_error(request, client_address)

    return handle


@contextlib.contextmanager
def moto_s3(buckets: tuple[str, ...] = (), atomic_conditional_writes: bool = True,
            set_env: bool = True) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random free port) for the duration; yields its endpoint URL."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app: Any = DomainDispatcherApplication(create_backend_app)
            if atomic_conditional_writes:
                app = _AtomicConditionalWrites(app)
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=QuietHandler)
            setattr(self._server, "handle_error", _ignore_hang_ups(self._server.handle_error))
            self._server_ready_event.set()
            self._server.serve_forever()

    saved = {key: os.environ.get(key) for key in TEST_CREDENTIALS}
    if set_env:
        os.environ.update(TEST_CREDENTIALS)
    server = Server(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        if buckets:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint, **_client_credentials())
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
        if set_env:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def pruned_tiny_checkpoint(directory: Any, sparsity: float = 0.5, dtype: str = "bfloat16", seed: int = 0) -> Any:
    """A tiny LLaMA checkpoint (+ tokenizer) with `sparsity` of each decoder Linear zeroed by magnitude."""
    import re
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    from perp.models.tiny import save_tiny_model

    directory = save_tiny_model(Path(directory), "llama", seed=seed)
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    for name, tensor in tensors.items():
        if re.search(r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", name):
            k = int(tensor.numel() * sparsity)
            if k:
                threshold = tensor.abs().flatten().kthvalue(k).values
                tensor[tensor.abs() <= threshold] = 0
        tensors[name] = tensor.to(getattr(torch, dtype)).contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return directory


def cached_pruned_tiny(sparsity: float = 0.5, dtype: str = "bfloat16") -> Any:
    """`pruned_tiny_checkpoint`, built once into the perp cache and reused (tests must not modify it)."""
    from perp.io.atomic import atomic_directory, is_complete
    from perp.io.cache import cache_dir

    target = cache_dir("test-fixtures") / f"pruned-tiny-llama-v1-{dtype}-{sparsity}"
    if not is_complete(target):
        try:
            with atomic_directory(target, overwrite=False) as staging:
                pruned_tiny_checkpoint(staging, sparsity=sparsity, dtype=dtype)
        except FileExistsError:  # a concurrent run published it first; never replace a copy others may read
            if not is_complete(target):
                raise
    return target


def _client_credentials() -> dict[str, str]:
    return {"aws_access_key_id": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": TEST_CREDENTIALS["AWS_DEFAULT_REGION"]}


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "content-length"}


class FaultProxy:
    """An HTTP proxy to `upstream` that answers some requests itself with an S3 error instead of forwarding.

    `fail_every=N` fails every Nth request; `fail_first=N` fails the first N; `always=True` fails all. The
    failure is `status` with S3 error `code` (503 SlowDown: throttling). `requests` and `failures` count.
    """

    def __init__(self, upstream: str, fail_every: int = 0, fail_first: int = 0, always: bool = False,
                 status: int = 503, code: str = "SlowDown") -> None:
        self.upstream = urlsplit(upstream)
        self.fail_every, self.fail_first, self.always = fail_every, fail_first, always
        self.status, self.code = status, code
        self.requests = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.url = ""

    def _should_fail(self) -> bool:
        with self._lock:
            self.requests += 1
            n = self.requests
            fail = self.always or n <= self.fail_first or (self.fail_every and n % self.fail_every == 0)
            if fail:
                self.failures += 1
            return bool(fail)

    def __enter__(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                if proxy._should_fail():
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{proxy.code}</Code>'
                               f"<Message>injected by FaultProxy</Message></Error>").encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                assert proxy.upstream.hostname is not None
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP:
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
