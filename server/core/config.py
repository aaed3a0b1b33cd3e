"""Service configuration: one pydantic-settings ``Settings`` read from ``HYPERLAW_*``.

Every field can be set from the environment, e.g. ``HYPERLAW_DATABASE_URL``,
``HYPERLAW_PORT``, ``HYPERLAW_ACCESS_LOG=true`` or ``HYPERLAW_READ_REQUIRES_TOKEN=true``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from client.wire import FAMILY_NAME_PATTERN

#: The family of the bundled Step Law sweep (``hyperlaw import steplaw``), served by default.
STEP_LAW_FAMILY = "step-law"


def default_database_url() -> str:
    """An SQLite file in the per-user data directory (created on demand)."""
    data_dir = Path(platformdirs.user_data_dir("hyperlaw", appauthor=False))
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data_dir / 'hyperlaw.db'}"


class Settings(BaseSettings):
    """All knobs of the service; the environment prefix is ``HYPERLAW_``."""

    model_config = SettingsConfigDict(env_prefix="HYPERLAW_", extra="ignore")

    database_url: str = Field(
        default_factory=default_database_url,
        description="SQLAlchemy URL; PostgreSQL for teams (a plain postgresql://user@host/db "
        "uses psycopg2: server.core.db.engine_url), an SQLite file by default.",
    )
    host: str = Field(default="127.0.0.1", description="address `hyperlaw serve` binds")
    port: int = Field(default=8000, gt=0, lt=65536, description="port `hyperlaw serve` binds")
    access_log: bool = Field(
        default=False,
        description="`hyperlaw serve` logs one line per request (uvicorn's access log, on "
        "stderr); `hyperlaw serve --access-log` turns it on too",
    )
    read_requires_token: bool = Field(
        default=False, description="when true, GET routes need a token with read scope"
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to call the API (CORS), as a JSON list, e.g. "
        '["https://dash.example"]; empty (the default): no CORS headers at all',
    )
    max_body_bytes: int = Field(
        default=8 * 2**20,
        gt=0,
        description="the largest request body, in bytes (413 beyond it, before parsing or "
        "auth). 8 MiB: a full points batch (10,000 points, every value column, 19-digit "
        "steps and 17-digit floats) is 3.6 MB as client.wire writes it and 4.5 MB "
        "pretty-printed; every other body is a few KB",
    )
    heartbeat_grace_s: float = Field(
        default=300.0, gt=0, description="a running trial silent this long is marked failed"
    )
    reaper_interval_s: float = Field(
        default=30.0, gt=0, description="how often the stale-trial reaper looks"
    )
    default_family: str = Field(
        default=STEP_LAW_FAMILY,
        pattern=FAMILY_NAME_PATTERN,
        description="the family /v1/recommendations and `hyperlaw recommend` answer for "
        "when the query names none",
    )
    worker_poll_s: float = Field(
        default=2.0, gt=0, description="fitting worker poll period where NOTIFY is unavailable"
    )
    worker_n_bootstrap: int | None = Field(
        default=None,
        ge=0,
        description="bootstrap draws of every fit the worker runs (their intervals); unset: "
        "each fit's own default; 0: no intervals, several times faster",
    )
    worker_law_forms: bool = Field(
        default=True,
        description="the worker's recommender averages the law forms its data cannot tell "
        "apart (fitting.extrapolation); false: the one surface, faster",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
