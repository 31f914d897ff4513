"""DKIM body canonicalisation (RFC 6376 3.4.3, 3.4.4) in one pass over the bytes.

dkimpy's relaxed body canonicalisation runs three regular expressions over the whole body, ~9 ms for
100 KB. Most bodies (wrapped text, base64, quoted-printable) have nothing relaxed would change, so a
vectorisable scan first looks for the only things it changes (a tab, two blanks in a row, a blank before
CRLF); only a body that has one is copied, from that point on, by the squeezing loop. The pure twin is
engine._dkimcanon_py.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

DEF SCAN_BLOCK = 4096


cdef Py_ssize_t _tail(const char* data, Py_ssize_t size) noexcept nogil:
    """Length of `data` after trailing CRLF pairs; -1 when it does not end with CRLF."""
    cdef Py_ssize_t end = size
    while end >= 2 and data[end - 2] == b"\r" and data[end - 1] == b"\n":
        end -= 2
    return -1 if end == size else end


cdef Py_ssize_t _first_change(const unsigned char* data, Py_ssize_t size) noexcept nogil:
    """Where relaxed canonicalisation would first change something (a tab, or a blank followed by a
    blank or by CRLF), else `size`. Blocks are tested by a loop without branches that the compiler turns
    into vector instructions; only a block with a candidate is searched byte by byte."""
    cdef Py_ssize_t start = 0, stop, i
    cdef unsigned char hit, c, d
    while start < size - 1:
        stop = min(start + SCAN_BLOCK, size - 1)
        hit = 0
        for i in range(start, stop):
            c = data[i]
            d = data[i + 1]
            hit |= (c == 9) | ((c == 32) & ((d == 32) | (d == 9) | (d == 13)))
        if hit:
            for i in range(start, stop):
                c = data[i]
                d = data[i + 1]
                if c == 9 or (c == 32 and (d == 32 or d == 9 or (d == 13 and i + 2 < size and data[i + 2] == 10))):
                    return i
        start = stop
    if size and data[size - 1] == 9:
        return size - 1
    return size


cdef Py_ssize_t _squeeze(const char* src, Py_ssize_t size, char* dst) noexcept nogil:
    """Relaxed whitespace rules over src into dst; returns the length written (before the tail rule)."""
    cdef Py_ssize_t i = 0, j = 0
    cdef bint space = False
    cdef char c
    while i < size:
        c = src[i]
        if c == b" " or c == b"\t":
            space = True
        elif c == b"\r" and i + 1 < size and src[i + 1] == b"\n":
            space = False
            dst[j] = b"\r"
            dst[j + 1] = b"\n"
            j += 2
            i += 1
        else:
            if space:
                dst[j] = b" "
                j += 1
                space = False
            dst[j] = c
            j += 1
        i += 1
    if space:
        dst[j] = b" "
        j += 1
    return j


def simple_body(bytes body not None) -> bytes:
    """The body with trailing empty lines removed and a CRLF ensured at the end."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t end = _tail(PyBytes_AS_STRING(body), size)
    if end < 0:
        return body + b"\r\n"
    return body[: end + 2]


def relaxed_body(bytes body not None) -> bytes:
    """Simple, plus whitespace runs squeezed to one space and whitespace before each CRLF dropped."""
    cdef const char* src = PyBytes_AS_STRING(body)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t first, j, end
    cdef char* dst
    with nogil:
        first = _first_change(<const unsigned char*>src, size)
    if first == size:
        # Nothing to squeeze, but a lone trailing blank is one: _squeeze keeps it as it is too.
        end = _tail(src, size)
        if end < 0:
            return body + b"\r\n" if size else body
        if end == 0:
            return b""
        return body if end + 2 == size else body[: end + 2]
    dst = <char*>malloc(size + 2)
    if dst == NULL:
        raise MemoryError()
    with nogil:
        memcpy(dst, src, first)
        j = first + _squeeze(src + first, size - first, dst + first)
        end = _tail(dst, j)
        if end < 0 and j > 0:
            dst[j] = b"\r"
            dst[j + 1] = b"\n"
            j += 2
        elif end >= 0:
            j = end + 2 if end > 0 else 0
    try:
        return PyBytes_FromStringAndSize(dst, j)
    finally:
        free(dst)
