"""The gateway: an OpenAI-compatible proxy that moderates an LLM's reply through the workers as it
streams, and releases only text the verdicts have cleared (docs/gateway.md)."""
