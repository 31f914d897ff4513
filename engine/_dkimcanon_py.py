"""DKIM body canonicalisation (RFC 6376 3.4.3, 3.4.4), pure Python: the twin of the compiled engine._dkimcanon."""

from dkim.canonicalization import Relaxed, Simple, correct_empty_body, strip_trailing_lines


def simple_body(body: bytes) -> bytes:
    """The body with trailing empty lines removed and a CRLF ensured at the end."""
    return Simple.canonicalize_body(body)


def relaxed_body(body: bytes) -> bytes:
    """Simple, plus whitespace runs squeezed to one space and whitespace before each CRLF dropped."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        return Relaxed.canonicalize_body(body)
    return correct_empty_body(strip_trailing_lines(body))
