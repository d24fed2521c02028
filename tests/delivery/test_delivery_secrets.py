"""Webhook secrets at rest: sealed with AES-GCM under the secrets key, never in the clear in
the database; a replaced secrets key keeps working through secret_old_keys until
housekeeping has sealed every secret again."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from lotse_delivery.app import create_app
from lotse_delivery.sealing import SecretBox, SecretUnreadable, key_id
from lotse_delivery.settings import DeliverySettings
from lotse_delivery.tables import DeliverySubscription
from lotse_delivery.worker import DeliveryWorker, purge, signature
from lotse_runtime.testing import InProcessFeed, without_broker
from pydantic import ValidationError
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from tests.delivery.helpers import TRAEGER, Scripted, receiver_running, referral
from tests.support import bearer

REQUESTED = "de.lotse.referrals.referral-requested.v1"


def new_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def raw(key: str) -> bytes:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))


# -- the box ---------------------------------------------------------------------------------


def test_a_sealed_secret_opens_only_for_its_subscription_and_column() -> None:
    box = SecretBox(raw(new_key()))
    sealed = box.seal("whsec_abc", subscription_id="s-1", column="secret")
    assert "whsec_abc" not in sealed
    assert sealed.startswith("lsk1.")
    assert box.open(sealed, subscription_id="s-1", column="secret") == "whsec_abc"
    # Sealing twice gives different texts (fresh nonce).
    assert box.seal("whsec_abc", subscription_id="s-1", column="secret") != sealed
    with pytest.raises(SecretUnreadable, match="does not open"):
        box.open(sealed, subscription_id="s-2", column="secret")  # copied to another row
    with pytest.raises(SecretUnreadable, match="does not open"):
        box.open(sealed, subscription_id="s-1", column="previous_secret")
    tampered = sealed[:-2] + ("AA" if not sealed.endswith("AA") else "BB")
    with pytest.raises(SecretUnreadable):
        box.open(tampered, subscription_id="s-1", column="secret")
    with pytest.raises(SecretUnreadable, match="not a sealed secret"):
        box.open("garbage", subscription_id="s-1", column="secret")


def test_another_key_cannot_open_and_says_which_key_is_missing() -> None:
    old, new = raw(new_key()), raw(new_key())
    sealed = SecretBox(old).seal("whsec_abc", subscription_id="s-1", column="secret")
    with pytest.raises(SecretUnreadable, match=key_id(old)):
        SecretBox(new).open(sealed, subscription_id="s-1", column="secret")
    rotated = SecretBox(new, [old])
    assert rotated.open(sealed, subscription_id="s-1", column="secret") == "whsec_abc"
    assert rotated.stale(sealed)
    assert not rotated.stale(rotated.seal("x", subscription_id="s-1", column="secret"))
    assert rotated.stale("whsec_from_before_sealing")
    assert rotated.open("whsec_plain", subscription_id="s-1", column="secret") == "whsec_plain"


def test_bad_keys_are_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="secret_key must decode to 32 bytes"):
        DeliverySettings(data_dir=tmp_path, secret_key=base64.urlsafe_b64encode(b"short").decode())
    with pytest.raises(ValidationError, match=r"secret_old_keys\.1 must"):
        DeliverySettings(data_dir=tmp_path, secret_old_keys=[new_key(), "!!"])
    with pytest.raises(ValidationError, match="lease_s"):
        DeliverySettings(data_dir=tmp_path, lease_s=5, deliver_timeout_s=10)
    key_file = tmp_path / "key"
    key_file.write_text(new_key() + "\n")
    box = DeliverySettings(data_dir=tmp_path, secret_key_file=key_file).secret_box()
    assert box.current == raw(key_file.read_text().strip())
    missing = DeliverySettings(data_dir=tmp_path, secret_key_file=tmp_path / "nope")
    with pytest.raises(ValueError, match="secret_key_file"):
        missing.secret_box()
    # Unset: one development key per data_dir, the same on every start.
    dev = DeliverySettings(data_dir=tmp_path / "dev")
    assert dev.secret_box().current == dev.secret_box().current


# -- in the database -------------------------------------------------------------------------


def _settings(database_url: str, tmp_path: Path, **values: Any) -> DeliverySettings:
    return DeliverySettings(
        database_url=database_url,
        data_dir=tmp_path,
        sink_policy="development",
        deliver_interval_s=3600,
        **values,
    )


async def _stored(app: Any) -> list[DeliverySubscription]:
    async with app.state.runtime.db.transaction() as session:
        return list((await session.scalars(select(DeliverySubscription))).all())


@pytest.mark.integration
async def test_the_database_holds_secrets_only_sealed_and_a_key_change_reseals_them(
    database_url: str, tmp_path: Path
) -> None:
    old_key, new_key_ = new_key(), new_key()
    auth = bearer("traeger", traeger=TRAEGER)
    probe = Scripted([])
    with receiver_running(probe) as sink:
        app = create_app(_settings(database_url, tmp_path, secret_key=old_key))
        async with without_broker(app):
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
            created = (
                await client.post(
                    "/subscriptions", json={"sink": sink, "types": [REQUESTED]}, headers=auth
                )
            ).json()
            rotated = (
                await client.post(f"/subscriptions/{created['id']}/secret", headers=auth)
            ).json()
            await client.aclose()
            [row] = await _stored(app)
        for shown in (created["secret"], rotated["secret"]):
            for column in (row.secret, row.previous_secret or ""):
                assert shown not in column
                assert shown.removeprefix("whsec_") not in column
        assert row.secret.startswith(f"lsk1.{key_id(raw(old_key))}.")

        # The key is replaced; the old one is still configured: housekeeping seals again.
        app = create_app(
            _settings(database_url, tmp_path, secret_key=new_key_, secret_old_keys=[old_key])
        )
        async with without_broker(app) as runtime:
            await purge(runtime, app.state.secret_box)
            [row] = await _stored(app)
        assert row.secret.startswith(f"lsk1.{key_id(raw(new_key_))}.")
        assert row.previous_secret is not None
        assert row.previous_secret.startswith(f"lsk1.{key_id(raw(new_key_))}.")

        # Now the old key can go: deliveries are signed with both secrets (grace period).
        app = create_app(_settings(database_url, tmp_path, secret_key=new_key_))
        async with without_broker(app) as runtime:
            probe.secrets = [created["secret"]]  # a receiver that has not switched yet
            worker: DeliveryWorker = app.state.delivery_worker
            assert await InProcessFeed(runtime, "main").send(referral()) == "ok"
            await worker.tick()
            await worker.drain()
            [row] = await _stored(app)
            at = datetime.now(UTC)
            header = signature(row, app.state.secret_box, "msg-1", at, b"{}")
    assert len(probe.events) == 1
    assert probe.rejected == 0
    assert sorted(header.split()) == sorted(
        Webhook(secret).sign("msg-1", at, b"{}")
        for secret in (rotated["secret"], created["secret"])
    )


@pytest.mark.integration
async def test_a_secret_no_configured_key_opens_fails_the_attempt_with_the_reason(
    sqlite_url: str, tmp_path: Path
) -> None:
    auth = bearer("traeger", traeger=TRAEGER)
    probe = Scripted([])
    with receiver_running(probe) as sink:
        app = create_app(_settings(sqlite_url, tmp_path, secret_key=new_key()))
        async with without_broker(app):
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
            created = (
                await client.post(
                    "/subscriptions", json={"sink": sink, "types": [REQUESTED]}, headers=auth
                )
            ).json()
            await client.aclose()
        app = create_app(_settings(sqlite_url, tmp_path, secret_key=new_key()))  # key lost
        async with without_broker(app) as runtime:
            worker: DeliveryWorker = app.state.delivery_worker
            assert await InProcessFeed(runtime, "main").send(referral()) == "ok"
            await worker.tick()
            await worker.drain()
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
            log = (
                await client.get(f"/subscriptions/{created['id']}/deliveries", headers=auth)
            ).json()
            await client.aclose()
    assert probe.requests == 0, "nothing unsigned or wrongly signed goes out"
    assert log[0]["outcome"] == "retry"
    assert log[0]["error"].startswith("secret unreadable")
