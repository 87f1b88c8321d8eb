"""Settings: environment and flags, and secrets that never show."""

from __future__ import annotations

import logging

import pytest

from processor.cli.settings_flags import settings_from_flags
from processor.cli.worker import register
from processor.engine import EngineConfig
from processor.worker.serve import engine_config
from processor.worker.settings import WorkerSettings, redact_url


def test_environment_prefix(monkeypatch):
    monkeypatch.setenv("GUARDSTREAM_PARTITIONS", "3")
    monkeypatch.setenv("GUARDSTREAM_POLICY", "loose")
    settings = WorkerSettings()
    assert settings.partitions == 3 and settings.policy.value == "loose"
    assert settings.tokens_topic == "guard.tokens" and settings.session_ttl == 86400


def test_flags_override_environment(monkeypatch):
    import argparse

    monkeypatch.setenv("GUARDSTREAM_PARTITIONS", "3")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["worker", "--partitions", "5", "--template", "raw", "--kafka-bootstrap", "k:1"])
    settings = settings_from_flags(WorkerSettings, args)
    assert settings.partitions == 5 and settings.template == "raw" and settings.kafka_bootstrap == "k:1"


def test_worker_help_lists_every_setting_and_its_default(capsys, monkeypatch):
    """argparse %-formats help texts: a literal % in a description must not break `worker --help`."""
    from processor.cli import build_parser

    field = WorkerSettings.model_fields["kv_cache_fraction"]
    monkeypatch.setattr(field, "description", "Share of free GPU memory (80% is 0.8).")
    with pytest.raises(SystemExit) as exited:
        build_parser("worker").parse_args(["worker", "--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for name in WorkerSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in shown, name
    assert "(80% is 0.8)" in shown
    assert f"Tokens one engine step runs at most. (default: {EngineConfig.max_batch_tokens})" in shown


def test_engine_defaults_are_the_engine_configs():
    assert engine_config(WorkerSettings()) == EngineConfig()


def test_secrets_never_logged(caplog):
    settings = WorkerSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="svc",
        sasl_password="hunter2-secret",
        redis_url="rediss://default:redis-secret@cache:6380/0",
    )
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("settings: %s", settings.redacted())
        logging.getLogger("test").info("repr: %r", settings)
    assert "hunter2-secret" not in caplog.text and "redis-secret" not in caplog.text
    assert settings.kafka_options()["sasl_plain_password"] == "hunter2-secret"


def test_sasl_needs_credentials():
    with pytest.raises(ValueError, match="needs sasl_mechanism"):
        WorkerSettings(security_protocol="SASL_PLAINTEXT")


def test_redact_url():
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_attention_backend_and_cache_dtype_reach_the_engine_config(monkeypatch):
    assert engine_config(WorkerSettings()).attention_backend == "auto"
    assert engine_config(WorkerSettings()).kv_cache_dtype == "auto"
    monkeypatch.setenv("GUARDSTREAM_ATTENTION_BACKEND", "sdpa")
    monkeypatch.setenv("GUARDSTREAM_KV_CACHE_DTYPE", "float16")
    assert engine_config(WorkerSettings()).attention_backend == "sdpa"
    assert engine_config(WorkerSettings()).kv_cache_dtype == "float16"
    with pytest.raises(ValueError, match="attention_backend"):
        WorkerSettings(attention_backend="fastest")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        WorkerSettings(kv_cache_dtype="int8")
