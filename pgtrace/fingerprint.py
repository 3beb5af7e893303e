"""Query fingerprints: a hash of the text with constants and whitespace normalized."""

from __future__ import annotations

import hashlib
import re

# Comments, literals and quoted identifiers in one left-to-right pass, so that a
# comment marker inside a literal (or a quote inside a comment) is not misread.
# Unterminated forms run to the end: the kernel keeps only a prefix of the text.
_LEXICAL = re.compile(
    r"""
      (?P<comment> --[^\n]* | /\*.*?(?:\*/|\Z) )
    | (?P<ident> "(?:[^"]|"")*"? )
    | (?P<literal>
          (?<![\w$])[eE]'(?:[^'\\]|\\.|'')*'?
        | (?:(?<![\w$])(?:[bBxX]|[uU]&))?'(?:[^']|'')*'?
        | (?<![\w$])\$(?P<tag>(?:[A-Za-z_][A-Za-z0-9_]*)?)\$.*?(?:\$(?P=tag)\$|\Z)
      )
    """,
    re.S | re.X,
)


def _lexical(m: re.Match[str]) -> str:
    if m["comment"] is not None:
        return " "
    if m["ident"] is not None:
        return m["ident"]
    return "?"


_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?<![\w$])\$[0-9]+"), "?"),
    (re.compile(r"(?<![\w$])-?(?:0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"), "?"),
    (re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)"), "(?)"),
    (re.compile(r"\s+"), " "),
)


def normalize(text: str) -> str:
    """Lower-cased text with literals, parameters and lists replaced by '?'."""
    out = _LEXICAL.sub(_lexical, text)
    for pattern, repl in _PATTERNS:
        out = pattern.sub(repl, out)
    return out.strip().rstrip(";").strip().lower()


def fingerprint(text: str) -> str:
    """16 hex digits identifying the normalized text ('' for no text)."""
    if not text:
        return ""
    return hashlib.blake2b(normalize(text).encode(), digest_size=8).hexdigest()
