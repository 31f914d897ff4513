"""Bounce classification in the style of PowerMTA and KumoMTA: an SMTP reply → one named class.

The classes let operators and the engine act on why mail failed (suppress dead addresses, slow down on
spam blocks) without reading every remote server's wording. The rules are data: an ordered table of
(class, code glob, enhanced-code glob, text regex), every given condition must match, first match wins.
Rules from `[bounces] rules` in the configuration are tried before the built-in table.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from engine.config import BOUNCE_CLASSES, BounceRule, Config

__all__ = ["BOUNCE_CLASSES", "BUILTIN_RULES", "HARD_CLASSES", "BounceClassifier"]

# Bounces of these classes mean the address will never work: bulk mail suppresses it.
HARD_CLASSES = frozenset({"bad-mailbox", "bad-domain"})
FALLBACK = "other"


def _text(bounce_class: str, pattern: str) -> BounceRule:
    return BounceRule(bounce_class, text=pattern)


def _enhanced(bounce_class: str, glob: str) -> BounceRule:
    return BounceRule(bounce_class, enhanced=glob)


# Order matters: words that say why (spam, virus) beat the generic enhanced code a server chose
# (5.7.1 for everything), the enhanced code beats looser wording, the bare reply code comes last.
BUILTIN_RULES: tuple[BounceRule, ...] = (
    _text(
        "spam-related",
        r"\bspam|black ?list|block ?list|\blisted (?:at|on|in|by)\b|spamhaus|spamcop|barracuda|"
        r"\bjunk\b|\breputation\b|\bbulk mail",
    ),
    _text("content-related", r"virus|malware|phishing|content (?:rejected|refused)|message content|attachment"),
    _enhanced("message-expired", "?.4.7"),
    _text("message-expired", r"message expired|max_age|too long in queue"),
    _enhanced("bad-mailbox", "?.1.1"),
    _enhanced("bad-domain", "?.1.2"),
    _enhanced("bad-mailbox", "?.1.3"),
    _enhanced("bad-mailbox", "?.1.4"),
    _enhanced("bad-mailbox", "?.1.5"),
    _enhanced("inactive-mailbox", "?.1.6"),
    _enhanced("invalid-sender", "?.1.7"),
    _enhanced("invalid-sender", "?.1.8"),
    _enhanced("bad-domain", "?.1.10"),
    _enhanced("inactive-mailbox", "?.2.1"),
    _enhanced("quota-issues", "?.2.2"),
    _enhanced("content-related", "?.2.3"),
    _enhanced("routing-errors", "?.2.4"),
    _enhanced("quota-issues", "?.3.1"),
    _enhanced("policy-related", "?.3.2"),
    _enhanced("content-related", "?.3.4"),
    _enhanced("routing-errors", "?.4.*"),
    _enhanced("protocol-errors", "?.5.*"),
    _enhanced("content-related", "?.6.*"),
    _enhanced("policy-related", "?.7.*"),
    _text("invalid-sender", r"sender (?:address )?(?:rejected|invalid|denied|unknown)|invalid sender|return.path"),
    _text("quota-issues", r"quota|mailbox (?:is )?full|insufficient (?:system )?storage|storage exceeded"),
    _text(
        "bad-mailbox",
        r"(?:user|mailbox|recipient|address|account)(?: name)?(?: is)? (?:unknown|not found|does not exist|"
        r"doesn't exist|invalid|unavailable)|no such (?:user|mailbox|recipient|address)|"
        r"unknown (?:user|recipient|mailbox)|invalid recipient",
    ),
    _text("bad-domain", r"(?:domain|host) (?:not found|does not exist|unknown)|\bno mx\b|nxdomain|null mx"),
    _text("inactive-mailbox", r"disabled|inactive|deactivated|no longer (?:active|in use|valid)"),
    _text("policy-related", r"rate limit|too many|throttl|try again later|greylist|graylist"),
    _text("policy-related", r"relay|policy|not (?:allowed|permitted|authori[sz]ed)|denied|\bspf\b|dkim|dmarc"),
    _text("routing-errors", r"time(?:d)? ?out|connection (?:refused|reset|lost)|unreachable|no route|next hop"),
    _text("protocol-errors", r"syntax|command|protocol|pipelin|unrecogni[sz]ed"),
    BounceRule("quota-issues", code="552"),
    BounceRule("bad-mailbox", code="553"),
    BounceRule("routing-errors", code="421"),
)


@dataclass(frozen=True, slots=True)
class _Compiled:
    bounce_class: str
    code: re.Pattern[str] | None
    enhanced: re.Pattern[str] | None
    text: re.Pattern[str] | None

    def matches(self, code: str, enhanced: str, text: str) -> bool:
        return (
            (self.code is None or self.code.fullmatch(code) is not None)
            and (self.enhanced is None or self.enhanced.fullmatch(enhanced) is not None)
            and (self.text is None or self.text.search(text) is not None)
        )


def _compile(rule: BounceRule) -> _Compiled:
    if rule.bounce_class not in BOUNCE_CLASSES:
        raise ValueError(f"unknown bounce class {rule.bounce_class!r}")
    return _Compiled(
        rule.bounce_class,
        re.compile(fnmatch.translate(rule.code)) if rule.code else None,
        re.compile(fnmatch.translate(rule.enhanced)) if rule.enhanced else None,
        re.compile(rule.text, re.IGNORECASE) if rule.text else None,
    )


class BounceClassifier:
    """Classifies replies with the operator's rules first, then BUILTIN_RULES; "other" when none match."""

    def __init__(self, rules: Iterable[BounceRule] = ()) -> None:
        self._rules = [_compile(rule) for rule in (*rules, *BUILTIN_RULES)]

    @classmethod
    def from_config(cls, config: Config) -> BounceClassifier:
        return cls(config.bounces.rules)

    def classify(self, code: int, enhanced: str | None, text: str) -> str:
        code_text, enhanced_text = str(code), enhanced or ""
        for rule in self._rules:
            if rule.matches(code_text, enhanced_text, text):
                return rule.bounce_class
        return FALLBACK
