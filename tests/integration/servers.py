"""Helpers for the service tests: an ASGI app on a free 127.0.0.1 port in a uvicorn thread, for
as long as a test needs it, and a small index of given passages."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def running(app: Any) -> Iterator[str]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
