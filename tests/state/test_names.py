"""Domain name and mail address normalization (meshmail.state.names).

Tables of inputs with their normal forms and of rejects with their reasons; Hypothesis
checks that any text either normalizes to a valid fixed point or raises InvalidName, and
that the fast path for already-normal names agrees with the full path.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshmail.state import names
from meshmail.state.names import (
    InvalidName,
    MailAddress,
    display_domain,
    normalize_address,
    normalize_domain,
)

LABEL63 = "a" * 63
NAME253 = ".".join([LABEL63, LABEL63, LABEL63, "a" * 61])  # 63*3 + 61 + 3 dots

VALID_DOMAINS = [
    ("example.com", "example.com"),
    ("a.b", "a.b"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("mail-1.example.com", "mail-1.example.com"),
    ("123.example", "123.example"),
    ("example.0xg", "example.0xg"),  # not hexadecimal, so not a number
    (f"{LABEL63}.example", f"{LABEL63}.example"),
    (NAME253, NAME253),
    (NAME253 + ".", NAME253),
    # IDNA 2008 with UTS #46 mapping
    ("Bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.EXAMPLE", "xn--bcher-kva.example"),
    ("Bu\u0308cher.example", "xn--bcher-kva.example"),  # decomposed ü is composed (NFC)
    ("münchen.de", "xn--mnchen-3ya.de"),
    ("faß.de", "xn--fa-hia.de"),  # non-transitional: ß stays ß, not ss
    ("ΑΒΓ.example", "xn--mxacd.example"),
    ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    ("ｅｘａｍｐｌｅ．ｃｏｍ", "example.com"),  # fullwidth letters and full stop
    ("example。com", "example.com"),  # ideographic full stop
    ("ⓜⓐⓘⓛ.example", "mail.example"),  # circled letters
    ("Ⅸ.example", "ix.example"),  # roman numeral
    ("soft\u00adhyphen.example", "softhyphen.example"),  # soft hyphen is dropped
    # already punycode, in any case
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
    ("Xn--Bcher-Kva.Example.", "xn--bcher-kva.example"),
    ("xn--r8jz45g.xn--zckzah", "xn--r8jz45g.xn--zckzah"),
]


@pytest.mark.parametrize(("text", "normal"), VALID_DOMAINS)
def test_valid_domains(text: str, normal: str) -> None:
    assert normalize_domain(text) == normal
    assert normalize_domain(normal) == normal


@pytest.mark.parametrize(
    ("ascii_name", "unicode_name"),
    [
        ("example.com", "example.com"),
        ("xn--bcher-kva.example", "bücher.example"),
        ("xn--r8jz45g.xn--zckzah", "例え.テスト"),
        ("xn--fa-hia.de", "faß.de"),
    ],
)
def test_display_domain(ascii_name: str, unicode_name: str) -> None:
    assert display_domain(ascii_name) == unicode_name
    assert normalize_domain(unicode_name) == ascii_name


def test_display_domain_refuses_invalid_punycode() -> None:
    with pytest.raises(InvalidName, match="not a valid IDNA name"):
        display_domain("xn--zz.example")


REJECTED_DOMAINS = [
    ("", "the domain name is empty"),
    (".", "the domain name is empty"),
    ("example.com..", "has an empty label"),
    (".example.com", "has an empty label"),
    ("a..b", "has an empty label"),
    ("..", "has an empty label"),
    (f"{'a' * 64}.example", f"label '{'a' * 64}' is longer than 63 characters"),
    (NAME253 + "a", "is longer than 253 characters"),
    ("a" * 321, "is longer than 320 characters"),
    ("a_b.example", "label 'a_b' has a character other than letters, digits and hyphen"),
    ("exa%mple.com", "label 'exa%mple' has a character other than letters"),
    ("example.com/", "has a character other than letters"),
    ("user@example.com", "label 'user@example' has a character other than letters"),
    ("⑴.example", "label '(1)' has a character other than letters"),  # UTS #46 maps it to "(1)"
    (" example.com", "has white space"),
    ("example.com ", "has white space"),
    ("exa mple.com", "has white space"),
    ("example.com\u3000", "has white space"),
    ("exa\u00a0mple.com", "has white space"),
    ("-a.example", "label '-a' starts or ends with a hyphen"),
    ("a-.example", "label 'a-' starts or ends with a hyphen"),
    ("ab--c.example", "label 'ab--c' has hyphens in places 3 and 4"),
    ("xn--zz.example", "label 'xn--zz' is not valid punycode"),
    ("xn--.example", "label 'xn--' starts or ends with a hyphen"),
    ("xn--ls8h.example", "label 'xn--ls8h' is not valid punycode"),  # punycode of an emoji
    ("xn--Bcher-kva.xn--a.example", "label 'xn--a' is not valid punycode"),
    ("😀.example", "label '😀' is not allowed by IDNA 2008"),
    ("☃.example", "label '☃' is not allowed by IDNA 2008"),
    ("a.b\u200d.c", "is not allowed by IDNA 2008"),  # zero width joiner out of context
    ("127.0.0.1", "ends in a number, like an IP address"),
    ("1.0x7f", "ends in a number"),
    ("example.0x", "ends in a number"),
    ("[127.0.0.1]", "is an address literal"),
    ("[IPv6:::1]", "is an address literal"),
    ("localhost", "'localhost' is a single label"),
    ("COM.", "'COM.' is a single label"),
    ("bücher", "'bücher' is a single label"),
    ("exa\rmple.com", "has a control character (U+000D)"),
    ("example.com\r\n", "has a control character (U+000D)"),
    ("\n", "has a control character (U+000A)"),
    ("exa\x00mple.com", "has a control character (U+0000)"),
    ("exa\tmple.com", "has a control character (U+0009)"),
    ("exa\x85mple.com", "has a control character (U+0085)"),
    ("\ud800.example", "has an unpaired surrogate (U+D800)"),
]


@pytest.mark.parametrize(("text", "reason"), REJECTED_DOMAINS)
def test_rejected_domains(text: str, reason: str) -> None:
    with pytest.raises(InvalidName, match=re.escape(reason)):
        normalize_domain(text)


def test_invalid_name_is_a_value_error() -> None:
    assert issubclass(InvalidName, ValueError)


VALID_ADDRESSES = [
    ("user@example.com", MailAddress("user", "example.com")),
    ("User@EXAMPLE.com", MailAddress("User", "example.com")),  # the local part keeps its case
    ("user@example.com.", MailAddress("user", "example.com")),
    ("first.last+tag@example.com", MailAddress("first.last+tag", "example.com")),
    ("!#$%&'*+-/=?^_`{|}~@example.com", MailAddress("!#$%&'*+-/=?^_`{|}~", "example.com")),
    ("a@b.c", MailAddress("a", "b.c")),
    (f"{'x' * 64}@example.com", MailAddress("x" * 64, "example.com")),
    ("jörg@Bücher.example", MailAddress("jörg", "xn--bcher-kva.example")),  # RFC 6531
    ("用户@例子.广告", MailAddress("用户", "xn--fsqu00a.xn--4rr70v")),
    # quoted strings: quotes and backslashes that are not needed are dropped
    ('"john doe"@example.com', MailAddress('"john doe"', "example.com")),
    ('"john"@example.com', MailAddress("john", "example.com")),
    ('"j\\o\\hn"@example.com', MailAddress("john", "example.com")),
    ('"a..b"@example.com', MailAddress('"a..b"', "example.com")),
    ('"a@b"@example.com', MailAddress('"a@b"', "example.com")),
    ('"a\\"b"@example.com', MailAddress('"a\\"b"', "example.com")),
    ('"a\\\\b"@example.com', MailAddress('"a\\\\b"', "example.com")),
    ('"\\ "@example.com', MailAddress('" "', "example.com")),
    ('"jörg müller"@example.com', MailAddress('"jörg müller"', "example.com")),
]


@pytest.mark.parametrize(("text", "address"), VALID_ADDRESSES)
def test_valid_addresses(text: str, address: MailAddress) -> None:
    assert normalize_address(text) == address
    assert normalize_address(str(address)) == address


def test_address_str() -> None:
    assert str(normalize_address('"John Doe"@Bücher.example')) == '"John Doe"@xn--bcher-kva.example'


REJECTED_ADDRESSES = [
    ("", "has no '@'"),
    ("example.com", "'example.com' has no '@'"),
    ("@example.com", "the local part (before the '@') is empty"),
    ('""@example.com', "the local part (before the '@') is empty"),
    ("user@", "the domain name is empty"),
    ("user@localhost", "'localhost' is a single label"),
    ("user@exa_mple.com", "label 'exa_mple' has a character other than letters"),
    ("user@[127.0.0.1]", "is an address literal"),
    ("user@127.0.0.1", "ends in a number"),
    ("a..b@example.com", "local part 'a..b' has a dot at the start or end, or two in a row"),
    (".a@example.com", "has a dot at the start or end"),
    ("a.@example.com", "has a dot at the start or end"),
    ("a b@example.com", "local part 'a b' has ' ', which is allowed only inside quotes"),
    ("a@b@example.com", "local part 'a@b' has '@', which is allowed only inside quotes"),
    ("a(b)@example.com", "has '(', which is allowed only inside quotes"),
    ('a"b@example.com', "has '\"', which is allowed only inside quotes"),
    ('"john@example.com', "is not a valid quoted string"),
    ('"@example.com', "is not a valid quoted string"),
    ('"a"b"@example.com', "is not a valid quoted string"),
    ('"a\\"@example.com', "is not a valid quoted string"),
    ('"a\\ü"@example.com', "is not a valid quoted string"),  # quoted-pairSMTP is ASCII only
    ('"a"b@example.com', "is not a valid quoted string"),
    (f"{'x' * 65}@example.com", "is longer than 64 octets"),
    (f"{'ü' * 33}@example.com", "is longer than 64 octets"),  # 33 characters, 66 octets
    (f"{'x' * 64}@{'a' * 63}.{'b' * 63}.{'c' * 62}", "is longer than 254 octets"),
    ("a" * 320 + "@example.com", "the address is longer than 320 characters"),
    ("user\r\n@example.com", "the address has a control character (U+000D)"),
    ("user@example.com\r\n", "the address has a control character (U+000D)"),
    ("us\x00er@example.com", "has a control character (U+0000)"),
    ("us\x7fer@example.com", "has a control character (U+007F)"),
    ('"us\ter"@example.com', "has a control character (U+0009)"),
    ("us\udc00er@example.com", "has an unpaired surrogate (U+DC00)"),
]


@pytest.mark.parametrize(("text", "reason"), REJECTED_ADDRESSES)
def test_rejected_addresses(text: str, reason: str) -> None:
    with pytest.raises(InvalidName, match=re.escape(reason)):
        normalize_address(text)


# -- properties ------------------------------------------------------------------------

LDH_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")

# Text that often comes close to a domain name: letters of several scripts, digits,
# hyphens, dots of several kinds, and characters UTS #46 maps or IDNA refuses.
name_chars = st.sampled_from("abcxnXN019-._@ üßΑαж例ｅ。．\u00ad\u200d\u0308😀⑴Ⅸ")
domainish = st.one_of(
    st.text(),
    st.text(name_chars, max_size=40),
    st.lists(st.text(name_chars, min_size=1, max_size=12), min_size=1, max_size=5).map(".".join),
)
# Labels in a few scripts, for names that are valid more often than not.
unicode_label = st.text(st.sampled_from("abcz09-üéßαβжя例子テスト한국"), min_size=1, max_size=20)
unicode_name = st.lists(unicode_label, min_size=2, max_size=4).map(".".join)


def assert_valid_normal_name(name: str) -> None:
    assert name.isascii()
    assert len(name) <= 253
    assert LDH_NAME.fullmatch(name), name
    assert all(1 <= len(label) <= 63 for label in name.split("."))


@given(domainish)
@example("xn--bcher-kva.example")
@example("XN--BCHER-KVA.example.")
@settings(max_examples=500)
def test_normalize_domain_gives_a_valid_fixed_point_or_invalid_name(text: str) -> None:
    try:
        name = normalize_domain(text)
    except InvalidName:
        return
    assert_valid_normal_name(name)
    assert normalize_domain(name) == name


@given(unicode_name)
@settings(max_examples=500)
def test_display_domain_round_trips(text: str) -> None:
    try:
        name = normalize_domain(text)
    except InvalidName:
        return
    assert normalize_domain(display_domain(name)) == name


# Text that is mostly already-normal ASCII: the fast path must agree with the full path.
ascii_chars = st.sampled_from("abxn09-.A")


@given(st.one_of(st.text(ascii_chars, max_size=80), st.from_regex(LDH_NAME, fullmatch=True)))
@example("xn--bcher-kva.example")
@example("ab--c.example")
@example("127.0.0.1")
@example(NAME253)
@settings(max_examples=400)
def test_fast_path_agrees_with_full_path(text: str) -> None:
    def outcome(normalize):
        try:
            return normalize(text)
        except InvalidName as e:
            return ("invalid", str(e))

    assert outcome(normalize_domain) == outcome(names._normalize_domain_fully)


local_chars = st.sampled_from('ab."\\ @(üx+')
addressish = st.one_of(
    st.text(),
    st.tuples(st.text(local_chars, max_size=70), domainish).map("@".join),
    st.tuples(st.text(local_chars, max_size=20).map(lambda s: f'"{s}"'), st.just("example.com")).map("@".join),
)


@given(addressish)
@example('"john"@example.com')
@example('"a\\"b"@example.com')
@settings(max_examples=500)
def test_normalize_address_gives_a_valid_fixed_point_or_invalid_name(text: str) -> None:
    try:
        address = normalize_address(text)
    except InvalidName:
        return
    assert 1 <= len(address.local.encode()) <= 64
    assert len(str(address).encode()) <= 254
    assert_valid_normal_name(address.domain)
    assert normalize_address(str(address)) == address
