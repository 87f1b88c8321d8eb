"""Gateway settings: where keys come from, and who may be served without them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from processor.gateway.auth import BearerAuth
from processor.gateway.settings import GatewaySettings


def test_environment_variables_configure_the_gateway(monkeypatch) -> None:
    monkeypatch.setenv("GUARDSTREAM_GATEWAY_RELEASE", "live")
    monkeypatch.setenv("GUARDSTREAM_GATEWAY_VERDICT_TIMEOUT", "2.5")
    settings = GatewaySettings()
    assert (settings.release, settings.verdict_timeout, settings.fail) == ("live", 2.5, "closed")


def test_keys_come_from_a_file_or_an_environment_variable(tmp_path, monkeypatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nalpha\n\nbeta, gamma\n")
    assert GatewaySettings(api_keys=str(keys)).load_api_keys() == ["alpha", "beta", "gamma"]
    monkeypatch.setenv("CALLER_KEYS", "one,two")
    assert GatewaySettings(api_keys="env:CALLER_KEYS").load_api_keys() == ["one", "two"]
    assert GatewaySettings().load_api_keys() == []
    with pytest.raises(ValueError, match="MISSING_KEYS"):
        GatewaySettings(api_keys="env:MISSING_KEYS").load_api_keys()
    with pytest.raises(ValueError, match="no such file"):
        GatewaySettings(api_keys=str(tmp_path / "absent")).load_api_keys()


@pytest.mark.parametrize(
    ("listen", "keys", "insecure", "allowed"),
    [
        ("127.0.0.1:8000", False, False, True),
        ("localhost:8000", False, False, True),
        ("[::1]:8000", False, False, True),
        ("0.0.0.0:8000", False, False, False),
        ("10.0.0.5:8000", False, False, False),
        ("0.0.0.0:8000", True, False, True),
        ("0.0.0.0:8000", False, True, True),
    ],
)
def test_without_keys_only_loopback_is_served_unless_insecure(listen, keys, insecure, allowed) -> None:
    settings = GatewaySettings(listen=listen, insecure_no_auth=insecure)
    if allowed:
        settings.check_exposure(keys)
    else:
        with pytest.raises(ValueError, match="--insecure-no-auth"):
            settings.check_exposure(keys)


def test_bearer_keys_match_exactly() -> None:
    auth = BearerAuth(["secret-one", "secret-two"])
    assert auth.allows("Bearer secret-one") and auth.allows("bearer secret-two")
    for header in (
        None,
        "",
        "Bearer",
        "Bearer secret",
        "Bearer secret-one2",
        "Basic secret-one",
        "secret-one",
    ):
        assert not auth.allows(header)
    assert BearerAuth([]).allows(None), "no keys configured: auth is off (loopback only)"


def test_local_help_imports_neither_the_gateway_nor_torch() -> None:
    code = (
        "import sys; from processor.cli import build_parser; build_parser('local');"
        "print('processor.gateway' in sys.modules, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_the_cli_refuses_an_exposed_address_without_keys() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "processor.cli", "gateway", "--model", "unused", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--insecure-no-auth" in result.stderr
