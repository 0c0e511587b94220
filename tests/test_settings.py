from __future__ import annotations

from pathlib import Path

import pytest

from app.config import (
    DatabaseSettings,
    ServerSettings,
    Settings,
    SettingsError,
    load_settings,
    read_env_file,
)

EVERY_VARIABLE = {
    "DATABASE_URL": "postgresql+asyncpg://svc:secret@db.internal:6543/activity",
    "DATABASE_POOL_SIZE": "7",
    "APPEND_MAX_BATCH": "500",
    "HEARTBEAT_SECONDS": "2.5",
    "SSE_RETRY_MS": "1500",
    "SSE_WRITE_TIMEOUT_SECONDS": "0.75",
    "TAIL_POLL_SECONDS": "0.1",
}


def test_defaults_run_embedded_on_sqlite() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.database.url == "sqlite+aiosqlite:///./data/events.db"
    assert settings.server.heartbeat_seconds == 15.0
    assert settings.server.retry_ms == 3000


def test_every_variable_is_parsed() -> None:
    assert load_settings(EVERY_VARIABLE) == Settings(
        database=DatabaseSettings(
            url="postgresql+asyncpg://svc:secret@db.internal:6543/activity",
            pool_size=7,
            max_batch_events=500,
        ),
        server=ServerSettings(
            heartbeat_seconds=2.5, retry_ms=1500, write_timeout_seconds=0.75, poll_seconds=0.1
        ),
    )


def test_empty_values_mean_default_and_unknown_variables_are_ignored() -> None:
    settings = load_settings({"HEARTBEAT_SECONDS": "", "DATABASE_URL": "", "PATH": "/bin"})
    assert settings == Settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_POOL_SIZE", "abc"),
        ("DATABASE_POOL_SIZE", "1.5"),
        ("DATABASE_POOL_SIZE", "0"),
        ("DATABASE_POOL_SIZE", "-3"),
        ("APPEND_MAX_BATCH", "many"),
        ("APPEND_MAX_BATCH", "0"),
        ("HEARTBEAT_SECONDS", "abc"),
        ("HEARTBEAT_SECONDS", "0"),
        ("HEARTBEAT_SECONDS", "-1"),
        ("HEARTBEAT_SECONDS", "nan"),
        ("HEARTBEAT_SECONDS", "inf"),
        ("SSE_RETRY_MS", "1.5"),
        ("SSE_RETRY_MS", "-5"),
        ("SSE_WRITE_TIMEOUT_SECONDS", "soon"),
        ("SSE_WRITE_TIMEOUT_SECONDS", "0"),
        ("SSE_WRITE_TIMEOUT_SECONDS", "inf"),
        ("TAIL_POLL_SECONDS", "x"),
        ("TAIL_POLL_SECONDS", "0"),
        ("TAIL_POLL_SECONDS", "nan"),
        ("DATABASE_URL", "mysql://root@localhost/db"),
        ("DATABASE_URL", "events.db"),
        ("DATABASE_URL", "postgresql+asyncpg://svc@db.internal:port/activity"),
        ("DATABASE_URL", "sqlite+aiosqlite://"),
        ("DATABASE_URL", "sqlite+aiosqlite:///:memory:"),
        ("RETENTION_RULES", "agent/heartbeat"),
        ("RETENTION_RULES", "agent=7 days"),
        ("RETENTION_RULES", "agent=-1d"),
        ("RETENTION_RULES", "agent/heartbeat=7d,agent/heartbeat=1d"),
        ("RETENTION_RULES", "a gent=7d"),
        ("RETENTION_INTERVAL_SECONDS", "0"),
        ("RETENTION_BATCH_EVENTS", "0"),
        ("RETENTION_DELETE_ROWS", "0"),
        ("SNAPSHOT_EVERY_EVENTS", "-1"),
        ("SNAPSHOTS_KEPT", "0"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({variable: value})
    assert variable in str(caught.value)


def test_retention_rules_are_read_most_specific_first() -> None:
    from app.config.retention import RetentionRule

    settings = load_settings({"RETENTION_RULES": "agent/heartbeat=7d, agent=90d,ingest=keep,*=12h"})
    assert settings.retention.parsed_rules() == [
        RetentionRule("agent", "heartbeat", 7 * 86400),
        RetentionRule("agent", "*", 90 * 86400),
        RetentionRule("ingest", "*", None),
        RetentionRule("*", "*", 12 * 3600),
    ]
    assert [rule.label for rule in settings.retention.parsed_rules()] == [
        "agent/heartbeat=7d",
        "agent=90d",
        "ingest=keep",
        "*=12h",
    ]


def test_a_refused_database_url_does_not_echo_its_password() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"DATABASE_URL": "postgresql+asyncpg://svc:hunter2@db:notaport/activity"})
    assert "DATABASE_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_env_file_syntax(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(
        "# the service's settings\n"
        "\n"
        "DATABASE_URL=sqlite+aiosqlite:///./elsewhere.db\n"
        "   # an indented comment\n"
        'export HEARTBEAT_SECONDS="4"\n'
        "SSE_RETRY_MS='2500'\n"
        "  TAIL_POLL_SECONDS = 0.5  \n"
        'GREETING="hello # not a comment"\n'
        "EMPTY=\n"
        "EQUALS=a=b=c\n",
        encoding="utf-8",
    )
    assert read_env_file(path) == {
        "DATABASE_URL": "sqlite+aiosqlite:///./elsewhere.db",
        "HEARTBEAT_SECONDS": "4",
        "SSE_RETRY_MS": "2500",
        "TAIL_POLL_SECONDS": "0.5",
        "GREETING": "hello # not a comment",
        "EMPTY": "",
        "EQUALS": "a=b=c",
    }


def test_missing_env_file_is_empty(tmp_path: Path) -> None:
    assert read_env_file(tmp_path / "nope.env") == {}


def test_env_file_line_without_equals_is_refused_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("HEARTBEAT_SECONDS=4\nthis is not a setting\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"\.env:2: expected KEY=VALUE"):
        read_env_file(path)


def test_env_file_is_read_and_the_process_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "HEARTBEAT_SECONDS=4\nSSE_RETRY_MS=2500\nexport TAIL_POLL_SECONDS=0.5\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    for name in EVERY_VARIABLE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HEARTBEAT_SECONDS", "9")

    settings = load_settings()

    assert settings.server.heartbeat_seconds == 9.0  # the process environment overrides .env
    assert settings.server.retry_ms == 2500  # from .env
    assert settings.server.poll_seconds == 0.5  # from .env, despite the export prefix
    assert settings.database == DatabaseSettings()  # neither sets it: the default


def test_a_bad_value_in_env_file_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("HEARTBEAT_SECONDS=often\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HEARTBEAT_SECONDS", raising=False)
    with pytest.raises(SettingsError, match="HEARTBEAT_SECONDS"):
        load_settings()
