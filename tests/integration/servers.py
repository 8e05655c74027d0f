"""Helpers for the service tests: an ASGI app on a free 127.0.0.1 port in a uvicorn thread, a
server process (``rag serve``, ``vllm serve``) on a free port, each for as long as a test needs
it, and a small index of given passages."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(app: Any) -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def passage_index(folder: Path, passages: list[tuple[str, str, str]]) -> Path:
    """An index (packaged MiniLM, flat) over ``(id, title, text)`` passages, in ``folder/idx``."""
    from rag.config import IndexRecipe
    from rag.index import build_index

    corpus = folder / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n" for i, t, x in passages))
    build_index(IndexRecipe(name=folder.name, corpus=str(corpus), out=str(folder / "idx")), progress=False)
    return folder / "idx"


@contextmanager
def server_process(command: Callable[[int], list[str]], log: Path, *, env: dict[str, str] | None = None,
                   start_timeout_s: float = 300) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``command(port)``, wait until ``GET /health`` answers 200, yield ``(base URL, process)``;
    afterwards SIGTERM it (unless a test already stopped it) and kill whatever of its process
    tree is left after 30 s."""
    import httpx
    import psutil

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(port), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    tree = psutil.Process(proc.pid)
    try:
        deadline = time.time() + start_timeout_s
        while True:
            assert proc.poll() is None, f"{command(port)[:3]} exited:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"server did not come up in {start_timeout_s}s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield base, proc
    finally:
        children = tree.children(recursive=True) if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
