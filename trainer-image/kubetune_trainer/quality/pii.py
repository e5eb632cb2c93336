"""Personal data and secrets in a record's text, by kind: what the report counts, never the value found.

- email: an address of the usual shape (local@domain.tld);
- phone: what `phonenumbers` finds and judges valid, with +<country code>, or in the national format of
  DEFAULT_REGION; only texts with at least 7 digits are looked at;
- card: 13 to 19 digits (spaces or dashes between groups) that pass the Luhn check;
- secret: cloud and API credentials of a recognisable shape: AWS access key ids, private key blocks, bearer
  tokens, JSON web tokens, GitHub, Slack, Stripe and Google API keys (the patterns of detect-secrets' detectors).
"""

from __future__ import annotations

import re

import phonenumbers

KINDS = ("email", "phone", "card", "secret")
DEFAULT_REGION = "US"  # how a number without +<country code> is read

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_DIGITS = re.compile(r"\d")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SECRETS = re.compile("|".join((
    r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",  # AWS access key id
    r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY( BLOCK)?-----",  # PEM, OpenSSH, PGP private keys
    r"\b[Bb]earer\s+[A-Za-z0-9\-._~+/]{20,}=*",  # an Authorization header's token
    r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",  # a JSON web token
    r"\bgh[pousr]_[A-Za-z0-9]{36}\b",  # GitHub
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"\b[rs]k_live_[A-Za-z0-9]{20,}",  # Stripe
    r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google API key
)))


def scan(text: str) -> dict[str, int]:
    """How many of each kind the text holds (kinds it has none of are left out)."""
    found = {"email": len(_EMAIL.findall(text)), "secret": len(_SECRETS.findall(text))}
    if len(_DIGITS.findall(text)) >= 7:
        cards = [m for m in _CARD.findall(text) if _luhn(m)]
        found["card"] = len(cards)
        found["phone"] = sum(1 for m in phonenumbers.PhoneNumberMatcher(text, DEFAULT_REGION)
                             if not any(_same_digits(m.raw_string, c) for c in cards))
    return {kind: n for kind, n in found.items() if n}


def _luhn(number: str) -> bool:
    digits = [int(d) for d in number if d.isdigit()]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


def _same_digits(a: str, b: str) -> bool:
    return "".join(filter(str.isdigit, a)) in "".join(filter(str.isdigit, b))
