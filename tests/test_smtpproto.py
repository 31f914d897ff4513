"""engine.smtpproto: both implementations, the same cases, and property tests that they agree.

Every test runs against the compiled engine._smtpproto and the pure engine._smtpproto_py; a missing
compiled module fails the test (the suite builds extensions first). Smuggling lookalikes follow
CVE-2023-51764/51766: only CRLF "." CRLF may end DATA.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

IMPLEMENTATIONS = {"compiled": "engine._smtpproto", "python": "engine._smtpproto_py"}

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PIPELINED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSmuggled\r\n"

LOOKALIKES = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "LFLF.LF": b"\n\n.\n",
    "CRLF.SP.CRLF": b"\r\n. \r\n",
    "CRLF..CRLF": b"\r\n..\r\n",
}


@pytest.fixture(scope="module", params=list(IMPLEMENTATIONS.values()), ids=list(IMPLEMENTATIONS))
def proto(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


def both() -> tuple[ModuleType, ModuleType]:
    compiled, python = (importlib.import_module(name) for name in IMPLEMENTATIONS.values())
    return compiled, python


def outcome(function: Callable, *args: object) -> tuple:
    """A call's result or its exception, comparable across implementations."""
    try:
        return ("ok", function(*args))
    except (ValueError, TypeError) as error:
        return ("error", type(error), error.args)


def scan_incrementally(find_data_end: Callable, wire: bytes, cuts: list[int]) -> int:
    """Feeds `wire` in chunks cut at `cuts` the way the server does; returns the first end found or -1."""
    buffer = bytearray()
    start = 0
    for first, last in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        old_length = len(buffer)
        buffer += wire[first:last]
        start = max(0, old_length - 4)
        end = find_data_end(buffer, start)
        if end >= 0:
            return end
    return -1


# find_data_end


def test_find_data_end_at_offset_zero(proto: ModuleType) -> None:
    assert proto.find_data_end(b".\r\n", 0) == 3
    assert proto.find_data_end(bytearray(b".\r\nQUIT\r\n"), 0) == 3


def test_find_data_end_after_content(proto: ModuleType) -> None:
    assert proto.find_data_end(b"Subject: hi\r\n\r\nbody\r\n.\r\n", 0) == 24
    assert proto.find_data_end(b"Subject: hi\r\n\r\nbody\r\n.\r\n" + PIPELINED, 0) == 24


def test_find_data_end_first_terminator_wins(proto: ModuleType) -> None:
    assert proto.find_data_end(b"a\r\n.\r\nb\r\n.\r\n", 0) == 6


def test_find_data_end_incomplete(proto: ModuleType) -> None:
    for partial in (b"", b".", b".\r", b"a\r\n", b"a\r\n.", b"a\r\n.\r"):
        assert proto.find_data_end(partial, 0) == -1


def test_find_data_end_stuffed_dot_is_not_terminator(proto: ModuleType) -> None:
    assert proto.find_data_end(b"..\r\n", 0) == -1
    assert proto.find_data_end(b"a\r\n..\r\nb\r\n", 0) == -1


@pytest.mark.parametrize("lookalike", list(LOOKALIKES.values()), ids=list(LOOKALIKES))
@pytest.mark.parametrize("after", [b"", PIPELINED], ids=["alone", "pipelined"])
def test_find_data_end_ignores_smuggling_lookalikes(proto: ModuleType, lookalike: bytes, after: bytes) -> None:
    content = b"Subject: x\r\n\r\nbody" + lookalike + after
    assert proto.find_data_end(content, 0) == -1
    real = content + b"\r\n.\r\n"
    assert proto.find_data_end(real, 0) == len(real)


@pytest.mark.parametrize("start", [b".\n", b".\r", b".\n\r\n", b".\r\r\n", b"\n.\r\n", b"\r.\r\n"])
def test_find_data_end_lookalikes_at_offset_zero(proto: ModuleType, start: bytes) -> None:
    assert proto.find_data_end(start + PIPELINED, 0) == -1


@pytest.mark.parametrize("lookalike", list(LOOKALIKES.values()), ids=list(LOOKALIKES))
def test_smuggled_message_is_refused_when_data_ends(proto: ModuleType, lookalike: bytes) -> None:
    """What passes the end-of-data scan with a lookalike inside must not be accepted as mail."""
    content = b"Subject: x\r\n\r\nbody" + lookalike + PIPELINED + b".\r\n"
    end = proto.find_data_end(content, 0)
    assert end == len(content)
    message, status = proto.decode_data(content, end - 3)
    if lookalike in (b"\r\n. \r\n", b"\r\n..\r\n"):
        unstuffed = lookalike.replace(b"\r\n.", b"\r\n", 1)
        assert (message, status) == (b"Subject: x\r\n\r\nbody" + unstuffed + PIPELINED, proto.OK)
    else:
        assert (message, status) == (b"", proto.BARE_LINE_ENDING)


def test_find_data_end_resumes_across_chunks(proto: ModuleType) -> None:
    wire = b"body\r\n.\r\n" + PIPELINED
    for cut in range(1, 9):
        assert scan_incrementally(proto.find_data_end, wire, [cut]) == 9
    assert scan_incrementally(proto.find_data_end, b".\r\nQUIT\r\n", [1, 2]) == 3


def test_find_data_end_at_every_offset(proto: ModuleType) -> None:
    """The terminator is found wherever it sits, across the compiled scanner's 256-octet blocks too."""
    for offset in range(600):
        content = b"x" * offset + b"\r\n.\r\n"
        assert proto.find_data_end(content + PIPELINED, 0) == offset + 5
        assert proto.find_data_end(content, max(0, offset - 3)) == offset + 5
        assert proto.find_data_end(content[:-1], 0) == -1


def test_find_data_end_start_past_terminator(proto: ModuleType) -> None:
    assert proto.find_data_end(b"a\r\n.\r\n", 2) == -1
    assert proto.find_data_end(b"a\r\n.\r\n", 1) == 6
    assert proto.find_data_end(b"a\r\n.\r\n", 100) == -1
    assert proto.find_data_end(b".\r\n", 1) == -1


def test_find_data_end_rejects_bad_arguments(proto: ModuleType) -> None:
    with pytest.raises(ValueError):
        proto.find_data_end(b".\r\n", -1)
    with pytest.raises(TypeError):
        proto.find_data_end(".\r\n", 0)


# decode_data


def test_decode_data_empty(proto: ModuleType) -> None:
    assert proto.decode_data(b".\r\n", 0) == (b"", proto.OK)


def test_decode_data_unstuffs_one_dot(proto: ModuleType) -> None:
    content = b"..leading\r\nplain\r\n...\r\n..\r\nmid.dle\r\n"
    assert proto.decode_data(content + b".\r\nQUIT\r\n", len(content)) == (
        b".leading\r\nplain\r\n..\r\n.\r\nmid.dle\r\n",
        proto.OK,
    )


def test_decode_data_returns_bytes(proto: ModuleType) -> None:
    message, status = proto.decode_data(bytearray(b"a\r\n.\r\n"), 3)
    assert (type(message), message, status) == (bytes, b"a\r\n", proto.OK)


@pytest.mark.parametrize(
    "content",
    [b"a\rb\r\n", b"a\nb\r\n", b"\n", b"a\r\r\n", b"a\n\r\n", b"a\r\n\n", b"\r", b"abc\r", b"a\r\n\rb\r\n"],
)
def test_decode_data_refuses_bare_line_endings(proto: ModuleType, content: bytes) -> None:
    assert proto.decode_data(content, len(content)) == (b"", proto.BARE_LINE_ENDING)


def test_decode_data_line_length(proto: ModuleType) -> None:
    fits = b"x" * 998 + b"\r\n"
    assert proto.decode_data(fits, len(fits)) == (fits, proto.OK)
    over = b"x" * 999 + b"\r\n"
    assert proto.decode_data(over, len(over)) == (b"", proto.LINE_TOO_LONG)
    stuffed = b"." + fits
    assert proto.decode_data(stuffed, len(stuffed)) == (fits, proto.OK)
    assert proto.decode_data(b"ab\r\n", 4, 4) == (b"ab\r\n", proto.OK)
    assert proto.decode_data(b"abc\r\n", 5, 4) == (b"", proto.LINE_TOO_LONG)


def test_decode_data_reports_first_problem(proto: ModuleType) -> None:
    long_then_bare = b"x" * 2000 + b"\r\nbare\n\r\n"
    assert proto.decode_data(long_then_bare, len(long_then_bare))[1] == proto.LINE_TOO_LONG
    bare_then_long = b"bare\n\r\n" + b"x" * 2000 + b"\r\n"
    assert proto.decode_data(bare_then_long, len(bare_then_long))[1] == proto.BARE_LINE_ENDING
    bare_inside_long = b"x" * 5 + b"\n" + b"x" * 2000 + b"\r\n"
    assert proto.decode_data(bare_inside_long, len(bare_inside_long))[1] == proto.BARE_LINE_ENDING
    bare_late_in_long = b"x" * 1500 + b"\n\r\n"
    assert proto.decode_data(bare_late_in_long, len(bare_late_in_long))[1] == proto.LINE_TOO_LONG


def test_decode_data_rejects_bad_arguments(proto: ModuleType) -> None:
    for length in (-1, 4):
        with pytest.raises(ValueError):
            proto.decode_data(b"a\r\n", length)
    with pytest.raises(ValueError):
        proto.decode_data(b"a\r\n", 3, 0)
    with pytest.raises(TypeError):
        proto.decode_data(memoryview(b"a\r\n"), 3)


# encode_data


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b".a\r\nb\r\n.\r\n..\r\n", b"..a\r\nb\r\n..\r\n...\r\n.\r\n"),
        (b"x\r\n.", b"x\r\n..\r\n.\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
    ],
)
def test_encode_data(proto: ModuleType, message: bytes, wire: bytes) -> None:
    assert proto.encode_data(message) == wire


@pytest.mark.parametrize("message", [b"a\nb", b"a\rb", b"a\r", b"\n", b"a\r\r\n", b"a\n.\r\n"])
def test_encode_data_refuses_bare_line_endings(proto: ModuleType, message: bytes) -> None:
    with pytest.raises(ValueError, match="bare CR or LF"):
        proto.encode_data(message)


def test_encode_data_line_length(proto: ModuleType) -> None:
    assert proto.encode_data(b"." + b"x" * 997 + b"\r\n").startswith(b"..x")
    assert proto.encode_data(b"x" * 998) == b"x" * 998 + b"\r\n.\r\n"
    for message in (b"x" * 999 + b"\r\n", b"x" * 999, b"ok\r\n" + b"x" * 5000 + b"\r\n"):
        with pytest.raises(ValueError, match="longer than 1000"):
            proto.encode_data(message)


# check_data


@pytest.mark.parametrize(
    ("message", "content"),
    [(b"", b""), (b"a", b"a\r\n"), (b"a\r\n", b"a\r\n"), (b".a\r\n.\r\n", b".a\r\n.\r\n"), (b"\r\n", b"\r\n")],
)
def test_check_data_leaves_dots_and_ends_with_crlf(proto: ModuleType, message: bytes, content: bytes) -> None:
    assert proto.check_data(message) == content
    assert proto.check_data(bytearray(message)) == content


@pytest.mark.parametrize("message", [b"a\nb", b"a\rb", b"a\r", b"\n", b"a\r\r\n"])
def test_check_data_refuses_bare_line_endings(proto: ModuleType, message: bytes) -> None:
    with pytest.raises(ValueError, match="bare CR or LF"):
        proto.check_data(message)


def test_content_status_names_the_first_problem(proto: ModuleType) -> None:
    assert proto.content_status(b"") == proto.content_status(b"a\r\n.\r\nb") == proto.OK
    assert proto.content_status(b"x" * 999 + b"\r\nbare\n") == proto.LINE_TOO_LONG
    assert proto.content_status(b"bare\n" + b"x" * 999 + b"\r\n") == proto.BARE_LINE_ENDING


def test_check_data_line_length(proto: ModuleType) -> None:
    assert proto.check_data(b"x" * 998) == b"x" * 998 + b"\r\n"
    for message in (b"x" * 999 + b"\r\n", b"ok\r\n" + b"x" * 5000 + b"\r\n"):
        with pytest.raises(ValueError, match="longer than 1000"):
            proto.check_data(message)


# split_command


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"mail FROM:<a@b> SIZE=10", (b"MAIL", b"FROM:<a@b> SIZE=10")),
        (b"", (b"", b"")),
        (b"quit", (b"QUIT", b"")),
        (b"NOOP   ", (b"NOOP", b"")),
        (b"rcpt\tTO:<a@b>\t ", (b"RCPT", b"TO:<a@b>")),
        (b"  ehlo x", (b"", b"ehlo x")),
        (b"eHlo  client.example  ", (b"EHLO", b"client.example")),
        (b"\xe9hlo x", (b"\xe9HLO", b"x")),
        (b"data\r", (b"DATA\r", b"")),
    ],
)
def test_split_command(proto: ModuleType, line: bytes, expected: tuple[bytes, bytes]) -> None:
    assert proto.split_command(line) == expected
    assert proto.split_command(bytearray(line)) == expected


# parse_path

VALID_PATHS = [
    (b"FROM:<a@b.example>", b"FROM:", "a@b.example", {}),
    (b"from: <a@b.example>", b"FROM:", "a@b.example", {}),
    (b"FROM:<>", b"FROM:", "", {}),
    (b"FROM:<> BODY=8BITMIME", b"FROM:", "", {"BODY": "8BITMIME"}),
    (
        b"FROM:<a@b> SIZE=100 body=8BITMIME SMTPUTF8",
        b"FROM:",
        "a@b",
        {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None},
    ),
    (b"TO:<postmaster>", b"TO:", "postmaster", {}),
    (b"TO:<PostMaster>", b"TO:", "PostMaster", {}),
    (b"TO:<postmaster@example.com>", b"TO:", "postmaster@example.com", {}),
    (b"TO:<@a.example,@b.example:user@c.example>", b"TO:", "user@c.example", {}),
    (b"TO:<@a.example:user@c.example>", b"TO:", "user@c.example", {}),
    (b'TO:<"john doe"@example.com>', b"TO:", '"john doe"@example.com', {}),
    (b'TO:<"a\\"b>c"@example.com>', b"TO:", '"a\\"b>c"@example.com', {}),
    (b'TO:<""@example.com>', b"TO:", '""@example.com', {}),
    (b"TO:<user+tag!#$%&'*/=?^_`{|}~-@example.com>", b"TO:", "user+tag!#$%&'*/=?^_`{|}~-@example.com", {}),
    (b"TO:<a@[192.0.2.1]>", b"TO:", "a@[192.0.2.1]", {}),
    (b"TO:<a@[IPv6:2001:db8::1]>", b"TO:", "a@[IPv6:2001:db8::1]", {}),
    (b"TO:<a@[ipv6:::ffff:192.0.2.1]>", b"TO:", "a@[ipv6:::ffff:192.0.2.1]", {}),
    (b"TO:<a@localhost>", b"TO:", "a@localhost", {}),
    (b"TO:<a@x-1.example>", b"TO:", "a@x-1.example", {}),
    ("TO:<jörg@bücher.example>".encode(), b"TO:", "jörg@bücher.example", {}),
    (b"TO:\t <a@b>  ", b"TO:", "a@b", {}),
    (b"TO:<a@b>  X-Y=1\tZ", b"TO:", "a@b", {"X-Y": "1", "Z": None}),
    ("FROM:<a@b> ENVID=ü".encode(), b"FROM:", "a@b", {"ENVID": "ü"}),
    (b"TO:<" + b"l" * 64 + b"@" + b"d" * 63 + b"." + b"e" * 63 + b"." + b"f" * 60 + b">", b"TO:", None, {}),
]


@pytest.mark.parametrize(("argument", "keyword", "address", "params"), VALID_PATHS)
def test_parse_path_valid(
    proto: ModuleType, argument: bytes, keyword: bytes, address: str | None, params: dict
) -> None:
    expected = address if address is not None else argument[4:-1].decode()
    assert proto.parse_path(argument, keyword) == (expected, params)
    assert proto.parse_path(bytearray(argument), keyword) == (expected, params)


INVALID_PATHS = [
    (b"<a@b>", b"FROM:", 501, "5.5.4"),
    (b"FROM <a@b>", b"FROM:", 501, "5.5.4"),
    (b"TO:<a@b>", b"FROM:", 501, "5.5.4"),
    (b"FROM:a@b", b"FROM:", 501, "5.5.4"),
    (b"FROM:", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b>garbage", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> SIZE=", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> =1", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> -X=1", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> SIZE=1 size=2", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> X=a=b", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> X=\x01", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> X=\xff", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> X_Y=1", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a@b> SIZE=1\rRCPT", b"FROM:", 501, "5.5.4"),
    (b"FROM:<a\r\n@b>", b"FROM:", 501, "5.1.7"),
    (b"TO:<a\r\n@b>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@b\rc>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@b\nRCPT TO:<c@d>", b"TO:", 501, "5.1.3"),
    (b"TO:<a\x00@b>", b"TO:", 501, "5.1.3"),
    (b"TO:<a\x7f@b>", b"TO:", 501, "5.1.3"),
    (b"TO:<a @b>", b"TO:", 501, "5.1.3"),
    (b"TO:< a@b>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@b >", b"TO:", 501, "5.1.3"),
    (b"TO:<a\t@b>", b"TO:", 501, "5.1.3"),
    (b'TO:<"unterminated@b>', b"TO:", 501, "5.1.3"),
    (b'TO:<"a\rb"@b>', b"TO:", 501, "5.1.3"),
    (b'TO:<"a\\\rb"@b>', b"TO:", 501, "5.1.3"),
    (b'TO:<"a\\\xc3\xa9"@b>', b"TO:", 501, "5.1.3"),
    (b'TO:<"a\\', b"TO:", 501, "5.1.3"),
    (b'TO:<"a"b@c>', b"TO:", 501, "5.1.3"),
    (b'TO:<a"b"@c>', b"TO:", 501, "5.1.3"),
    (b"TO:<.a@b>", b"TO:", 501, "5.1.3"),
    (b"TO:<a.@b>", b"TO:", 501, "5.1.3"),
    (b"TO:<a..b@c>", b"TO:", 501, "5.1.3"),
    (b"TO:<a(b)@c>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@-b.example>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@b-.example>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@b..example>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@b.example.>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@b_c.example>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@[300.1.1.1]>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@[1.2.3]>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@[IPv6:fe80::1%eth0]>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@[IPv6:1.2.3.4]>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@[tag:stuff]>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@[1.2.3.4>", b"TO:", 501, "5.1.3"),
    (b"TO:<a@b\xff>", b"TO:", 501, "5.1.3"),
    (b"FROM:<\xc3\x28@b>", b"FROM:", 501, "5.1.7"),
    ("TO:<a\u2028b@c>".encode(), b"TO:", 501, "5.1.3"),
    ("TO:<a\u00a0b@c>".encode(), b"TO:", 501, "5.1.3"),
    ("TO:<a\u0085b@c>".encode(), b"TO:", 501, "5.1.3"),
    (b"TO:<@a.example,user@c.example>", b"TO:", 501, "5.1.3"),
    (b"TO:<@,@b:user@c>", b"TO:", 501, "5.1.3"),
    (b"TO:<@a:>", b"TO:", 501, "5.1.3"),
    (b"TO:<@a:postmaster>", b"TO:", 501, "5.1.3"),
    (b"TO:<>", b"TO:", 553, "5.1.3"),
    (b"FROM:<postmaster>", b"FROM:", 553, "5.1.7"),
    (b"TO:<user>", b"TO:", 553, "5.1.3"),
    (b"FROM:<user>", b"FROM:", 553, "5.1.7"),
    (b"TO:<@b.example>", b"TO:", 553, "5.1.3"),
    (b"TO:<a@>", b"TO:", 553, "5.1.3"),
    (b"TO:<" + b"l" * 65 + b"@b>", b"TO:", 553, "5.1.3"),
    (b"FROM:<" + b"l" * 65 + b"@b>", b"FROM:", 553, "5.1.7"),
    (b"TO:<a@" + b"d" * 64 + b".example>", b"TO:", 553, "5.1.3"),
    (b"TO:<a@" + b"d." * 128 + b"e>", b"TO:", 553, "5.1.3"),
    (b"TO:<" + b"l" * 64 + b"@" + (b"d" * 63 + b".") * 3 + b"e" * 63 + b">", b"TO:", 553, "5.1.3"),
]


@pytest.mark.parametrize(("argument", "keyword", "code", "enhanced"), INVALID_PATHS)
def test_parse_path_invalid(proto: ModuleType, argument: bytes, keyword: bytes, code: int, enhanced: str) -> None:
    with pytest.raises(ValueError) as caught:
        proto.parse_path(argument, keyword)
    assert caught.value.args[:2] == (code, enhanced)
    assert isinstance(caught.value.args[2], str) and caught.value.args[2]


def test_parse_path_error_texts(proto: ModuleType) -> None:
    cases = {
        b"TO:<a @b>": "Space in address",
        b"TO:<a\r@b>": "Control character in address",
        b"TO:<a@b": "Missing > after the address",
        b"TO:<a>": "Address has no @domain",
        b"TO:<" + b"a" * 65 + b"@b>": "Local part longer than 64 octets",
    }
    for argument, text in cases.items():
        with pytest.raises(ValueError) as caught:
            proto.parse_path(argument, b"TO:")
        assert caught.value.args[2] == text


# the facade


@pytest.mark.parametrize(("pure", "expected"), [(None, "compiled"), ("1", "python")])
def test_facade_picks_implementation(pure: str | None, expected: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "ENGINE_PURE_PYTHON"}
    if pure is not None:
        env["ENGINE_PURE_PYTHON"] = pure
    code = (
        "from engine import smtpproto\n"
        "print(smtpproto.IMPLEMENTATION, smtpproto.find_data_end.__module__, smtpproto.LINE_TOO_LONG)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    module = IMPLEMENTATIONS[expected]
    assert result.stdout.split() == [expected, module, "2"]


# property tests: the two implementations agree on anything

SMTP_BYTES = st.binary(max_size=300) | st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"\r\n.\r\n", b"\r\n.", b"x" * 40, b"\x00"]),
    max_size=60,
).map(b"".join)


@PROPERTY
@given(buf=SMTP_BYTES, start=st.integers(0, 320))
def test_find_data_end_agrees(buf: bytes, start: int) -> None:
    compiled, python = both()
    assert compiled.find_data_end(buf, start) == python.find_data_end(buf, start)


@PROPERTY
@given(buf=SMTP_BYTES, data=st.data(), max_line=st.integers(1, 120))
def test_decode_data_agrees(buf: bytes, data: st.DataObject, max_line: int) -> None:
    compiled, python = both()
    length = data.draw(st.integers(0, len(buf)))
    assert outcome(compiled.decode_data, buf, length, max_line) == outcome(
        python.decode_data, bytearray(buf), length, max_line
    )


@PROPERTY
@given(message=SMTP_BYTES | st.binary(min_size=990, max_size=2100))
def test_encode_data_agrees(message: bytes) -> None:
    compiled, python = both()
    assert outcome(compiled.encode_data, message) == outcome(python.encode_data, message)


@PROPERTY
@given(message=SMTP_BYTES | st.binary(min_size=990, max_size=2100))
def test_check_data_agrees(message: bytes) -> None:
    compiled, python = both()
    assert outcome(compiled.check_data, message) == outcome(python.check_data, message)
    assert compiled.content_status(message) == python.content_status(bytearray(message))


@PROPERTY
@given(line=st.binary(max_size=40) | st.sampled_from([b"mail FROM:<a@b>", b"\t rcpt \t", b"x\ty z "]))
def test_split_command_agrees(line: bytes) -> None:
    compiled, python = both()
    assert compiled.split_command(line) == python.split_command(line)


PATH_PIECES = st.sampled_from(
    [
        b"a",
        b"Bc",
        b"b.example",
        b"@",
        b".",
        b"..",
        b'"',
        b"\\",
        b" ",
        b"\t",
        b"\r",
        b"\n",
        b"\x00",
        b"<",
        b">",
        b"[",
        b"]",
        b"192.0.2.1",
        b"IPv6:",
        b"::1",
        b"-",
        b",",
        b":",
        b"postmaster",
        "ü".encode(),
        b"\xff",
        b"\xc2\x85",
        b"=",
        b" SIZE=10",
        b" BODY=8BITMIME",
        b" SMTPUTF8",
        b"x" * 63,
        b"%",
        b"(",
    ]
)
ATOM = st.sampled_from([b"a", b"Bc", b"x" * 63, b"postmaster", b"+tag", "ü".encode(), b"-", b"9"])
LOCAL_PART = st.lists(ATOM, min_size=1, max_size=4).map(b".".join) | st.lists(
    st.sampled_from([b"a", b" ", b'\\"', b"\\\\", b">", b"@", "é".encode()]), max_size=5
).map(lambda parts: b'"' + b"".join(parts) + b'"')
DOMAIN = st.lists(ATOM, min_size=1, max_size=5).map(b".".join) | st.sampled_from(
    [b"[192.0.2.1]", b"[IPv6:2001:db8::1]", b"[IPv6:::ffff:192.0.2.1]", b"[1.2.3]", b"[x:y]"]
)
ROUTE = st.lists(DOMAIN, max_size=2).map(
    lambda domains: b",".join(b"@" + d for d in domains) + b":" if domains else b""
)
PARAMS = st.lists(
    st.sampled_from([b" SIZE=10", b" BODY=8BITMIME", b" SMTPUTF8", b"  X-Y=\xc3\xa9", b" size=1"]), max_size=3
)


@st.composite
def path_arguments(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Mostly well-formed MAIL/RCPT arguments, some with one piece of trouble spliced in."""
    keyword = draw(st.sampled_from([b"FROM:", b"TO:"]))
    mailbox = draw(
        st.sampled_from([b"", b"postmaster"])
        | st.builds(lambda local, domain: local + b"@" + domain, LOCAL_PART, DOMAIN)
    )
    argument = draw(st.sampled_from([keyword, keyword.lower()])) + draw(st.sampled_from([b"", b" "]))
    argument += b"<" + draw(ROUTE) + mailbox + b">" + b"".join(draw(PARAMS))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(argument)))
        argument = argument[:at] + draw(PATH_PIECES) + argument[at:]
    return argument, keyword


PATH_ARGUMENTS = (
    st.tuples(st.binary(max_size=60), st.sampled_from([b"FROM:", b"TO:"]))
    | st.builds(
        lambda keyword, blank, pieces: (keyword + blank + b"<" + b"".join(pieces), keyword.upper() or b"TO:"),
        st.sampled_from([b"FROM:", b"from:", b"TO:", b"To:"]),
        st.sampled_from([b"", b" ", b"\t "]),
        st.lists(PATH_PIECES, max_size=14),
    )
    | path_arguments()
)


@PROPERTY
@given(case=PATH_ARGUMENTS)
def test_parse_path_agrees(case: tuple[bytes, bytes]) -> None:
    argument, keyword = case
    compiled, python = both()
    assert outcome(compiled.parse_path, argument, keyword) == outcome(python.parse_path, argument, keyword)


# round trips

TEXT_LINE = st.binary(max_size=120).map(lambda line: line.replace(b"\r", b"").replace(b"\n", b""))
MESSAGE = st.lists(TEXT_LINE | st.sampled_from([b".", b"..", b".x", b"x" * 998]), max_size=30).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines)
)


@PROPERTY
@given(message=MESSAGE)
def test_decode_inverts_encode(message: bytes) -> None:
    for module in both():
        wire = module.encode_data(message)
        end = module.find_data_end(wire, 0)
        assert end == len(wire)
        assert module.decode_data(wire, end - 3) == (message, module.OK)


@PROPERTY
@given(message=MESSAGE, after=st.sampled_from([b"", PIPELINED, b".\r\n", b"\r\n.\r\n"]), data=st.data())
def test_terminator_found_whatever_the_chunking(message: bytes, after: bytes, data: st.DataObject) -> None:
    compiled, _ = both()
    wire = compiled.encode_data(message)
    stream = wire + after
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=12)))
    for module in both():
        assert scan_incrementally(module.find_data_end, stream, cuts) == len(wire)


@PROPERTY
@given(stream=SMTP_BYTES, data=st.data())
def test_incremental_scan_equals_one_shot(stream: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=12)))
    for module in both():
        assert scan_incrementally(module.find_data_end, stream, cuts) == module.find_data_end(stream, 0)
