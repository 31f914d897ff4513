# cython: language_level=3
"""Event records as JSON lines, byte for byte what json.dumps(record, ensure_ascii=False,
separators=(",", ":")) + "\\n" gives, encoded UTF-8, in a fraction of the time.

Every delivery outcome is one record, so under load the log encodes thousands a second; the records are
flat dicts of strings, numbers and None with a few small nested dicts, which is all this encoder takes.
Anything else raises TypeError and the caller uses the json module instead.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.math cimport isfinite, isnan, signbit
from libc.stdio cimport snprintf
from libc.string cimport memcpy, strlen

cdef extern from "Python.h":
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags, int *ptype) except NULL
    void PyMem_Free_str "PyMem_Free"(char *p)
    int Py_DTSF_ADD_DOT_0

DEF MAX_DEPTH = 32

cdef const char *HEX = b"0123456789abcdef"


cdef struct Out:
    char *data
    Py_ssize_t size
    Py_ssize_t capacity


cdef int _reserve(Out *out, Py_ssize_t more) except -1:
    cdef Py_ssize_t wanted = out.size + more
    cdef Py_ssize_t capacity
    cdef char *grown
    if wanted <= out.capacity:
        return 0
    capacity = out.capacity * 2
    if capacity < wanted:
        capacity = wanted
    grown = <char *>PyMem_Realloc(out.data, capacity)
    if grown == NULL:
        raise MemoryError()
    out.data = grown
    out.capacity = capacity
    return 0


cdef inline int _put(Out *out, const char *text, Py_ssize_t length) except -1:
    _reserve(out, length)
    memcpy(out.data + out.size, text, length)
    out.size += length
    return 0


cdef int _string(Out *out, str text) except -1:
    cdef Py_ssize_t length, i
    cdef const char *raw = PyUnicode_AsUTF8AndSize(text, &length)
    cdef unsigned char c
    cdef char *at
    _reserve(out, length * 6 + 2)  # worst case: every byte a \u00XX escape
    at = out.data + out.size
    at[0] = b'"'
    at += 1
    for i in range(length):
        c = <unsigned char>raw[i]
        if c >= 0x20 and c != 0x22 and c != 0x5C:
            at[0] = <char>c
            at += 1
            continue
        at[0] = b'\\'
        if c == 0x22:
            at[1] = b'"'
        elif c == 0x5C:
            at[1] = b'\\'
        elif c == 0x0A:
            at[1] = b'n'
        elif c == 0x0D:
            at[1] = b'r'
        elif c == 0x09:
            at[1] = b't'
        elif c == 0x08:
            at[1] = b'b'
        elif c == 0x0C:
            at[1] = b'f'
        else:
            at[1] = b'u'
            at[2] = b'0'
            at[3] = b'0'
            at[4] = HEX[c >> 4]
            at[5] = HEX[c & 15]
            at += 6
            continue
        at += 2
    at[0] = b'"'
    out.size = at + 1 - out.data
    return 0


cdef enum:
    FLOAT_CACHE = 4
    FLOAT_TEXT = 32  # repr of a double is at most 24 characters

cdef double _cached_value[FLOAT_CACHE]
cdef char _cached_text[FLOAT_CACHE][FLOAT_TEXT]
cdef Py_ssize_t _cached_length[FLOAT_CACHE]
cdef int _cache_next = 0


cdef int _float(Out *out, double value) except -1:
    """repr(value), as json writes it; the records of one message repeat its `created`, so the last few
    conversions are kept (the shortest round-trip repr is the dearest part of a record)."""
    global _cache_next
    cdef char *text
    cdef Py_ssize_t length
    cdef int slot
    if not isfinite(value):
        if isnan(value):
            return _put(out, b"NaN", 3)
        if value > 0:
            return _put(out, b"Infinity", 8)
        return _put(out, b"-Infinity", 9)
    for slot in range(FLOAT_CACHE):
        if _cached_length[slot] and _cached_value[slot] == value and (value != 0.0 or _same_zero(slot, value)):
            return _put(out, _cached_text[slot], _cached_length[slot])
    text = PyOS_double_to_string(value, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
    try:
        length = strlen(text)
        _put(out, text, length)
        if length < FLOAT_TEXT:
            slot = _cache_next
            _cache_next = (_cache_next + 1) % FLOAT_CACHE
            memcpy(_cached_text[slot], text, length)
            _cached_length[slot] = length
            _cached_value[slot] = value
    finally:
        PyMem_Free_str(text)
    return 0


cdef inline bint _same_zero(int slot, double value) noexcept:
    """0.0 and -0.0 compare equal but print differently."""
    return signbit(_cached_value[slot]) == signbit(value)


cdef int _int(Out *out, object value) except -1:
    cdef int overflow = 0
    cdef long long number = PyLong_AsLongLongAndOverflow(value, &overflow)
    cdef char buffer[24]
    cdef int length
    cdef bytes text
    if overflow:
        text = int.__repr__(value).encode()
        return _put(out, text, len(text))
    length = snprintf(buffer, sizeof(buffer), b"%lld", number)
    return _put(out, buffer, length)


cdef int _value(Out *out, object value, int depth) except -1:
    cdef type kind = type(value)
    if kind is str:
        return _string(out, <str>value)
    if value is None:
        return _put(out, b"null", 4)
    if kind is float:
        return _float(out, PyFloat_AS_DOUBLE(value))
    if kind is bool:
        if value:
            return _put(out, b"true", 4)
        return _put(out, b"false", 5)
    if kind is int:
        return _int(out, value)
    if depth >= MAX_DEPTH:
        raise TypeError("record nested too deep")
    if kind is dict:
        return _object(out, <dict>value, depth + 1)
    if kind is list or kind is tuple:
        return _array(out, value, depth + 1)
    raise TypeError(f"not an event record value: {kind.__name__}")


cdef int _object(Out *out, dict mapping, int depth) except -1:
    cdef bint first = True
    _put(out, b"{", 1)
    for key, value in mapping.items():
        if type(key) is not str:
            raise TypeError("event record keys are strings")
        if not first:
            _put(out, b",", 1)
        first = False
        _string(out, <str>key)
        _put(out, b":", 1)
        _value(out, value, depth)
    return _put(out, b"}", 1)


cdef int _array(Out *out, object items, int depth) except -1:
    cdef bint first = True
    _put(out, b"[", 1)
    for value in items:
        if not first:
            _put(out, b",", 1)
        first = False
        _value(out, value, depth)
    return _put(out, b"]", 1)


def encode_record(dict record) -> bytes:
    """One JSON line (with its newline) for a record of str, int, float, bool, None, dict, list, tuple."""
    cdef Out out
    out.capacity = 512
    out.size = 0
    out.data = <char *>PyMem_Malloc(out.capacity)
    if out.data == NULL:
        raise MemoryError()
    try:
        _object(&out, record, 0)
        _put(&out, b"\n", 1)
        return PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        PyMem_Free(out.data)
