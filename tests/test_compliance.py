"""Unsubscribe tokens and List-Unsubscribe fields (RFC 8058, RFC 2369)."""

from __future__ import annotations

import base64
import email
import email.policy
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.compliance import InvalidToken, find_token, load_secret, make_token, unsubscribe_fields, verify_token
from engine.config import ListUnsubscribe, load_config

SECRET = b"s3cret-for-tests"


def test_token_round_trip() -> None:
    token = make_token(SECRET, "Bob@Example.org", "acme", "spring")
    assert verify_token(SECRET, token) == ("bob@example.org", "acme", "spring")
    assert verify_token(SECRET.decode(), token.encode()) == ("bob@example.org", "acme", "spring")
    assert verify_token(SECRET, make_token(SECRET, "a@b.c", None, None)) == ("a@b.c", None, None)


@given(
    recipient=st.emails(),
    tenant=st.one_of(st.none(), st.text(max_size=40)),
    campaign=st.one_of(st.none(), st.text(max_size=60)),
)
def test_tokens_are_url_safe_and_verify(recipient: str, tenant: str | None, campaign: str | None) -> None:
    token = make_token(SECRET, recipient, tenant, campaign)
    assert token.isascii() and all(ch.isalnum() or ch in "-_" for ch in token)
    assert verify_token(SECRET, token) == (recipient.lower(), tenant, campaign)


def test_other_secret_is_refused() -> None:
    token = make_token(SECRET, "bob@example.org", "acme", "spring")
    with pytest.raises(InvalidToken):
        verify_token(b"another secret", token)


@pytest.mark.parametrize("token", ["", "abc", "not a token!", "A" * 2000, "%2e%2e", "AAAA" * 10])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidToken):
        verify_token(SECRET, token)


def test_any_changed_byte_is_refused() -> None:
    token = make_token(SECRET, "bob@example.org", "acme", "spring")
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for index in range(len(raw)):
        forged = bytearray(raw)
        forged[index] ^= 0x01
        with pytest.raises(InvalidToken):
            verify_token(SECRET, base64.urlsafe_b64encode(bytes(forged)).rstrip(b"="))


def test_find_token_in_text() -> None:
    token = make_token(SECRET, "bob@example.org", "acme", "spring")
    subject = f"Subject: unsubscribe {token}\r\n".encode()
    assert find_token(SECRET, b"noise-noise-noise-noise-noise " + subject) == ("bob@example.org", "acme", "spring")
    assert find_token(SECRET, b"Subject: unsubscribe me please") is None


def test_fields_parse_as_rfc2369() -> None:
    token = make_token(SECRET, "bob@example.org", "acme", "spring")
    setting = ListUnsubscribe("unsubscribe@example.net", "https://example.net/unsubscribe/{token}")
    fields = unsubscribe_fields(setting, token)
    assert fields.endswith(b"\r\n") and all(len(line) < 998 for line in fields.split(b"\r\n"))
    parsed = email.message_from_bytes(fields + b"\r\nbody\r\n", policy=email.policy.default)
    targets = [part.strip().strip("<>") for part in str(parsed["List-Unsubscribe"]).split(",")]
    assert targets == [
        f"mailto:unsubscribe@example.net?subject=unsubscribe%20{token}",
        f"https://example.net/unsubscribe/{token}",
    ]
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_mailto_only_has_no_one_click_field() -> None:
    fields = unsubscribe_fields(ListUnsubscribe("u@example.net", None), "TOKEN")
    assert b"List-Unsubscribe-Post" not in fields and b"mailto:u@example.net" in fields


def test_configured_secret_wins(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text('[engine]\nsecret = "configured"\nspool_dir = "spool"\n')
    assert load_secret(load_config(path)) == b"configured"
    assert not (tmp_path / "spool" / "secret").exists()


def test_generated_secret_is_kept_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text('[engine]\nspool_dir = "spool"\n')
    config = load_config(path)
    first = load_secret(config)
    assert len(first) >= 32 and load_secret(config) == first
    secret_file = tmp_path / "spool" / "secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in secret_file.parent.iterdir()] == ["secret"]
