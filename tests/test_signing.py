"""DKIM signing, checked by verifiers that share no code with the signer.

RSA signatures go to Perl Mail::DKIM (Debian libmail-dkim-perl); Ed25519 ones to the npm package mailauth,
because Debian's Mail::DKIM has no Ed25519. Both look the public key up on a real DNS server on loopback,
published from what generate_key returned.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import dkim.canonicalization
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from engine import _dkimcanon_py, signing
from engine.signing import DkimKeyError, DkimSigner, generate_key, parse_header, relaxed_field, select_fields
from tests.dnsserver import DnsServer

TESTS = Path(__file__).parent
SELECTOR = "s2026"
DOMAINS = {"rsa-sha256": "rsa.example.net", "ed25519-sha256": "ed.example.net"}
CANONICALIZATIONS = [("relaxed", "relaxed"), ("simple", "simple"), ("relaxed", "simple"), ("simple", "relaxed")]
VERIFY_TIMEOUT = 30

try:
    from engine import _dkimcanon as compiled
except ImportError:
    compiled = _dkimcanon_py


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    key_file: Path
    algorithm: str


@dataclass(frozen=True)
class World:
    dns: DnsServer
    keys: dict[str, DkimKey]
    signer: DkimSigner


@functools.cache
def _verifier_command(algorithm: str) -> tuple[list[str], dict[str, str]]:
    if algorithm == "rsa-sha256":
        if subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e1"], capture_output=True).returncode:
            pytest.fail("Perl Mail::DKIM missing: apt-get install -y libmail-dkim-perl")
        return ["perl", str(TESTS / "dkim_verify.pl")], dict(os.environ)
    npm = shutil.which("npm")
    root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True).stdout.strip() if npm else ""
    if not (Path(root) / "mailauth").is_dir():
        pytest.fail("npm package mailauth missing: npm install -g mailauth@4")
    return ["node", str(TESTS / "dkim_verify_mailauth.cjs")], {**os.environ, "NODE_PATH": root}


def verify(world: World, algorithm: str, message: bytes) -> tuple[bool, str]:
    """Run the independent verifier for `algorithm`; (passed, its report)."""
    command, env = _verifier_command(algorithm)
    dns = f"{world.dns.host}:{world.dns.port}"
    done = subprocess.run([*command, "--dns", dns], input=message, capture_output=True, env=env, timeout=VERIFY_TIMEOUT)
    report = done.stdout.decode() + done.stderr.decode()
    assert done.returncode in (0, 1), report
    return done.returncode == 0, report


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("keys")
    with DnsServer() as dns:
        keys = {}
        for algorithm, domain in DOMAINS.items():
            key_file = directory / f"{domain}.pem"
            name, value = generate_key(domain, SELECTOR, algorithm, key_file)
            dns.add(name, "TXT", value)
            keys[domain] = DkimKey(domain, SELECTOR, key_file, algorithm)
        yield World(dns, keys, DkimSigner.from_config(keys))


def message(domain: str, *, extra: bytes = b"") -> bytes:
    headers = (
        f"From: Alice Example <alice@{domain}>\r\n"
        "To: bob@example.org\r\n"
        "Cc: carol@example.org\r\n"
        "Subject: Quarterly   report,\r\n\tfolded  over two lines\r\n"
        "Date: Sun, 29 Nov 2026 02:00:00 +0000\r\n"
        f"Message-ID: <1.2@{domain}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        f"Reply-To: support@{domain}\r\n"
        f"List-Unsubscribe: <https://{domain}/u/1>, <mailto:unsub@{domain}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        "Feedback-ID: 1:campaign:bulk:engine\r\n"
        "X-Mailer: not signed\r\n"
    ).encode()
    body = b"Hello Bob,  \r\n\r\n\tthe numbers  are in.\r\n" + b"A line of text.\r\n" * 40 + b"\r\n\r\n"
    return headers + extra + b"\r\n" + body


def tags(signature: bytes) -> dict[str, str]:
    value = re.sub(r"\s+", "", signature.decode().partition(":")[2])
    return dict(tag.split("=", 1) for tag in value.rstrip(";").split(";"))


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS, ids="/".join)
@pytest.mark.parametrize("algorithm", DOMAINS)
def test_signature_verifies(world: World, algorithm: str, canonicalization: tuple[str, str]) -> None:
    original = message(DOMAINS[algorithm])
    signature = world.signer.sign(original, canonicalization)
    assert signature is not None and signature.endswith(b"\r\n")
    assert all(len(line) <= 78 for line in signature.split(b"\r\n"))
    passed, report = verify(world, algorithm, signature + original)
    assert passed, report
    assert f"pass d={DOMAINS[algorithm]} a={algorithm}" in report


def test_signature_tags(world: World) -> None:
    signature = world.signer.sign(message("rsa.example.net"))
    assert signature is not None
    found = tags(signature)
    assert "l" not in found
    assert found["h"].split(":") == [
        "from",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "reply-to",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "feedback-id",
        "from",
    ]
    assert found["d"] == "rsa.example.net" and found["s"] == SELECTOR and found["c"] == "relaxed/relaxed"
    assert abs(int(found["t"]) - time.time()) < 60


def test_only_present_headers_are_signed(world: World) -> None:
    minimal = b"From: a@ed.example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    signature = world.signer.sign(minimal)
    assert signature is not None
    assert tags(signature)["h"] == "from:subject:from"
    passed, report = verify(world, "ed25519-sha256", signature + minimal)
    assert passed, report


@pytest.mark.parametrize("algorithm", DOMAINS)
def test_repeated_headers_are_signed_bottom_up(world: World, algorithm: str) -> None:
    original = message(DOMAINS[algorithm], extra=b"To: dave@example.org\r\nReceived: by relay\r\n")
    signature = world.signer.sign(original)
    assert signature is not None and tags(signature)["h"].startswith("from:to:to:cc:")
    passed, report = verify(world, algorithm, signature + original)
    assert passed, report
    passed, report = verify(world, algorithm, signature + original.replace(b"dave@", b"eve@"))
    assert not passed, report


def _tamper(original: bytes, how: str) -> bytes:
    if how == "subject":
        return original.replace(b"Quarterly", b"Annual", 1)
    if how == "body":
        return original.replace(b"numbers", b"figures", 1)
    if how == "from-above":
        return b"From: ceo@attacker.example\r\n" + original
    head, _, body = original.partition(b"\r\n\r\n")
    return head + b"\r\nFrom: ceo@attacker.example\r\n\r\n" + body


@pytest.mark.parametrize("how", ["subject", "body", "from-above", "from-below"])
@pytest.mark.parametrize("algorithm", DOMAINS)
def test_tampering_fails(world: World, algorithm: str, how: str) -> None:
    original = message(DOMAINS[algorithm])
    signature = world.signer.sign(original)
    assert signature is not None
    passed, report = verify(world, algorithm, _tamper(signature + original, how))
    assert not passed, report
    assert "fail" in report, report


def test_parent_domain_key_signs_subdomain(world: World) -> None:
    original = message("news.rsa.example.net")
    signature = world.signer.sign(original)
    assert signature is not None and tags(signature)["d"] == "rsa.example.net"
    passed, report = verify(world, "rsa-sha256", signature + original)
    assert passed, report


@pytest.mark.parametrize(
    "from_header",
    [
        b"From: a@example.org",
        b"From: a@notrsa.example.net",
        b"From: a@example.net",
        b"From: no address here",
        b"From: a@rsa.example.net\r\nFrom: b@rsa.example.net",
        b"From: a@rsa.example.net, b@rsa.example.net",
        b"X-No-From: a@rsa.example.net",
    ],
)
def test_unsigned_without_a_key_or_a_single_author(world: World, from_header: bytes) -> None:
    assert world.signer.sign(from_header + b"\r\nSubject: s\r\n\r\nbody\r\n") is None


@pytest.mark.parametrize("algorithm", DOMAINS)
def test_signatures_made_off_the_loop_verify(world: World, algorithm: str) -> None:
    """Several at once on the signing threads, each for its own message."""
    originals = [message(DOMAINS[algorithm], extra=f"X-Seq: {n}\r\n".encode()) for n in range(4)]

    async def sign_all() -> list[bytes | None]:
        return await asyncio.gather(*(world.signer.sign_off_loop(original) for original in originals))

    for original, signature in zip(originals, asyncio.run(sign_all()), strict=True):
        assert signature is not None
        passed, report = verify(world, algorithm, signature + original)
        assert passed, report


def test_a_signer_without_keys_signs_nothing() -> None:
    signer = DkimSigner({})
    assert signer.sign(message("rsa.example.net")) is None
    assert asyncio.run(signer.sign_off_loop(message("rsa.example.net"))) is None


def test_domains_and_case_insensitive_lookup(world: World) -> None:
    assert world.signer.domains == frozenset(DOMAINS.values())
    assert world.signer.sign(b"From: A@RSA.Example.NET\r\n\r\nbody\r\n") is not None


def test_unknown_canonicalization_is_rejected(world: World) -> None:
    with pytest.raises(ValueError, match="canonicalization"):
        world.signer.sign(message("rsa.example.net"), ("relaxed", "loose"))


def _rsa_pem(bits: int) -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("content", "algorithm", "complaint"),
    [
        (None, "rsa-sha256", "cannot read key file"),
        (b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n", "rsa-sha256", "not an unencrypted"),
        (b"", "ed25519-sha256", "not an unencrypted"),
        ("rsa1024", "rsa-sha256", "1024 bits, at least 2048"),
        ("rsa2048", "ed25519-sha256", "needs an Ed25519 key"),
        ("rsa2048", "rsa-sha1", "algorithm 'rsa-sha1'"),
    ],
)
def test_bad_key_is_refused_at_load(
    tmp_path: Path, content: bytes | str | None, algorithm: str, complaint: str
) -> None:
    key_file = tmp_path / "bad.pem"
    if isinstance(content, str):
        key_file.write_bytes(_rsa_pem(int(content.removeprefix("rsa"))))
    elif content is not None:
        key_file.write_bytes(content)
    config = {"example.com": DkimKey("example.com", SELECTOR, key_file, algorithm)}
    with pytest.raises(DkimKeyError, match=re.escape(complaint)) as caught:
        DkimSigner.from_config(config)
    assert str(key_file) in str(caught.value)


def test_ed25519_key_declared_as_rsa_is_refused(world: World) -> None:
    ed_file = world.keys["ed.example.net"].key_file
    with pytest.raises(DkimKeyError, match="rsa-sha256 needs an RSA key, the file holds an Ed25519 key"):
        DkimSigner.from_config({"x": DkimKey("x.example", SELECTOR, ed_file, "rsa-sha256")})


def test_two_keys_for_one_domain_are_refused(world: World) -> None:
    key = world.keys["rsa.example.net"]
    twin = DkimKey("RSA.example.net.", "other", key.key_file, key.algorithm)
    with pytest.raises(DkimKeyError, match=re.escape("is for rsa.example.net too")):
        DkimSigner.from_config({"rsa.example.net": key, "RSA.example.net.": twin})


def test_selector_that_would_break_the_header_is_refused(world: World) -> None:
    rsa_file = world.keys["rsa.example.net"].key_file
    with pytest.raises(DkimKeyError, match="selector 'bad;selector' is not a DNS name"):
        DkimSigner.from_config({"x": DkimKey("x.example", "bad;selector", rsa_file, "rsa-sha256")})


@pytest.mark.parametrize("algorithm", DOMAINS)
def test_generate_key_writes_private_pem_and_txt(tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / "k.pem"
    name, value = generate_key("Example.NET", "sel", algorithm, out)
    assert name == "sel._domainkey.example.net"
    kind = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}[algorithm]
    assert re.fullmatch(rf"v=DKIM1; k={kind}; p=[A-Za-z0-9+/]+=*", value)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(FileExistsError):
        generate_key("example.net", "sel", algorithm, out)


BODY_BYTES = st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"\xff", b"z "]), max_size=40).map(
    b"".join
)


@given(BODY_BYTES)
def test_relaxed_body_matches_dkimpy(body: bytes) -> None:
    expected = dkim.canonicalization.Relaxed.canonicalize_body(body)
    assert compiled.relaxed_body(body) == expected
    assert _dkimcanon_py.relaxed_body(body) == expected


@given(st.integers(0, 9000), st.integers(0, 3), BODY_BYTES)
def test_relaxed_body_of_long_clean_text_matches_dkimpy(clean: int, gap: int, tail: bytes) -> None:
    """Long bodies, so the compiled scan's 4 KB blocks and their edges meet whitespace that must change."""
    text = (b"wrapped words\r\n" * (clean // 15 + 1))[:clean]
    body = text + b"x" * gap + tail + b"y\r\n"
    expected = dkim.canonicalization.Relaxed.canonicalize_body(body)
    assert compiled.relaxed_body(body) == expected
    assert _dkimcanon_py.relaxed_body(body) == expected


@given(BODY_BYTES)
def test_simple_body_matches_dkimpy(body: bytes) -> None:
    expected = dkim.canonicalization.Simple.canonicalize_body(body)
    assert compiled.simple_body(body) == expected
    assert _dkimcanon_py.simple_body(body) == expected


FIELD_NAMES = st.sampled_from([b"From", b"from", b"TO", b"Subject", b"Received", b"X-Tag", b"Cc", b"Date"])
FIELD_TEXT = st.lists(st.sampled_from([b"a", b"Z", b" ", b"\t", b":", b"@", b"\xc3\xa9", b"\r\n ", b"\r\n\t"])).map(
    b"".join
)
HEADER_BLOCKS = st.lists(st.tuples(FIELD_NAMES, FIELD_TEXT), max_size=12)


@given(HEADER_BLOCKS)
def test_header_parsing_and_canonicalisation_match_dkimpy(block: list[tuple[bytes, bytes]]) -> None:
    head = b"".join(name + b":" + value + b"\r\n" for name, value in block)
    fields = parse_header(head)
    assert fields is not None
    reference = [tuple(field) for field in dkim.rfc822_parse(head)[0]]
    assert fields == reference
    relaxed = dkim.canonicalization.Relaxed.canonicalize_headers(reference)
    assert [relaxed_field(*field) + b"\r\n" for field in fields] == [name + b":" + value for name, value in relaxed]
    names, picked = select_fields(fields)
    assert picked == dkim.select_headers(fields, names)
    assert names[-1] == b"from" and names.count(b"from") == sum(f[0].lower() == b"from" for f in fields) + 1


def test_malformed_header_block_is_not_signed(world: World) -> None:
    assert parse_header(b"From: a@rsa.example.net\r\nno colon here\r\n") is None
    assert world.signer.sign(b"From: a@rsa.example.net\r\nno colon here\r\n\r\nbody\r\n") is None


ADDRESS_TEXT = st.lists(
    st.sampled_from(["a", "B", "0", ".", "-", " ", "<", ">", "@", '"', "(", ")", ",", "x.example", "\u00e9"]),
    max_size=16,
).map("".join)


@given(ADDRESS_TEXT)
def test_author_domain_agrees_with_email_utils(text: str) -> None:
    addresses = [address for _, address in email.utils.getaddresses([text.strip()]) if "@" in address]
    expected = signing._ascii_domain(addresses[0].rpartition("@")[2]) if len(addresses) == 1 else None
    assert signing.author_domain([(b"From", text.encode() + b"\r\n")]) == expected


@pytest.mark.parametrize(
    ("value", "domain"),
    [
        (b"alice@Example.NET", "example.net"),
        (b"Alice Example <alice@example.net>", "example.net"),
        (b'"Example, Alice" <alice@example.net>', "example.net"),
        (b"alice@example.net (Alice)", "example.net"),
        (b"=?utf-8?q?Al=C3=AFce?=\r\n <alice@example.net>", "example.net"),
        (b"alice@b\xc3\xbccher.example", "xn--bcher-kva.example"),
        (b"a@example.net, b@example.org", None),
        (b"undisclosed-recipients:;", None),
    ],
)
def test_author_domain(value: bytes, domain: str | None) -> None:
    assert signing.author_domain([(b"From", b" " + value + b"\r\n")]) == domain


def test_compiled_twin_is_built() -> None:
    assert compiled is not _dkimcanon_py, "run `python setup.py build_ext --inplace`"


def test_pure_python_switch_is_honoured() -> None:
    probe = "import engine.dkimcanon as c; print(c.relaxed_body.__module__)"
    for value, expected in (("1", "engine._dkimcanon_py"), ("0", "engine._dkimcanon")):
        env = {**os.environ, "ENGINE_PURE_PYTHON": value}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        assert done.stdout.strip() == expected
