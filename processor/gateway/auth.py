"""Bearer keys: every /v1 and /beta call must carry one of the configured keys."""

from __future__ import annotations

import hmac

from aiohttp import web

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class BearerAuth:
    """Keys are compared in constant time, each of them every time, so the answer's timing says nothing
    about which key (or how much of one) matched."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        offered = token.strip().encode() if scheme.lower() == "bearer" else b""
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(offered, key)
        return matched


def openai_error(status: int, message: str, error_type: str, code: str | None = None) -> web.Response:
    """An error in the OpenAI API's shape, which its clients parse into their exceptions."""
    return web.json_response(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}, status=status
    )
