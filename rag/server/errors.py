"""Every error the service answers, in OpenAI's error shape, from one place.

`HTTPError` is what routes raise for bad requests; a `RagError` answers with its class's
``http_status``/``http_type`` (`rag.errors`); FastAPI's validation errors are 400 with the one
validation wording; its own 404/405 and anything unexpected keep their status but the shape.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rag.errors import RagError, field_path, validation_message
from rag.server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """A request the service refuses: status, message, OpenAI error type, param and code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    @classmethod
    def of(cls, e: BaseException) -> HTTPError:
        """Any exception as the error the client sees."""
        if isinstance(e, HTTPError):
            return e
        if isinstance(e, RagError):
            return cls(e.http_status, str(e), type=e.http_type, code=type(e).__name__)
        if isinstance(e, RequestValidationError):
            errs = e.errors()
            if errs and errs[0].get("type") == "json_invalid":
                return cls(400, f"malformed JSON body: {errs[0].get('msg')}")
            param = field_path(errs[0].get("loc", ()), drop=("body",)) if errs else None
            if errs and errs[0].get("type") == "extra_forbidden":
                return cls(400, f"unknown field '{param}': this server does not know it; remove it (docs/serving.md "
                                "lists the fields honoured, accepted and refused)", param=param, code="unknown_field")
            return cls(400, validation_message(errs, drop=("body",)), param=param or None)
        if isinstance(e, StarletteHTTPException):
            kind = "invalid_request_error" if e.status_code < 500 else "server_error"
            return cls(e.status_code, str(e.detail), type=kind, headers=dict(e.headers or {}))
        log.exception("unexpected error", exc_info=e)
        return cls(500, f"internal error ({type(e).__name__}); see the server log", type="server_error")

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)

    def event(self) -> str:
        """The error as one server-sent event's data (after which the stream ends)."""
        return json.dumps(self.body().model_dump())


async def _handle(_: Request, e: Exception) -> JSONResponse:
    return HTTPError.of(e).response()


def install(app: FastAPI) -> None:
    """One handler for every error class the app can meet."""
    for cls in (HTTPError, RagError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, _handle)
