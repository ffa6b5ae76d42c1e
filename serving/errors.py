"""`ApiError`: a refusal as clients read it, with a status, a stable code and a
message for people. The engine raises it as the routes do; serving/api/errors.py
answers it on every route.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered with `status`, a stable `code` and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None,
                 **details):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.details = headers, details

    def response(self, v2: bool = False) -> JSONResponse:
        if v2:
            status = 400 if self.status == 422 else self.status
            return JSONResponse({"error": self.message}, status_code=status,
                                headers=self.headers)
        body = {"error": self.message, "code": self.code, **self.details}
        return JSONResponse(body, status_code=self.status, headers=self.headers)
