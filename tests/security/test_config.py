"""The security and limit settings: parsed from the environment, refused at start when
malformed, with messages that name the variable and never echo a token."""

from __future__ import annotations

import pytest

from app.config import SettingsError, load_settings


def test_defaults_are_open_same_origin_and_bounded() -> None:
    settings = load_settings({})
    assert settings.security.api_tokens == ()
    assert settings.security.read_tokens == ()
    assert settings.security.cors_origins == ()
    assert settings.limits.max_body_bytes == 1024 * 1024
    assert settings.limits.max_payload_bytes == 64 * 1024
    assert settings.limits.sse_max_connections == 10_000
    assert settings.database.busy_timeout_seconds == 10
    assert settings.database.sqlite_appender == "process"
    assert settings.server.log_format == "text"


def test_lists_are_comma_separated_and_trimmed() -> None:
    settings = load_settings(
        {
            "API_TOKENS": " alpha-1 , beta-2,,",
            "READ_TOKENS": "gamma-3",
            "CORS_ORIGINS": "https://a.example, http://localhost:5173 ,*",
            "LOG_FORMAT": "json",
            "SSE_MAX_CONNECTIONS": "5",
            "SQLITE_BUSY_TIMEOUT_SECONDS": "0.25",
            "SQLITE_APPENDER": "thread",
        }
    )
    assert settings.security.api_tokens == ("alpha-1", "beta-2")
    assert settings.security.read_tokens == ("gamma-3",)
    assert settings.security.cors_origins == ("https://a.example", "http://localhost:5173", "*")
    assert settings.server.log_format == "json"
    assert settings.limits.sse_max_connections == 5
    assert settings.database.busy_timeout_seconds == 0.25
    assert settings.database.sqlite_appender == "thread"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"API_TOKENS": "good-token,bad token"}, "API_TOKENS: token 2"),
        ({"READ_TOKENS": "tab\there"}, "READ_TOKENS: token 1"),
        ({"API_TOKENS": "ünïcode"}, "printable ASCII"),
        ({"CORS_ORIGINS": "https://a.example/"}, "CORS_ORIGINS"),
        ({"CORS_ORIGINS": "a.example"}, "CORS_ORIGINS"),
        ({"REQUEST_MAX_BODY_BYTES": "10"}, "REQUEST_MAX_BODY_BYTES must be at least 1024"),
        ({"EVENT_MAX_PAYLOAD_BYTES": "0"}, "EVENT_MAX_PAYLOAD_BYTES"),
        ({"SSE_MAX_CONNECTIONS": "0"}, "SSE_MAX_CONNECTIONS must be at least 1"),
        ({"SSE_MAX_CONNECTIONS": "many"}, "SSE_MAX_CONNECTIONS"),
        ({"SQLITE_BUSY_TIMEOUT_SECONDS": "-1"}, "SQLITE_BUSY_TIMEOUT_SECONDS"),
        ({"SQLITE_BUSY_TIMEOUT_SECONDS": "nan"}, "SQLITE_BUSY_TIMEOUT_SECONDS"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"SQLITE_APPENDER": "fork"}, 'SQLITE_APPENDER must be "process" or "thread"'),
    ],
)
def test_malformed_values_stop_the_start_naming_the_variable(
    env: dict[str, str], words: str
) -> None:
    with pytest.raises(SettingsError, match=words) as caught:
        load_settings(env)
    name, value = next(iter(env.items()))
    if name.endswith("TOKENS"):
        for token in value.split(","):
            assert token.strip() not in str(caught.value)
