"""Who may call what: API keys for the prediction routes, the admin token for reloads.

Secrets are compared in constant time, so response timing does not leak them.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Header

from serving.errors import ApiError


def secret_matches(offered: str | None, secrets: list[str]) -> bool:
    if not offered:
        return False
    return any(hmac.compare_digest(offered.encode(), s.encode()) for s in secrets)


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def api_key_dependency(keys: list[str]) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that refuses requests without one of `keys` (401)."""

    async def check_key(authorization: str | None = Header(None),
                        x_api_key: str | None = Header(None)) -> None:
        if not secret_matches(x_api_key or bearer(authorization), keys):
            raise ApiError(401, "unauthorized", "a valid API key is required "
                           "(Authorization: Bearer <key>, or X-API-Key)")

    async def no_key() -> None:
        """API keys are off: nothing to check, and no header parsing per request."""

    return check_key if keys else no_key


def check_admin(token: str | None, authorization: str | None) -> None:
    """404 while the admin API is off, 401 without the right token."""
    if not token:
        raise ApiError(404, "disabled", "the admin API is off (set TEXTOPS_ADMIN_TOKEN)")
    if not secret_matches(bearer(authorization), [token]):
        raise ApiError(401, "unauthorized", "a valid admin token is required")
