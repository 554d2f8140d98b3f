"""A real uvicorn server on 127.0.0.1 for the server tests, and a client for it."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from shadowkv import LLM
from shadowkv.server import create_app


@dataclass
class Live:
    """A running server: base ``url``, the ``llm`` it serves and an authorised httpx client."""

    url: str
    llm: LLM
    client: httpx.Client

    def metrics(self) -> dict[str, float]:
        text = self.client.get("/metrics").text
        return {
            m.group(1): float(m.group(2))
            for m in re.finditer(r"^(shadowkv_\S+) (\S+)$", text, re.M)
        }

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["shadowkv_running_requests"] == 0 and m["shadowkv_queue_length"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout} s: {m}")
            time.sleep(0.1)


@contextmanager
def serve(llm: LLM, name: str, api_key: str | None = None, **settings: Any) -> Iterator[Live]:
    app = create_app(llm, name, api_key=api_key, **settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        try:
            yield Live(url, llm, client)
        finally:
            server.should_exit = True
            thread.join(60)
