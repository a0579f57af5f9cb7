"""Domain names and mail addresses in their one normal form, validated.

Every name that becomes a key (the domain map, address overrides, route lookups) passes
through here once; a name that cannot be used raises InvalidName with the reason for people.
Pure functions: no I/O, and nothing about where a name is used.
"""

from __future__ import annotations

import re

import attrs
import idna

MAX_DOMAIN = 253  # octets, RFC 1035 §2.3.4, without the trailing dot
MAX_LABEL = 63
MAX_LOCAL = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_ADDRESS = 254  # octets: RFC 5321's 256-octet path less its angle brackets
MAX_INPUT = 320  # characters: longer input is refused before any other work


class InvalidName(ValueError):
    """A domain name or mail address that cannot be used. str() is the reason, one line."""


@attrs.frozen
class MailAddress:
    """A mail address in normal form; build it with normalize_address.

    `local` keeps its case (RFC 5321 §2.4: only the receiving host interprets it) and is
    unquoted unless it needs quotes; `domain` is normalize_domain's ASCII form.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


# Names already in normal form (what every route lookup sees) skip IDNA: lower-case
# letters, digits and hyphens, and no label with hyphens in places 3-4, so no "xn--" label
# whose punycode would need checking. Anything else takes the full path.
_LDH_LABEL = r"(?!..--)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NORMAL_ASCII = re.compile(rf"{_LDH_LABEL}(?:\.{_LDH_LABEL})+")
# The WHATWG URL standard's "ends in a number": such a name is an IPv4 address to resolvers.
_ENDS_IN_NUMBER = re.compile(r"(?:\A|\.)(?:[0-9]+|0x[0-9a-f]*)\Z")
_UNUSABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # controls, unpaired surrogates
_SPACE = re.compile(r"\s")
_NOT_LDH = re.compile(r"[^a-z0-9\-\x80-\U0010ffff]")  # an ASCII character other than LDH

# RFC 5321 §4.1.2 Dot-string and Quoted-string, with UTF8-non-ascii added by RFC 6531 §3.3.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_NOT_ATEXT = re.compile(rf"(?!{_ATEXT}|\.).")
_QCONTENT = re.compile(r"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*")
_QUOTED_PAIR = re.compile(r"\\(.)")


def normalize_domain(text: str) -> str:
    """Return the normal form of the mail domain `text`: lower case, IDNA ASCII, no final dot.

    Unicode input is mapped by UTS #46 and encoded by IDNA 2008 (punycode); "xn--" labels
    must be valid punycode. One trailing dot is removed. White space is refused, not
    stripped: here it means a parser upstream split a line wrongly. A mail domain has at
    least two labels, so "localhost" and "com" are refused, and a name that ends in a
    number ("127.0.0.1") or an address literal ("[127.0.0.1]") is not a domain name.

    Raises InvalidName naming the problem.
    """
    if len(text) <= MAX_DOMAIN and _NORMAL_ASCII.fullmatch(text) and not _ENDS_IN_NUMBER.search(text):
        return text
    return _normalize_domain_fully(text)


def _normalize_domain_fully(text: str) -> str:
    _check_text(text, "the domain name")
    if _SPACE.search(text):
        raise InvalidName(f"{text!r} has white space")
    if text.startswith("["):
        raise InvalidName(f"{text!r} is an address literal, not a domain name")
    try:
        mapped = idna.uts46_remap(text, std3_rules=False)
    except idna.IDNAError as e:
        raise InvalidName(f"{text!r} is not allowed by IDNA 2008 ({e})") from None
    if mapped.endswith("."):
        mapped = mapped[:-1]
    if not mapped:
        raise InvalidName("the domain name is empty")
    unicode_labels = mapped.split(".")
    if "" in unicode_labels:
        raise InvalidName(f"{text!r} has an empty label (a dot at the start, or two in a row)")
    labels = [_label_to_ascii(label) for label in unicode_labels]
    name = ".".join(labels)
    if len(name) > MAX_DOMAIN:
        raise InvalidName(f"{text!r} is longer than {MAX_DOMAIN} characters in ASCII form")
    if len(labels) < 2:
        raise InvalidName(f"{text!r} is a single label; a mail domain has at least two, like example.com")
    if _ENDS_IN_NUMBER.search(name):
        raise InvalidName(f"{text!r} ends in a number, like an IP address; a mail domain ends in a name")
    return name


def _label_to_ascii(label: str) -> str:
    """Return the ASCII form of one UTS #46-mapped label, or raise InvalidName."""
    if _NOT_LDH.search(label):
        raise InvalidName(f"label {label!r} has a character other than letters, digits and hyphen")
    if label.startswith("-") or label.endswith("-"):
        raise InvalidName(f"label {label!r} starts or ends with a hyphen")
    is_alabel = label.startswith("xn--")
    if label[2:4] == "--" and not is_alabel:
        raise InvalidName(f"label {label!r} has hyphens in places 3 and 4, which are kept for IDNA ('xn--')")
    if not label.isascii():
        try:
            return idna.alabel(label).decode("ascii")
        except idna.IDNAError as e:
            raise InvalidName(f"label {label!r} is not allowed by IDNA 2008 ({e})") from None
    if len(label) > MAX_LABEL:
        raise InvalidName(f"label {label!r} is longer than {MAX_LABEL} characters")
    if is_alabel:
        try:
            idna.ulabel(label)
        except idna.IDNAError as e:
            raise InvalidName(f"label {label!r} is not valid punycode for IDNA 2008 ({e})") from None
    return label


def display_domain(ascii_name: str) -> str:
    """Return the Unicode form of a normalized domain, for people ("bücher.example").

    Never raises for a name from normalize_domain; raises InvalidName for other input that
    is not valid IDNA.
    """
    try:
        return idna.decode(ascii_name)
    except idna.IDNAError as e:
        raise InvalidName(f"{ascii_name!r} is not a valid IDNA name ({e})") from None


def normalize_address(text: str) -> MailAddress:
    """Return the normal form of the mail address `text` ("local@domain").

    Splits at the last "@". The domain is normalized as by normalize_domain. The local part
    keeps its case and is validated by RFC 5321's Dot-string and Quoted-string rules
    (1 to 64 octets); UTF-8 local parts (RFC 6531, SMTPUTF8) are accepted as given, not
    Unicode-normalized, because only the receiving host interprets them. Quotes that are
    not needed are dropped ('"john"' becomes 'john'), and a quoted local part keeps only the
    backslashes it needs, so equal addresses have one spelling. An empty quoted local part
    ('""') is refused. The whole address is at most 254 octets.

    Raises InvalidName naming the problem.
    """
    _check_text(text, "the address")
    local, at, domain = text.rpartition("@")
    if not at:
        raise InvalidName(f"{text!r} has no '@'")
    address = MailAddress(_normalize_local(local), normalize_domain(domain))
    if len(str(address).encode()) > MAX_ADDRESS:
        raise InvalidName(f"{text!r} is longer than {MAX_ADDRESS} octets")
    return address


def _normalize_local(local: str) -> str:
    """Return the normal form of an address's local part, or raise InvalidName."""
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"') or not _QCONTENT.fullmatch(local, 1, len(local) - 1):
            raise InvalidName(f"local part {local!r} is not a valid quoted string")
        content = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if _DOT_STRING.fullmatch(content):
            local = content
        elif content:
            local = '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            local = ""
    elif local and not _DOT_STRING.fullmatch(local):
        if local.startswith(".") or local.endswith(".") or ".." in local:
            raise InvalidName(f"local part {local!r} has a dot at the start or end, or two in a row")
        bad = _NOT_ATEXT.search(local)
        assert bad is not None  # dots are in place, so some other character breaks the Dot-string
        raise InvalidName(f"local part {local!r} has {bad.group()!r}, which is allowed only inside quotes")
    if not local:
        raise InvalidName("the local part (before the '@') is empty")
    if len(local.encode()) > MAX_LOCAL:
        raise InvalidName(f"local part {local!r} is longer than {MAX_LOCAL} octets")
    return local


def _check_text(text: str, what: str) -> None:
    """Refuse over-long input, control characters and unpaired surrogates."""
    if len(text) > MAX_INPUT:
        raise InvalidName(f"{what} is longer than {MAX_INPUT} characters")
    bad = _UNUSABLE.search(text)
    if bad:
        char = bad.group()
        kind = "an unpaired surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
        raise InvalidName(f"{what} has {kind} (U+{ord(char):04X})")
