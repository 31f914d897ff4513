"""Pure-Python twin of engine._smtpproto: the SMTP hot-path codec (end of DATA, dot-stuffing, commands, paths).

Same API and the same results, error texts included, as the compiled module; written for clarity and used
when no compiler was at hand or ENGINE_PURE_PYTHON=1. Only CRLF "." CRLF ends DATA and only CRLF ends a
line: anything else that looks like a line ending is refused, never passed on (SMTP smuggling,
CVE-2023-51764/51766).
"""

from __future__ import annotations

import ipaddress
import unicodedata

__all__ = [
    "BARE_LINE_ENDING",
    "LINE_TOO_LONG",
    "OK",
    "check_data",
    "content_status",
    "decode_data",
    "encode_data",
    "find_data_end",
    "parse_path",
    "split_command",
]

OK = 0
BARE_LINE_ENDING = 1
LINE_TOO_LONG = 2

_TERMINATOR = b"\r\n.\r\n"
_MAX_TEXT_LINE = 1000
_BLANKS = b" \t"
_DIGITS = b"0123456789"
_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ATEXT = frozenset(_LETTERS + _DIGITS + b"!#$%&'*+-/=?^_`{|}~")
_DOMAIN_CHARS = frozenset(_LETTERS + _DIGITS + b"-.")
_KEYWORD_CHARS = frozenset(_LETTERS + _DIGITS + b"-")
_ALNUM = frozenset(_LETTERS + _DIGITS)
_REFUSED_CATEGORIES = frozenset(("Cc", "Zs", "Zl", "Zp"))


def _check_buffer(buf: object) -> None:
    if not isinstance(buf, bytes | bytearray):
        raise TypeError(f"expected bytes or bytearray, not {type(buf).__name__}")


def find_data_end(buf: bytes | bytearray, start: int) -> int:
    """Index just past the first CRLF "." CRLF at or after `start`, or -1.

    The buffer is DATA content as if preceded by the CRLF that ended the DATA command, so b".\\r\\n" at
    offset 0 terminates. Resume with start = max(0, old_len - 4) after appending a chunk.
    """
    _check_buffer(buf)
    if start < 0:
        raise ValueError("start must not be negative")
    if start == 0 and buf.startswith(b".\r\n"):
        return 3
    index = buf.find(_TERMINATOR, start)
    return -1 if index < 0 else index + 5


def _first_problem(data: bytes, max_line: int, discount_dot: bool) -> int:
    """Status of the first bad line ending or over-long line, by the offset where it becomes evident.

    A bare CR or LF is evident at its own offset; an over-long line at its (max_line)th octet, the leading
    transparency dot not counted when `discount_dot` (RFC 5321 4.5.3.1.6). On a tie the bare one wins.
    A final line without CRLF is measured as if CRLF followed it.
    """
    lines = data.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    start = 0
    for line in lines:
        dot = 1 if discount_dot and line.startswith(b".") else 0
        evident = start + dot + max_line - 1
        bare = min((i for i in (line.find(b"\r"), line.find(b"\n")) if i >= 0), default=-1)
        if bare >= 0:
            return LINE_TOO_LONG if evident < start + bare else BARE_LINE_ENDING
        if len(line) + 2 - dot > max_line:
            return LINE_TOO_LONG
        start += len(line) + 2
    return OK


def _line_status(data: bytes, max_line: int, discount_dot: bool) -> int:
    """OK for CRLF-only text whose lines fit; the careful scan runs only when the quick check fails."""
    crlf = data.count(b"\r\n")
    lines = data.split(b"\r\n")
    if data.count(b"\r") == crlf == data.count(b"\n") and max(map(len, lines)) + 2 <= max_line:
        return OK
    return _first_problem(data, max_line, discount_dot)


def decode_data(buf: bytes | bytearray, length: int, max_line: int = _MAX_TEXT_LINE) -> tuple[bytes, int]:
    """Un-dot-stuffs buf[:length] (DATA content up to its terminator) and checks its line endings.

    Returns (message, status); message is b"" unless status is OK. Line length is counted with the CRLF
    and without the transparency dot.
    """
    _check_buffer(buf)
    if not 0 <= length <= len(buf):
        raise ValueError("length out of range")
    if max_line < 1:
        raise ValueError("max_line must be positive")
    data = bytes(buf[:length])
    status = _line_status(data, max_line, True)
    if status != OK:
        return b"", status
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n"), OK


def encode_data(message: bytes | bytearray) -> bytes:
    """Dot-stuffs a CRLF message for the wire and appends the terminator; ends it with CRLF if needed."""
    _check_buffer(message)
    data = bytes(message)
    status = _line_status(data, _MAX_TEXT_LINE, False)
    if status == BARE_LINE_ENDING:
        raise ValueError("bare CR or LF in message")
    if status == LINE_TOO_LONG:
        raise ValueError("line longer than 1000 octets")
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def content_status(content: bytes | bytearray) -> int:
    """OK, or BARE_LINE_ENDING / LINE_TOO_LONG for the first line of undotted content (BDAT) that SMTP
    cannot carry: a bare CR or LF, or more than 1000 octets with its CRLF."""
    _check_buffer(content)
    return _line_status(bytes(content), _MAX_TEXT_LINE, False)


def check_data(message: bytes | bytearray) -> bytes:
    """A CRLF message as BDAT content (RFC 3030: no dot-stuffing, no terminator), ending with CRLF; the same
    ValueError as encode_data for a line SMTP cannot carry."""
    _check_buffer(message)
    data = bytes(message)
    status = content_status(data)
    if status == BARE_LINE_ENDING:
        raise ValueError("bare CR or LF in message")
    if status == LINE_TOO_LONG:
        raise ValueError("line longer than 1000 octets")
    return data + b"\r\n" if data and not data.endswith(b"\r\n") else data


def split_command(line: bytes | bytearray) -> tuple[bytes, bytes]:
    """(VERB upper-cased, argument stripped of SP/HTAB) from a command line without its CRLF."""
    _check_buffer(line)
    cut = min((i for i in (line.find(b" "), line.find(b"\t")) if i >= 0), default=len(line))
    return bytes(line[:cut]).upper(), bytes(line[cut:]).strip(_BLANKS)


class _PathParser:
    """Recursive-descent parser for the argument of MAIL FROM / RCPT TO (RFC 5321 4.1.2, RFC 6531)."""

    def __init__(self, argument: bytes, is_mail: bool) -> None:
        self.arg = argument
        self.is_mail = is_mail
        self.enhanced = "5.1.7" if is_mail else "5.1.3"

    def error(self, text: str) -> ValueError:
        return ValueError(501, self.enhanced, text)

    def char_error(self, pos: int, text: str) -> ValueError:
        """The error for an unexpected octet at `pos` (or the end of the argument)."""
        if pos == len(self.arg):
            return ValueError(501, "5.5.4", "Missing > after the address")
        octet = self.arg[pos]
        if octet < 32 or octet == 127:
            return self.error("Control character in address")
        if octet == 32:
            return self.error("Space in address")
        return self.error(text)

    def at(self, pos: int) -> int:
        return self.arg[pos] if pos < len(self.arg) else -1

    def domain(self, pos: int) -> int:
        """Scans and checks the syntax of a domain starting at `pos`; returns where it ends."""
        arg = self.arg
        if self.at(pos) == 0x5B:
            end = pos + 1
            while end < len(arg) and arg[end] != 0x3E and (33 <= arg[end] <= 90 or 94 <= arg[end] <= 126):
                end += 1
            if self.at(end) != 0x5D:
                raise self.char_error(end, "Malformed address literal")
            if not _valid_literal(arg[pos + 1 : end]):
                raise self.error("Malformed address literal")
            return end + 1
        end = pos
        while end < len(arg) and (arg[end] in _DOMAIN_CHARS or arg[end] >= 0x80):
            end += 1
        if end > pos:
            for label in arg[pos:end].split(b"."):
                if not label or label.startswith(b"-") or label.endswith(b"-"):
                    raise self.error("Malformed domain")
        return end

    def local_part(self, pos: int) -> int:
        """Scans a Dot-string or Quoted-string local part starting at `pos`; returns where it ends."""
        arg = self.arg
        if self.at(pos) == 0x22:
            end = pos + 1
            while True:
                octet = self.at(end)
                if octet == 0x22:
                    return end + 1
                if octet == -1 or (octet == 0x5C and end + 1 == len(arg)):
                    raise self.error("Unterminated quoted local part")
                if octet == 0x5C:
                    end += 1
                    octet = arg[end]
                    if octet >= 0x80:
                        raise self.error("Malformed quoted local part")
                if octet < 32 or octet == 127:
                    raise self.error("Control character in address")
                end += 1
        end = pos
        while end < len(arg) and (arg[end] in _ATEXT or arg[end] == 0x2E or arg[end] >= 0x80):
            end += 1
        if end > pos and (arg[pos] == 0x2E or arg[end - 1] == 0x2E or b".." in arg[pos:end]):
            raise self.error("Malformed local part")
        return end

    def path(self, pos: int) -> tuple[bytes, bytes | None, int]:
        """Parses "<" [route ":"] mailbox ">" from the "<" at `pos`: (local part, domain, end of path).

        The domain is None when the path has no "@" (the null path, <postmaster>, or an error).
        """
        pos += 1
        if self.at(pos) == 0x3E:
            return b"", None, pos + 1
        routed = self.at(pos) == 0x40
        if routed:
            first = True
            while True:
                end = self.domain(pos + 1)
                if first and self.at(end) == 0x3E:
                    return b"", self.arg[pos + 1 : end], end + 1
                if end == pos + 1:
                    raise self.error("Malformed source route")
                first = False
                if self.at(end) == 0x2C and self.at(end + 1) == 0x40:
                    pos = end + 1
                    continue
                if self.at(end) == 0x3A:
                    pos = end + 1
                    break
                raise self.char_error(end, "Malformed source route")
        end = self.local_part(pos)
        local = self.arg[pos:end]
        if self.at(end) == 0x3E:
            if routed:
                raise self.error("Source route without a mailbox")
            return local, None, end + 1
        if self.at(end) != 0x40:
            raise self.char_error(end, "Invalid character in local part")
        start = end + 1
        end = self.domain(start)
        if self.at(end) != 0x3E:
            raise self.char_error(end, "Invalid character in domain")
        return local, self.arg[start:end], end + 1


def _valid_literal(literal: bytes) -> bool:
    """[1.2.3.4] or [IPv6:...] (RFC 5321 4.1.3); general address literals have no registered tag."""
    try:
        if literal[:5].upper() == b"IPV6:":
            return b"%" not in literal and bool(ipaddress.IPv6Address(literal[5:].decode("ascii")))
        return bool(ipaddress.IPv4Address(literal.decode("ascii")))
    except ValueError:
        return False


def _check_shape(local: bytes, domain: bytes | None, path_length: int, is_mail: bool, enhanced: str) -> None:
    """553 for an address that parses but cannot be a mailbox: missing parts or RFC 5321 4.5.3.1 sizes."""
    if domain is None:
        if not local and is_mail:
            return
        if not local:
            raise ValueError(553, enhanced, "The null path <> is not a recipient")
        if is_mail or local.lower() != b"postmaster":
            raise ValueError(553, enhanced, "Address has no @domain")
        return
    if not local:
        raise ValueError(553, enhanced, "Empty local part")
    if not domain:
        raise ValueError(553, enhanced, "Empty domain")
    if len(local) > 64:
        raise ValueError(553, enhanced, "Local part longer than 64 octets")
    if len(domain) > 255:
        raise ValueError(553, enhanced, "Domain longer than 255 octets")
    if not domain.startswith(b"[") and any(len(label) > 63 for label in domain.split(b".")):
        raise ValueError(553, enhanced, "Domain label longer than 63 octets")
    if path_length > 256:
        raise ValueError(553, enhanced, "Path longer than 256 octets")


def _decode_address(address: bytes, enhanced: str) -> str:
    try:
        text = address.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(501, enhanced, "Address is not valid UTF-8") from None
    if not text.isascii() and any(unicodedata.category(char) in _REFUSED_CATEGORIES for char in text):
        raise ValueError(501, enhanced, "Control or space character in address")
    return text


def _parse_params(argument: bytes, pos: int) -> dict[str, str | None]:
    """ESMTP parameters after the path: keyword[=value] separated by SP (RFC 5321 4.1.2, RFC 6531)."""
    params: dict[str, str | None] = {}
    if pos < len(argument) and argument[pos] not in _BLANKS:
        raise ValueError(501, "5.5.4", "Parameters must be separated from the address by a space")
    for token in argument[pos:].replace(b"\t", b" ").split(b" "):
        if not token:
            continue
        keyword, equals, value = token.partition(b"=")
        if (
            not keyword
            or keyword[0] not in _ALNUM
            or not all(octet in _KEYWORD_CHARS for octet in keyword)
            or (equals and not value)
            or any(octet < 33 or octet == 61 or octet == 127 for octet in value)
        ):
            raise ValueError(501, "5.5.4", "Malformed parameter")
        try:
            text = value.decode("utf-8") if equals else None
        except UnicodeDecodeError:
            raise ValueError(501, "5.5.4", "Malformed parameter") from None
        name = keyword.upper().decode("ascii")
        if name in params:
            raise ValueError(501, "5.5.4", "Duplicate parameter")
        params[name] = text
    return params


def parse_path(argument: bytes | bytearray, keyword: bytes) -> tuple[str, dict[str, str | None]]:
    """(address, params) from the argument of MAIL (keyword b"FROM:") or RCPT (any other keyword, b"TO:").

    The address comes without angle brackets or source route, "" for the null path; errors raise
    ValueError(code, enhanced status, text), ready to be sent as the reply.
    """
    _check_buffer(argument)
    _check_buffer(keyword)
    argument = bytes(argument)
    is_mail = keyword.upper() == b"FROM:"
    if argument[: len(keyword)].upper() != keyword.upper():
        usage = "MAIL FROM:<address>" if is_mail else "RCPT TO:<address>"
        raise ValueError(501, "5.5.4", f"Syntax: {usage} [parameters]")
    pos = len(keyword)
    while pos < len(argument) and argument[pos] in _BLANKS:
        pos += 1
    if pos == len(argument) or argument[pos] != 0x3C:
        raise ValueError(501, "5.5.4", "Address must be enclosed in <>")
    parser = _PathParser(argument, is_mail)
    local, domain, end = parser.path(pos)
    address = local if domain is None else local + b"@" + domain
    text = _decode_address(address, parser.enhanced)
    _check_shape(local, domain, end - pos, is_mail, parser.enhanced)
    return text, _parse_params(argument, end)
