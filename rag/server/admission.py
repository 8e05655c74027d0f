"""Admission of requests that generate: the in-flight bound, the per-request timeout, client
disconnects and shutdown.

Each admitted request's event stream (a pipeline's answer events, or a generator's output) runs
as its own task; events reach the response through a queue, so the response can stop waiting
(timeout, disconnect, shutdown) and cancel the task, which aborts its generation. Used only on
the event loop's thread: no lock is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Generic, TypeVar

from fastapi import Request

from rag.server.errors import HTTPError
from rag.server.metrics import Metrics

E = TypeVar("E")
_END = object()  # a work's events are over


class Disconnected(Exception):
    """The client went away; nobody reads the answer."""


class Work(Generic[E]):
    """One admitted request's event stream, pumped into a queue by its own task."""

    def __init__(self, events: AsyncIterator[E]):
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump(events))

    async def _pump(self, events: AsyncIterator[E]) -> None:
        try:
            async for event in events:
                self.queue.put_nowait(event)
            self.queue.put_nowait(_END)
        except Exception as e:  # delivered to the response; CancelledError ends the task
            self.queue.put_nowait(e)

    def abort(self, reason: HTTPError) -> None:
        self.task.cancel()
        self.queue.put_nowait(reason)


class Admission:
    """The bound on requests being answered (streaming or not), their deadlines, and their
    handles, so that a shutdown can abort them."""

    def __init__(self, limit: int, timeout_s: float, metrics: Metrics):
        self.limit, self.timeout_s, self.metrics = limit, timeout_s, metrics
        self.running: set[Work[object]] = set()
        self.closing = False

    def admit(self, events: AsyncIterator[E]) -> Work[E]:
        if self.closing:
            raise _shutting_down()
        if len(self.running) >= self.limit:
            raise HTTPError(429, "the server is busy; retry later", type="rate_limit_error",
                            code="queue_full", headers={"Retry-After": "1"})
        work = Work(events)
        self.running.add(work)  # type: ignore[arg-type]
        self.metrics.queue_depth.set(len(self.running))
        return work

    def done(self, work: Work[E]) -> None:
        work.task.cancel()
        self.running.discard(work)  # type: ignore[arg-type]
        self.metrics.queue_depth.set(len(self.running))

    def abort_all(self) -> None:
        self.closing = True
        for work in list(self.running):
            work.abort(_shutting_down())

    async def events(self, work: Work[E], request: Request) -> AsyncIterator[E]:
        """The work's events until its last; `HTTPError` 504 past the deadline, `Disconnected`
        when the client went away (checked whenever no event came for half a second)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HTTPError(504, f"the request took longer than {self.timeout_s:g}s",
                                type="server_error", code="timeout")
            try:
                item = await asyncio.wait_for(work.queue.get(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise Disconnected from None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    async def result(self, work: Work[E], request: Request) -> E | None:
        """A JSON request's final event (its work done); None when the client went away."""
        last = None
        try:
            async for last in self.events(work, request):  # noqa: B007
                pass
        except Disconnected:
            return None
        except Exception as e:
            raise HTTPError.of(e) from None
        finally:
            self.done(work)
        return last

    async def sse(self, work: Work[E], request: Request, render: Callable[[E], Iterable[str]]
                  ) -> AsyncIterator[str]:
        """Server-sent events of a streaming request: ``render``'s data for each event; an error
        event when it fails, times out or the server stops; then ``[DONE]``."""
        try:
            async for event in self.events(work, request):
                for data in render(event):
                    yield data
        except Disconnected:
            return
        except Exception as e:
            yield HTTPError.of(e).event()
        finally:
            self.done(work)
        yield "[DONE]"


def _shutting_down() -> HTTPError:
    return HTTPError(503, "the server is shutting down", type="server_error", code="shutting_down")
