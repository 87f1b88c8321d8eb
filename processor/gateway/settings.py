"""Every gateway setting in one object: GUARDSTREAM_GATEWAY_* environment variables, overridden by flags."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from processor.events import DEFAULT_TOKENS_TOPIC, DEFAULT_VERDICTS_TOPIC
from processor.kafka_connection import KafkaConnection
from processor.model.labels import Policy

Release = Literal["hold", "live", "audit"]
PromptCheck = Literal["block", "parallel", "off"]
FailMode = Literal["closed", "open"]


def _default_gateway_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


class GatewaySettings(KafkaConnection):
    model_config = SettingsConfigDict(env_prefix="GUARDSTREAM_GATEWAY_", extra="ignore")

    listen: str = Field(default="127.0.0.1:8000", description="HOST:PORT to serve on.")
    upstream: str = Field(
        default="http://127.0.0.1:8001/v1",
        description="Base URL of the OpenAI-compatible LLM server (…/v1); /chat/completions is appended.",
    )
    upstream_api_key: SecretStr | None = Field(default=None, description="Bearer key for the upstream.")
    upstream_timeout: float = Field(
        default=60.0, gt=0, description="Seconds the upstream may stay silent (connect, or between chunks)."
    )
    model: str = Field(
        default="", description="Checkpoint folder or hub id: its tokenizer and label maps, no weights."
    )

    # What the gateway enforces.
    release: Release = Field(
        default="hold",
        description="hold: release text once verdicts clear it; live: pass through, cut at the alert; "
        "audit: pass through, only record verdicts.",
    )
    prompt_check: PromptCheck = Field(
        default="block",
        description="block: call the upstream once the prompt is Safe; parallel: call it at once, cut if "
        "the prompt flags; off: do not wait for the prompt's verdict.",
    )
    policy: Policy = Field(
        default=Policy.STRICT,
        description="How Controversial tokens count when holding back; match the workers' --policy.",
    )
    verdict_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a token or the prompt may wait for its verdict."
    )
    fail: FailMode = Field(
        default="closed",
        description="When a verdict is late: closed ends the reply with content_filter; open releases "
        "the text.",
    )

    # Who gets in.
    api_keys: str | None = Field(
        default=None,
        description="Bearer keys callers must send: a file (one key a line) or env:VARIABLE (keys "
        "separated by commas or newlines).",
    )
    insecure_no_auth: bool = Field(
        default=False, description="Serve without keys on a non-loopback address (anyone may call)."
    )

    # Kafka topics and this replica's name (the connection: KafkaConnection).
    tokens_topic: str = DEFAULT_TOKENS_TOPIC
    verdicts_topic: str = DEFAULT_VERDICTS_TOPIC
    gateway_id: str = Field(
        default_factory=_default_gateway_id,
        description="Names this replica in Kafka client ids and conversation ids it makes "
        "(default: the host name and a random suffix).",
    )
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest request body.")

    @property
    def host_port(self) -> tuple[str, int]:
        host, separator, port = self.listen.rpartition(":")
        if not separator or not port.isdigit():
            raise ValueError(f"--listen {self.listen!r}: expected HOST:PORT")
        return host.strip("[]") or "0.0.0.0", int(port)

    def kafka_client_id(self) -> str:
        return f"guardstream-gateway-{self.gateway_id}"

    def load_api_keys(self) -> list[str]:
        """The configured keys; empty when none are. Raises ValueError naming what is missing."""
        if not self.api_keys:
            return []
        if self.api_keys.startswith("env:"):
            name = self.api_keys[4:]
            if name not in os.environ:
                raise ValueError(f"--api-keys env:{name}: the environment variable {name} is not set")
            text = os.environ[name]
        else:
            path = Path(self.api_keys).expanduser()
            if not path.is_file():
                raise ValueError(f"--api-keys {self.api_keys}: no such file (or use env:VARIABLE)")
            text = path.read_text()
        keys = [
            key.strip()
            for line in text.splitlines()
            for key in line.split(",")
            if key.strip() and not key.strip().startswith("#")
        ]
        if not keys:
            raise ValueError(f"--api-keys {self.api_keys}: no keys in it")
        return keys

    def check_exposure(self, has_keys: bool) -> None:
        """Without keys, only a loopback address unless --insecure-no-auth says otherwise."""
        if has_keys or self.insecure_no_auth:
            return
        host, _ = self.host_port
        if host == "localhost":
            return
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"--listen {self.listen} is not a loopback address and no --api-keys are configured: "
                "set --api-keys, listen on 127.0.0.1, or pass --insecure-no-auth"
            )

    def redacted(self) -> dict[str, object]:
        """For the startup log line: secrets masked (SecretStr), the key source named, never the keys."""
        return self.model_dump(mode="json")
