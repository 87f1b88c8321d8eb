"""Writes `schemas/*.schema.json` from the wire schema's models: `python -m processor.schemas`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import TypeAdapter

from processor.events import TokenEvent, VerdictEvent

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
SCHEMA_FILES: dict[str, type] = {
    "token_event.schema.json": TokenEvent,
    "verdict_event.schema.json": VerdictEvent,
}


def render_schema(event_type: type) -> str:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **TypeAdapter(event_type).json_schema(),
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(directory: Path = SCHEMA_DIR) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, event_type in SCHEMA_FILES.items():
        (directory / file_name).write_text(render_schema(event_type))
        print(f"wrote {directory / file_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
