"""Dead-letter records: a token event the worker could not use, kept whole enough to inspect and replay."""

from __future__ import annotations

import base64
import time
from typing import Literal

from pydantic import BaseModel

# A rejected record may be near Kafka's size limit already; base64 and the envelope must not push the
# dead letter past it, so values beyond this are cut (and say so).
MAX_KEPT_BYTES = 65_536


class DeadLetter(BaseModel):
    topic: str
    partition: int
    offset: int
    key: str | None
    key_encoding: Literal["utf-8", "base64"] = "utf-8"
    value: str | None
    value_encoding: Literal["utf-8", "base64"] = "utf-8"
    value_truncated: bool = False
    reason: str
    worker: str
    ts: float


def _encode(data: bytes | None) -> tuple[str | None, Literal["utf-8", "base64"]]:
    if data is None:
        return None, "utf-8"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def dead_letter(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str, worker: str
) -> DeadLetter:
    truncated = value is not None and len(value) > MAX_KEPT_BYTES
    if truncated:
        value = value[:MAX_KEPT_BYTES]
    key_text, key_encoding = _encode(key)
    value_text, value_encoding = _encode(value)
    return DeadLetter(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key_text,
        key_encoding=key_encoding,
        value=value_text,
        value_encoding=value_encoding,
        value_truncated=truncated,
        reason=reason,
        worker=worker,
        ts=time.time(),
    )
