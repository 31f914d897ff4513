"""The message an HTTP injection asks for (SPEC "Message controls at injection"), as CRLF bytes.

`content` is either raw RFC 5322 text or fields to build one from (from, subject, text_body, html_body,
headers). `{{ name }}` placeholders take each recipient's substitutions; a name the recipient has no value
for becomes empty, as in the Jinja templates of KumoMTA's injection API. Building uses the standard
library's email package, so encodings, folding and MIME structure are its, not ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate

__all__ = ["ContentError", "built_message", "raw_message", "substitute"]

MAX_LINE = 998  # octets, RFC 5322 2.1.1
POLICY = SMTP.clone(cte_type="7bit")  # non-ASCII bodies go quoted-printable or base64: any server takes them
BUILT_FIELDS = ("from", "subject", "text_body", "html_body", "headers", "reply_to")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")
_LINE_ENDS = re.compile(r"\r\n|\r|\n")


class ContentError(ValueError):
    """Content that cannot become a message; the text names the field."""


def substitute(text: str, values: Mapping[str, object]) -> str:
    """`text` with every `{{ name }}` replaced by str(values[name]), or by nothing when it has none."""
    if "{{" not in text:
        return text
    return _PLACEHOLDER.sub(lambda match: _text(values.get(match.group(1))), text)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def raw_message(content: str, values: Mapping[str, object]) -> bytes:
    """Raw RFC 5322 text after substitution, with CRLF line ends; lines over 998 octets are refused."""
    message = _LINE_ENDS.sub("\r\n", substitute(content, values)).encode()
    if not message.strip():
        raise ContentError("content: empty message")
    for number, line in enumerate(message.split(b"\r\n"), 1):
        if len(line) > MAX_LINE:
            raise ContentError(f"content: line {number} is {len(line)} octets, over the 998 of RFC 5322 2.1.1")
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def built_message(content: Mapping[str, object], recipient: str, values: Mapping[str, object]) -> bytes:
    """A message from fields: From is required, To defaults to the recipient, one of text_body and
    html_body is required (both make a multipart/alternative)."""
    unknown = sorted(set(content) - set(BUILT_FIELDS))
    if unknown:
        raise ContentError(f"content: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(BUILT_FIELDS)}")
    text_body, html_body = content.get("text_body"), content.get("html_body")
    if text_body is None and html_body is None:
        raise ContentError("content: give text_body, html_body or both")
    message = EmailMessage(policy=POLICY)
    try:
        message["From"] = _mailbox(content.get("from"), "content.from")
        if content.get("reply_to") is not None:
            message["Reply-To"] = _mailbox(content["reply_to"], "content.reply_to")
        headers = _headers(content.get("headers"), values)
        if "to" not in {name.lower() for name in headers}:
            message["To"] = recipient
        message["Subject"] = substitute(_string(content.get("subject", ""), "content.subject"), values)
        message["Date"] = formatdate(usegmt=True)
        for name, value in headers.items():
            message[name] = value
    except (ValueError, TypeError) as error:
        raise ContentError(f"content: {error}") from None
    if text_body is not None:
        message.set_content(substitute(_string(text_body, "content.text_body"), values))
    if html_body is not None:
        html = substitute(_string(html_body, "content.html_body"), values)
        if text_body is None:
            message.set_content(html, subtype="html")
        else:
            message.add_alternative(html, subtype="html")
    return message.as_bytes()


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ContentError(f"{name} must be a string")
    return value


def _mailbox(value: object, name: str) -> Address | str:
    """ "Name <addr>" text, or {"email": addr, "name": display name}."""
    if isinstance(value, Mapping):
        email = value.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise ContentError(f"{name}.email must be an address")
        display = value.get("name") or ""
        if not isinstance(display, str):
            raise ContentError(f"{name}.name must be a string")
        username, _, domain = email.rpartition("@")
        return Address(display, username, domain)
    if not isinstance(value, str) or "@" not in value:
        raise ContentError(f'{name} is required: an address, or {{"email", "name"}}')
    return value


def _headers(value: object, values: Mapping[str, object]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ContentError("content.headers must be an object of name: value")
    headers = {}
    for name, text in value.items():
        if not re.fullmatch(r"[!-9;-~]+", name):
            raise ContentError(f"content.headers: {name!r} is not a header field name")
        headers[name] = substitute(_string(text, f"content.headers.{name}"), values)
    return headers
