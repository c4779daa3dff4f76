"""Settings are validated where they are read: a bad one stops `agencyllm up` and the Serve
application builder at once, naming the variable, instead of failing inside a Ray replica."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agencyllm.serving.settings import ClientSettings, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("AGENCYLLM_QUOTA_TIMEZONE", "Mars/Olympus", "is not a time zone"),
        ("AGENCYLLM_QUOTA_TIMEZONE", "../../etc/passwd", "is not a time zone"),
        ("AGENCYLLM_OIDC_ISSUER", "keycloak.agency.example/realms/agency", "http(s) URL"),
        ("AGENCYLLM_PUBLIC_URL", "llm.agency.example", "http(s) URL"),
        ("AGENCYLLM_PORT", "eighty", "valid integer"),
        ("AGENCYLLM_AUDIT_RETENTION_DAYS", "30", "greater than or equal to 90"),
        ("AGENCYLLM_RAY_ADDRESS", "ray://head:10001", "not a Ray head address"),
        ("AGENCYLLM_RAY_ADDRESS", "head", "not a Ray head address"),
        ("AGENCYLLM_RAY_ADDRESS", "head:99999", "not a Ray head address"),
    ],
)
def test_a_bad_setting_is_refused_by_name(monkeypatch, variable, value, said):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as err:
        Settings()
    assert f"{variable}: " in str(err.value) and said in str(err.value)


def test_good_settings_pass(monkeypatch):
    monkeypatch.setenv("AGENCYLLM_QUOTA_TIMEZONE", "America/New_York")
    monkeypatch.setenv("AGENCYLLM_OIDC_ISSUER", "")  # empty: API keys only, as before
    settings = Settings()
    assert (settings.quota_timezone, settings.oidc_issuer) == ("America/New_York", None)


def test_the_application_builder_refuses_bad_settings_before_building(monkeypatch, tmp_path):
    from agencyllm.serving.ops.placeholder import write_placeholder_model
    from agencyllm.serving.rayserve.app import build_app

    model = write_placeholder_model(tmp_path / "model")
    monkeypatch.setenv("AGENCYLLM_DATABASE_URL", "postgresql://agencyllm@db.invalid/agencyllm")
    monkeypatch.setenv("AGENCYLLM_QUOTA_TIMEZONE", "Mars/Olympus")
    with pytest.raises(SettingsError, match="AGENCYLLM_QUOTA_TIMEZONE"):
        build_app({"models": [{"id": "m", "path": str(model)}]})


def test_up_stops_at_once_on_a_bad_setting(monkeypatch, tmp_path, capsys):
    from agencyllm.serving.cli import main as cli

    monkeypatch.setenv("AGENCYLLM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AGENCYLLM_QUOTA_TIMEZONE", "Mars/Olympus")
    with pytest.raises(SystemExit) as exited:
        cli.main(["up"])
    assert exited.value.code == 2
    assert "AGENCYLLM_QUOTA_TIMEZONE: 'Mars/Olympus' is not a time zone" in capsys.readouterr().err
    assert not (tmp_path / "data").exists(), "something started before the settings were checked"


def test_the_admin_cli_reads_its_own_settings(monkeypatch):
    monkeypatch.setenv("AGENCYLLM_URL", "https://llm.agency.example")
    monkeypatch.setenv("AGENCYLLM_API_KEY", "sk-agency-x")
    monkeypatch.setenv("AGENCYLLM_QUOTA_TIMEZONE", "Mars/Olympus")  # a server setting: not the CLI's concern
    client = ClientSettings()
    assert (client.url, client.api_key.get_secret_value()) == ("https://llm.agency.example", "sk-agency-x")


ENV_READ = re.compile(r"""(os\.environ(\.get)?\s*[\[(]|os\.getenv\s*\()\s*["']AGENCYLLM_""")


@pytest.mark.parametrize("package", ["serving", "auth", "quotas", "migrations"])
def test_no_module_reads_agencyllm_variables_past_the_settings(package):
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / package).rglob("*.py")
        if ENV_READ.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_the_ingress_stays_on_the_head_when_joining_a_cluster_unless_told_otherwise():
    assert not Settings().ingress_pinned_to_head
    assert Settings(ray_address="10.0.0.1:6379").ingress_pinned_to_head
    assert not Settings(ray_address="10.0.0.1:6379", ingress_on_head=False).ingress_pinned_to_head
    assert Settings(ingress_on_head=True).ingress_pinned_to_head
