"""Settings come from HYPERLAW_* variables; the default database is a per-user SQLite file."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.core.config import Settings


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("HYPERLAW_DATABASE_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'hyperlaw' / 'hyperlaw.db'}"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.read_requires_token is False and settings.heartbeat_grace_s == 300
    assert settings.default_family == "step-law"
    assert (settings.worker_n_bootstrap, settings.worker_law_forms) == (None, True)


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("HYPERLAW_DATABASE_URL", "postgresql://u@db:5432/h")
    monkeypatch.setenv("HYPERLAW_PORT", "9000")
    monkeypatch.setenv("HYPERLAW_READ_REQUIRES_TOKEN", "true")
    monkeypatch.setenv("HYPERLAW_DEFAULT_FAMILY", "team-a")
    monkeypatch.setenv("HYPERLAW_WORKER_N_BOOTSTRAP", "0")
    monkeypatch.setenv("HYPERLAW_WORKER_LAW_FORMS", "false")
    settings = Settings()
    assert (settings.worker_n_bootstrap, settings.worker_law_forms) == (0, False)
    assert settings.default_family == "team-a"
    assert settings.database_url == "postgresql://u@db:5432/h"
    assert settings.port == 9000 and settings.read_requires_token is True


def test_bad_setting_names_the_field(monkeypatch):
    monkeypatch.setenv("HYPERLAW_HEARTBEAT_GRACE_S", "-1")
    with pytest.raises(ValidationError, match="heartbeat_grace_s"):
        Settings()
    monkeypatch.delenv("HYPERLAW_HEARTBEAT_GRACE_S")
    monkeypatch.setenv("HYPERLAW_WORKER_N_BOOTSTRAP", "-1")
    with pytest.raises(ValidationError, match="worker_n_bootstrap"):
        Settings()


def test_a_default_family_breaking_the_rule_is_refused(monkeypatch):
    monkeypatch.setenv("HYPERLAW_DEFAULT_FAMILY", "team a")
    with pytest.raises(ValidationError, match="default_family"):
        Settings()
