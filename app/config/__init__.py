"""Configuration, read once from the environment (:mod:`.settings`)."""

from __future__ import annotations

from app.config.settings import (
    AgentSettings,
    AuditSettings,
    ContentSettings,
    DatabaseSettings,
    IngestSettings,
    LimitsSettings,
    RetentionSettings,
    SecuritySettings,
    ServerSettings,
    Settings,
    SettingsError,
    get_settings,
    load_settings,
    read_env_file,
)

__all__ = [
    "AgentSettings",
    "AuditSettings",
    "ContentSettings",
    "DatabaseSettings",
    "IngestSettings",
    "LimitsSettings",
    "RetentionSettings",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "get_settings",
    "load_settings",
    "read_env_file",
]
