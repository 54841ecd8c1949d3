"""`attention-client explore`: a small local web server that talks to the gRPC
service. A person types a sentence, picks a layer and head, and sees the head
view and the "from word, to word, strength" table update."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from ._client import AttentionClient
from .errors import AttentionError, InvalidArgumentError
from .results import ModelInfo
from .viz import render_page, view_data

log = logging.getLogger(__name__)
MAX_TEXT = 2000


class Explorer:
    def __init__(self, client: AttentionClient, model: str = "") -> None:
        self.client = client
        self.model = model
        self._info: ModelInfo | None = None
        self._lock = threading.Lock()

    def info(self) -> ModelInfo:
        with self._lock:
            if self._info is None:
                self._info = self.client.get_model(self.model)
            return self._info

    def analyze(self, text: str) -> dict[str, Any]:
        result = self.client.analyze(text, model=self.model, word_level=True, head_statistics=True,
                                     hidden_states=False)
        return view_data(result, self.info())

    def handler(self) -> type[BaseHTTPRequestHandler]:
        explorer = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path in ("/", "/index.html"):
                    self._send(200, render_page(None, "explore").encode(), "text/html; charset=utf-8")
                elif url.path == "/api/analyze":
                    text = parse_qs(url.query).get("text", [""])[0]
                    if not text.strip() or len(text) > MAX_TEXT:
                        body = {"error": f"text: give 1 to {MAX_TEXT} characters"}
                        self._send(400, json.dumps(body).encode(), "application/json")
                        return
                    try:
                        body = explorer.analyze(text)
                    except AttentionError as exc:
                        self._send(400 if isinstance(exc, InvalidArgumentError) else 502,
                                   json.dumps({"error": str(exc)}).encode(), "application/json")
                        return
                    self._send(200, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found", "text/plain")

            def log_message(self, fmt: str, *args: Any) -> None:
                log.info("%s " + fmt, self.address_string(), *args)

        return Handler

    def server(self, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
        return ThreadingHTTPServer((host, port), self.handler())
