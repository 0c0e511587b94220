"""Signed checkpoints: written by a running service, served at ``/audit/checkpoints``, and
proof against a history rewritten by someone who could write the database."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from app.audit.keys import public_key_text
from app.config import SettingsError
from tests.audit.test_verify import FORGED, recompute_stored_chain, tamper
from tests.support import agent_event, make_settings, running_server
from tests.test_cli_commands import run_cli


def _raw_key(key: Ed25519PrivateKey) -> str:
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


async def _checkpoint_of_head(database_url: str, key: str) -> tuple[dict[str, object], int]:
    """A service with a signing key, some appends, and the checkpoint it signs of its head."""
    settings = make_settings(database_url, AUDIT_SIGNING_KEY=key, AUDIT_CHECKPOINT_SECONDS="0.2")
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url) as client,
    ):
        for n in range(12):
            sent = await client.post("/agents/a1/events", json=agent_event(n=n))
            assert sent.status_code == 201, sent.text
        head = sent.json()["position"]
        body: dict[str, object] = {}

        async def covers_head() -> bool:
            nonlocal body
            body = (await client.get("/audit/checkpoints")).json()
            found = body["checkpoints"]
            return bool(found) and found[0]["position"] >= head

        for _ in range(100):
            if await covers_head():
                break
            await asyncio.sleep(0.1)
        assert await covers_head(), body
    assert body["enabled"] is True
    checkpoint = body["checkpoints"][0]
    assert checkpoint["public_key"] == body["public_key"]
    return checkpoint, head


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


async def test_a_kept_checkpoint_proves_a_rewritten_history_was_rewritten(
    database_url: str, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    checkpoint, _ = await _checkpoint_of_head(database_url, _raw_key(key))
    saved = tmp_path / "checkpoint.json"
    saved.write_text(json.dumps(checkpoint))
    trusted = public_key_text(key.public_key())
    env = {"DATABASE_URL": database_url}

    done = await run_cli(
        "audit", "verify", "--checkpoint", str(saved), "--public-key", trusted, env=env
    )
    assert done.code == 0, done
    assert done.stdout.endswith("1 signed checkpoint(s) match the recomputed chain\n")

    # Someone with write access edits an event and recomputes every stored chain value.
    await tamper(database_url, f"{FORGED} WHERE position = 3")
    await recompute_stored_chain(database_url)

    alone = await run_cli("audit", "verify", env=env)
    assert alone.code == 0, alone  # the table agrees with itself again
    done = await run_cli(
        "audit", "verify", "--checkpoint", str(saved), "--public-key", trusted, env=env
    )
    assert done.code == 1, done
    assert done.stdout.startswith(
        f"chain broken at position {checkpoint['position']}: rewritten history: the events "
        "up to here give chain "
    )
    assert f"but the checkpoint signed {checkpoint['chain']}" in done.stdout


async def test_a_checkpoint_is_only_as_good_as_the_key_the_auditor_trusts(
    database_url: str, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    checkpoint, _ = await _checkpoint_of_head(database_url, _raw_key(key))
    env = {"DATABASE_URL": database_url}
    # A checkpoint forged for the rewritten history, signed with another key.
    forged = json.dumps({**checkpoint, "chain": "00" * 32})
    other = public_key_text(Ed25519PrivateKey.generate().public_key())

    for given, trusted in ((json.dumps(checkpoint), other), (forged, checkpoint["public_key"])):
        done = await run_cli(
            "audit", "verify", "--checkpoint", given, "--public-key", str(trusted), env=env
        )
        assert (done.code, done.stdout) == (1, "")
        assert done.stderr == (
            f"error: the checkpoint at position {checkpoint['position']} is not signed by "
            "that key (or was altered after it was signed)\n"
        )
    done = await run_cli("audit", "verify", "--checkpoint", forged, env=env)
    assert done.code == 2
    assert "--checkpoint needs --public-key" in done.stderr


async def test_a_pem_signing_key_from_a_file_is_used_as_configured(
    database_url: str, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    path = tmp_path / "signing.pem"
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))

    checkpoint, _ = await _checkpoint_of_head(database_url, str(path))

    assert checkpoint["public_key"] == public_key_text(key.public_key())


async def test_without_a_key_no_checkpoints_are_written_and_the_endpoint_says_so(
    database_url: str,
) -> None:
    settings = make_settings(database_url, AUDIT_CHECKPOINT_SECONDS="0.1")
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url) as client,
    ):
        await client.post("/agents/a1/events", json=agent_event())
        await asyncio.sleep(0.5)
        response = await client.get("/audit/checkpoints")

    assert response.status_code == 200
    assert response.json() == {
        "enabled": False,
        "public_key": None,
        "checkpoints": [],
        "detail": "no checkpoints are written: AUDIT_SIGNING_KEY is not set",
    }


async def test_checkpoints_need_a_read_token_when_reads_are_guarded(database_url: str) -> None:
    settings = make_settings(database_url, READ_TOKENS="reader")
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url) as client,
    ):
        refused = await client.get("/audit/checkpoints")
        allowed = await client.get("/audit/checkpoints", headers={"Authorization": "Bearer reader"})

    assert (refused.status_code, allowed.status_code) == (401, 200)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("c2hvcnQ=", "AUDIT_SIGNING_KEY must be 32 bytes in base64, got 5 bytes"),
        ("not base64!", "AUDIT_SIGNING_KEY must be a PEM file or 32 bytes in base64"),
        ("/nonexistent/key.pem", "AUDIT_SIGNING_KEY: cannot read /nonexistent/key.pem"),
    ],
)
def test_a_bad_signing_key_stops_the_service_at_start_naming_the_setting(
    value: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        make_settings("sqlite+aiosqlite:///unused.db", AUDIT_SIGNING_KEY=value)
