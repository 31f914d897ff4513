# cython: language_level=3
"""The SMTP hot-path codec, compiled: end of DATA, dot-stuffing, command splitting, MAIL/RCPT paths.

Works on the raw buffer with memchr/memmem and byte tables; Python objects appear only for results and
errors. engine/_smtpproto_py.py is the readable twin with the same API and results (error texts
included). Only CRLF "." CRLF ends DATA and only CRLF ends a line (SMTP smuggling, CVE-2023-51764/51766).
"""

import ipaddress
import unicodedata

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Check, PyByteArray_GET_SIZE
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcpy


cdef extern from "string.h" nogil:
    void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen)


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

cdef enum:
    _OK = 0
    _BARE = 1
    _TOO_LONG = 2
    _MAX_TEXT_LINE = 1000
    _ATEXT = 1
    _DOMAIN = 2
    _KEYWORD = 4
    _ALNUM = 8
    _BLOCK = 256

cdef unsigned char _CLASS[256]
cdef int _i
for _i in range(256):
    _CLASS[_i] = 0
for _i in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
    _CLASS[_i] = _ATEXT | _DOMAIN | _KEYWORD | _ALNUM
for _i in b"!#$%&'*+/=?^_`{|}~":
    _CLASS[_i] = _ATEXT
_CLASS[ord("-")] = _ATEXT | _DOMAIN | _KEYWORD

_REFUSED_CATEGORIES = frozenset(("Cc", "Zs", "Zl", "Zp"))


cdef inline const unsigned char *_view(object buf, Py_ssize_t *size) except NULL:
    if PyBytes_Check(buf):
        size[0] = PyBytes_GET_SIZE(buf)
        return <const unsigned char *>PyBytes_AS_STRING(buf)
    if PyByteArray_Check(buf):
        size[0] = PyByteArray_GET_SIZE(buf)
        return <const unsigned char *>PyByteArray_AS_STRING(buf)
    raise TypeError(f"expected bytes or bytearray, not {type(buf).__name__}")


cdef inline bint _terminator_at(const unsigned char *p, Py_ssize_t i) noexcept nogil:
    return p[i] == 13 and p[i + 1] == 10 and p[i + 2] == 46 and p[i + 3] == 13 and p[i + 4] == 10


def find_data_end(buf, Py_ssize_t start) -> int:
    """Index just past the first CRLF "." CRLF at or after `start`, or -1.

    The buffer is DATA content as if preceded by the CRLF that ended the DATA command, so b".\\r\\n" at
    offset 0 terminates. Resume with start = max(0, old_len - 4) after appending a chunk. Blocks are
    tested for a terminator without branches (vectorised, about 3x memmem), and only a block that has
    one is searched for its offset.
    """
    cdef Py_ssize_t n, i, block_end, last
    cdef const unsigned char *p = _view(buf, &n)
    cdef unsigned char seen
    if start < 0:
        raise ValueError("start must not be negative")
    if start == 0 and n >= 3 and p[0] == b"." and p[1] == b"\r" and p[2] == b"\n":
        return 3
    last = n - 4
    while start < last:
        block_end = start + _BLOCK if last - start > _BLOCK else last
        seen = 0
        for i in range(start, block_end):
            seen |= (p[i] == 13) & (p[i + 1] == 10) & (p[i + 2] == 46) & (p[i + 3] == 13) & (p[i + 4] == 10)
        if seen:
            for i in range(start, block_end):
                if _terminator_at(p, i):
                    return i + 5
        start = block_end
    return -1


cdef bint _crlf_only(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """True when every CR is followed by LF and every LF follows a CR.

    No early exit and no branches, so the compiler vectorises it: the clean case costs a fraction of a
    line-by-line scan, which is left to the rare buffer that has a problem to locate.
    """
    cdef Py_ssize_t i
    cdef unsigned char bad = 0
    if n == 0:
        return True
    for i in range(n - 1):
        bad |= (p[i] == 13) ^ (p[i + 1] == 10)
    return not bad and p[0] != b"\n" and p[n - 1] != b"\r"


cdef inline int _line(
    const unsigned char *p, Py_ssize_t s, Py_ssize_t n, Py_ssize_t max_line, bint discount_dot,
    Py_ssize_t *next_start,
) noexcept nogil:
    """Checks the line at `s` (s < n) and sets next_start past its CRLF.

    A bare CR or LF is evident at its own offset, an over-long line at its (max_line)th octet, the
    transparency dot not counted when `discount_dot` (RFC 5321 4.5.3.1.6); on a tie the bare one wins.
    A final line without CRLF is measured as if CRLF followed it. max_line must be at most n + 4.
    """
    cdef Py_ssize_t content = s + 1 if discount_dot and p[s] == b"." else s
    cdef const unsigned char *lf = <const unsigned char *>memchr(p + s, b"\n", n - s)
    cdef Py_ssize_t end = lf - p if lf != NULL else n
    cdef const unsigned char *cr = <const unsigned char *>memchr(p + s, b"\r", end - s)
    cdef Py_ssize_t bare = -1
    if cr != NULL:
        if lf == NULL or cr - p != end - 1:
            bare = cr - p
    elif lf != NULL:
        bare = end
    if bare >= 0:
        return _TOO_LONG if content + max_line - 1 < bare else _BARE
    if lf != NULL:
        next_start[0] = end + 1
        return _TOO_LONG if end - content >= max_line else _OK
    next_start[0] = n
    return _TOO_LONG if n - content + 2 > max_line else _OK


cdef int _first_problem(const unsigned char *p, Py_ssize_t n, Py_ssize_t max_line, bint discount_dot) noexcept nogil:
    """Status of the first problem, line by line (see _line); OK when there is none."""
    cdef Py_ssize_t s = 0
    cdef int status
    if max_line > n + 4:
        max_line = n + 4
    while s < n:
        status = _line(p, s, n, max_line, discount_dot, &s)
        if status != _OK:
            return status
    return _OK


cdef inline Py_ssize_t _octets(
    const unsigned char *p, Py_ssize_t s, Py_ssize_t n, bint discount_dot, Py_ssize_t *next_start
) noexcept nogil:
    """Length with CRLF of the line at `s` in CRLF-only text (see _line), and where the next one starts."""
    cdef const unsigned char *lf = <const unsigned char *>memchr(p + s, b"\n", n - s)
    cdef Py_ssize_t dot = 1 if discount_dot and p[s] == b"." else 0
    if lf == NULL:
        next_start[0] = n
        return n - s + 2 - dot
    next_start[0] = lf - p + 1
    return lf - p + 1 - s - dot


def decode_data(buf, Py_ssize_t length, Py_ssize_t max_line=_MAX_TEXT_LINE) -> tuple:
    """Un-dot-stuffs buf[:length] (DATA content up to its terminator) and checks its line endings.

    Returns (message, status); message is b"" unless status is OK. Line length is counted with the CRLF
    and without the transparency dot. Linear: a vectorised line-ending check, then one memchr per line;
    the copy is made only once a dot has to go.
    """
    cdef Py_ssize_t n
    cdef const unsigned char *p = _view(buf, &n)
    cdef Py_ssize_t s = 0, next_start = 0, copied = 0, written = 0
    cdef unsigned char *out = NULL
    if length < 0 or length > n:
        raise ValueError("length out of range")
    if max_line < 1:
        raise ValueError("max_line must be positive")
    if not _crlf_only(p, length):
        return b"", _first_problem(p, length, max_line, True)
    try:
        while s < length:
            if _octets(p, s, length, True, &next_start) > max_line:
                return b"", _TOO_LONG
            if p[s] == b".":
                if out == NULL:
                    out = <unsigned char *>PyMem_Malloc(length)
                    if out == NULL:
                        raise MemoryError()
                memcpy(out + written, p + copied, s - copied)
                written += s - copied
                copied = s + 1
            s = next_start
        if out == NULL:
            if PyBytes_CheckExact(buf) and length == n:
                return buf, _OK
            return PyBytes_FromStringAndSize(<char *>p, length), _OK
        memcpy(out + written, p + copied, length - copied)
        written += length - copied
        return PyBytes_FromStringAndSize(<char *>out, written), _OK
    finally:
        PyMem_Free(out)


def encode_data(message) -> bytes:
    """Dot-stuffs a CRLF message for the wire and appends the terminator; ends it with CRLF if needed."""
    cdef Py_ssize_t n
    cdef const unsigned char *p = _view(message, &n)
    cdef Py_ssize_t s = 0, next_start = 0, dots = 0, size, written = 0
    cdef bint add_crlf
    cdef int status = _OK
    cdef bytes result
    cdef char *out
    if not _crlf_only(p, n):
        status = _first_problem(p, n, _MAX_TEXT_LINE, False)
    while status == _OK and s < n:
        if _octets(p, s, n, False, &next_start) > _MAX_TEXT_LINE:
            status = _TOO_LONG
        dots += p[s] == b"."
        s = next_start
    if status == _BARE:
        raise ValueError("bare CR or LF in message")
    if status == _TOO_LONG:
        raise ValueError("line longer than 1000 octets")
    add_crlf = n > 0 and p[n - 1] != b"\n"
    size = n + dots + (2 if add_crlf else 0) + 3
    result = PyBytes_FromStringAndSize(NULL, size)
    out = PyBytes_AS_STRING(result)
    s = 0
    while s < n:
        if p[s] == b".":
            out[written] = b"."
            written += 1
        _octets(p, s, n, False, &next_start)
        if dots == 0:
            next_start = n
        memcpy(out + written, p + s, next_start - s)
        written += next_start - s
        s = next_start
    if add_crlf:
        memcpy(out + written, b"\r\n", 2)
        written += 2
    memcpy(out + written, b".\r\n", 3)
    return result


cdef int _content_status(const unsigned char *p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t s = 0, next_start = 0
    cdef int status = _OK
    if not _crlf_only(p, n):
        status = _first_problem(p, n, _MAX_TEXT_LINE, False)
    while status == _OK and s < n:
        if _octets(p, s, n, False, &next_start) > _MAX_TEXT_LINE:
            status = _TOO_LONG
        s = next_start
    return status


def content_status(content) -> int:
    """OK, or BARE_LINE_ENDING / LINE_TOO_LONG for the first line of undotted content (BDAT) that SMTP
    cannot carry: a bare CR or LF, or more than 1000 octets with its CRLF."""
    cdef Py_ssize_t n
    cdef const unsigned char *p = _view(content, &n)
    return _content_status(p, n)


def check_data(message) -> bytes:
    """A CRLF message as BDAT content (RFC 3030: no dot-stuffing, no terminator), ending with CRLF; the same
    ValueError as encode_data for a line SMTP cannot carry."""
    cdef Py_ssize_t n
    cdef const unsigned char *p = _view(message, &n)
    cdef int status = _content_status(p, n)
    if status == _BARE:
        raise ValueError("bare CR or LF in message")
    if status == _TOO_LONG:
        raise ValueError("line longer than 1000 octets")
    data = message if type(message) is bytes else bytes(message)
    return data + b"\r\n" if n > 0 and p[n - 1] != b"\n" else data


def split_command(line) -> tuple:
    """(VERB upper-cased, argument stripped of SP/HTAB) from a command line without its CRLF."""
    cdef Py_ssize_t n, cut = 0, i, first, last
    cdef const unsigned char *p = _view(line, &n)
    cdef unsigned char c
    cdef bytes verb
    cdef char *v
    while cut < n and p[cut] != b" " and p[cut] != b"\t":
        cut += 1
    verb = PyBytes_FromStringAndSize(NULL, cut)
    v = PyBytes_AS_STRING(verb)
    for i in range(cut):
        c = p[i]
        v[i] = c - 32 if b"a" <= c <= b"z" else c
    first = cut
    last = n
    while first < last and (p[first] == b" " or p[first] == b"\t"):
        first += 1
    while last > first and (p[last - 1] == b" " or p[last - 1] == b"\t"):
        last -= 1
    return verb, PyBytes_FromStringAndSize(<char *>p + first, last - first)


cdef inline int _at(const unsigned char *a, Py_ssize_t n, Py_ssize_t pos) noexcept nogil:
    return a[pos] if pos < n else -1


cdef inline unsigned char _upper(unsigned char c) noexcept nogil:
    return c - 32 if b"a" <= c <= b"z" else c


cdef bint _same_ignoring_case(const unsigned char *a, const unsigned char *b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if _upper(a[i]) != _upper(b[i]):
            return False
    return True


cdef object _char_error(const unsigned char *a, Py_ssize_t n, Py_ssize_t pos, str enhanced, str text):
    """The error for an unexpected octet at `pos` (or the end of the argument)."""
    if pos == n:
        return ValueError(501, "5.5.4", "Missing > after the address")
    cdef unsigned char octet = a[pos]
    if octet < 32 or octet == 127:
        return ValueError(501, enhanced, "Control character in address")
    if octet == 32:
        return ValueError(501, enhanced, "Space in address")
    return ValueError(501, enhanced, text)


cdef bint _valid_literal(bytes literal):
    """[1.2.3.4] or [IPv6:...] (RFC 5321 4.1.3); general address literals have no registered tag."""
    try:
        if literal[:5].upper() == b"IPV6:":
            return b"%" not in literal and bool(ipaddress.IPv6Address(literal[5:].decode("ascii")))
        return bool(ipaddress.IPv4Address(literal.decode("ascii")))
    except ValueError:
        return False


cdef Py_ssize_t _domain(const unsigned char *a, Py_ssize_t n, Py_ssize_t pos, str enhanced) except -1:
    """Scans and checks the syntax of a domain starting at `pos`; returns where it ends."""
    cdef Py_ssize_t end, i, label
    if _at(a, n, pos) == b"[":
        end = pos + 1
        while end < n and a[end] != b">" and (33 <= a[end] <= 90 or 94 <= a[end] <= 126):
            end += 1
        if _at(a, n, end) != b"]":
            raise _char_error(a, n, end, enhanced, "Malformed address literal")
        if not _valid_literal(PyBytes_FromStringAndSize(<char *>a + pos + 1, end - pos - 1)):
            raise ValueError(501, enhanced, "Malformed address literal")
        return end + 1
    end = pos
    while end < n and (_CLASS[a[end]] & _DOMAIN or a[end] == b"." or a[end] >= 0x80):
        end += 1
    if end > pos:
        label = pos
        for i in range(pos, end + 1):
            if i == end or a[i] == b".":
                if i == label or a[label] == b"-" or a[i - 1] == b"-":
                    raise ValueError(501, enhanced, "Malformed domain")
                label = i + 1
    return end


cdef Py_ssize_t _local_part(const unsigned char *a, Py_ssize_t n, Py_ssize_t pos, str enhanced) except -1:
    """Scans a Dot-string or Quoted-string local part starting at `pos`; returns where it ends."""
    cdef Py_ssize_t end
    cdef int octet
    if _at(a, n, pos) == b'"':
        end = pos + 1
        while True:
            octet = _at(a, n, end)
            if octet == b'"':
                return end + 1
            if octet == -1 or (octet == b"\\" and end + 1 == n):
                raise ValueError(501, enhanced, "Unterminated quoted local part")
            if octet == b"\\":
                end += 1
                octet = a[end]
                if octet >= 0x80:
                    raise ValueError(501, enhanced, "Malformed quoted local part")
            if octet < 32 or octet == 127:
                raise ValueError(501, enhanced, "Control character in address")
            end += 1
    end = pos
    while end < n and (_CLASS[a[end]] & _ATEXT or a[end] == b"." or a[end] >= 0x80):
        end += 1
    if end > pos and (a[pos] == b"." or a[end - 1] == b"." or memmem(a + pos, end - pos, b"..", 2) != NULL):
        raise ValueError(501, enhanced, "Malformed local part")
    return end


cdef Py_ssize_t _path(
    const unsigned char *a, Py_ssize_t n, Py_ssize_t pos, str enhanced,
    Py_ssize_t *local, Py_ssize_t *at_sign, Py_ssize_t *domain_end,
) except -1:
    """Parses "<" [route ":"] mailbox ">" from the "<" at `pos`; returns the end of the path.

    Sets the start of the local part, the "@" (-1 when the path has none: the null path, <postmaster>,
    or an error) and the end of the domain.
    """
    cdef Py_ssize_t end
    cdef bint first = True, routed
    pos += 1
    at_sign[0] = -1
    if _at(a, n, pos) == b">":
        local[0] = pos
        domain_end[0] = pos
        return pos + 1
    routed = _at(a, n, pos) == b"@"
    if routed:
        while True:
            end = _domain(a, n, pos + 1, enhanced)
            if first and _at(a, n, end) == b">":
                local[0] = pos
                at_sign[0] = pos
                domain_end[0] = end
                return end + 1
            if end == pos + 1:
                raise ValueError(501, enhanced, "Malformed source route")
            first = False
            if _at(a, n, end) == b"," and _at(a, n, end + 1) == b"@":
                pos = end + 1
                continue
            if _at(a, n, end) == b":":
                pos = end + 1
                break
            raise _char_error(a, n, end, enhanced, "Malformed source route")
    end = _local_part(a, n, pos, enhanced)
    local[0] = pos
    if _at(a, n, end) == b">":
        if routed:
            raise ValueError(501, enhanced, "Source route without a mailbox")
        domain_end[0] = end
        return end + 1
    if _at(a, n, end) != b"@":
        raise _char_error(a, n, end, enhanced, "Invalid character in local part")
    at_sign[0] = end
    end = _domain(a, n, end + 1, enhanced)
    if _at(a, n, end) != b">":
        raise _char_error(a, n, end, enhanced, "Invalid character in domain")
    domain_end[0] = end
    return end + 1


cdef str _decode_address(const unsigned char *a, Py_ssize_t start, Py_ssize_t end, str enhanced):
    try:
        text = PyUnicode_DecodeUTF8(<char *>a + start, end - start, "strict")
    except UnicodeDecodeError:
        raise ValueError(501, enhanced, "Address is not valid UTF-8") from None
    if not text.isascii() and any(unicodedata.category(char) in _REFUSED_CATEGORIES for char in text):
        raise ValueError(501, enhanced, "Control or space character in address")
    return text


cdef int _check_shape(
    const unsigned char *a, Py_ssize_t local, Py_ssize_t at_sign, Py_ssize_t domain_end,
    Py_ssize_t path_length, bint is_mail, str enhanced,
) except -1:
    """553 for an address that parses but cannot be a mailbox: missing parts or RFC 5321 4.5.3.1 sizes."""
    cdef Py_ssize_t i, label
    if at_sign < 0:
        if domain_end == local:
            if is_mail:
                return 0
            raise ValueError(553, enhanced, "The null path <> is not a recipient")
        if is_mail or domain_end - local != 10 or not _same_ignoring_case(a + local, b"POSTMASTER", 10):
            raise ValueError(553, enhanced, "Address has no @domain")
        return 0
    if at_sign == local:
        raise ValueError(553, enhanced, "Empty local part")
    if domain_end == at_sign + 1:
        raise ValueError(553, enhanced, "Empty domain")
    if at_sign - local > 64:
        raise ValueError(553, enhanced, "Local part longer than 64 octets")
    if domain_end - at_sign - 1 > 255:
        raise ValueError(553, enhanced, "Domain longer than 255 octets")
    if a[at_sign + 1] != b"[":
        label = at_sign + 1
        for i in range(at_sign + 1, domain_end + 1):
            if i == domain_end or a[i] == b".":
                if i - label > 63:
                    raise ValueError(553, enhanced, "Domain label longer than 63 octets")
                label = i + 1
    if path_length > 256:
        raise ValueError(553, enhanced, "Path longer than 256 octets")
    return 0


cdef dict _parse_params(const unsigned char *a, Py_ssize_t n, Py_ssize_t pos):
    """ESMTP parameters after the path: keyword[=value] separated by SP (RFC 5321 4.1.2, RFC 6531)."""
    cdef dict params = {}
    cdef Py_ssize_t start, equals, keyword_end, i
    cdef bint bad
    cdef unsigned char octet
    if pos < n and a[pos] != b" " and a[pos] != b"\t":
        raise ValueError(501, "5.5.4", "Parameters must be separated from the address by a space")
    while True:
        while pos < n and (a[pos] == b" " or a[pos] == b"\t"):
            pos += 1
        if pos == n:
            return params
        start = pos
        equals = -1
        while pos < n and a[pos] != b" " and a[pos] != b"\t":
            if equals < 0 and a[pos] == b"=":
                equals = pos
            pos += 1
        keyword_end = equals if equals >= 0 else pos
        bad = keyword_end == start or not _CLASS[a[start]] & _ALNUM or equals == pos - 1
        for i in range(start, keyword_end):
            if not _CLASS[a[i]] & _KEYWORD:
                bad = True
        if equals >= 0:
            for i in range(equals + 1, pos):
                octet = a[i]
                if octet < 33 or octet == 61 or octet == 127:
                    bad = True
        if bad:
            raise ValueError(501, "5.5.4", "Malformed parameter")
        value = None
        if equals >= 0:
            try:
                value = PyUnicode_DecodeUTF8(<char *>a + equals + 1, pos - equals - 1, "strict")
            except UnicodeDecodeError:
                raise ValueError(501, "5.5.4", "Malformed parameter") from None
        name = PyBytes_FromStringAndSize(<char *>a + start, keyword_end - start).upper().decode("ascii")
        if name in params:
            raise ValueError(501, "5.5.4", "Duplicate parameter")
        params[name] = value


def parse_path(argument, keyword) -> tuple:
    """(address, params) from the argument of MAIL (keyword b"FROM:") or RCPT (any other keyword, b"TO:").

    The address comes without angle brackets or source route, "" for the null path; errors raise
    ValueError(code, enhanced status, text), ready to be sent as the reply.
    """
    cdef Py_ssize_t n, klen, pos, end, local = 0, at_sign = -1, domain_end = 0
    cdef const unsigned char *a = _view(argument, &n)
    cdef const unsigned char *k = _view(keyword, &klen)
    cdef bint is_mail = klen == 5 and _same_ignoring_case(k, b"FROM:", 5)
    cdef str enhanced = "5.1.7" if is_mail else "5.1.3"
    if n < klen or not _same_ignoring_case(a, k, klen):
        usage = "MAIL FROM:<address>" if is_mail else "RCPT TO:<address>"
        raise ValueError(501, "5.5.4", f"Syntax: {usage} [parameters]")
    pos = klen
    while pos < n and (a[pos] == b" " or a[pos] == b"\t"):
        pos += 1
    if pos == n or a[pos] != b"<":
        raise ValueError(501, "5.5.4", "Address must be enclosed in <>")
    end = _path(a, n, pos, enhanced, &local, &at_sign, &domain_end)
    text = _decode_address(a, local, domain_end, enhanced)
    _check_shape(a, local, at_sign, domain_end, end - pos, is_mail, enhanced)
    return text, _parse_params(a, n, end)
