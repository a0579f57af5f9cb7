"""The sans-IO parsers of a slave's domain sources (meshmail.slave.sources).

Sample files in the real shapes (tests/slave/samples/) with the domains and the numbered
problems each must give; every sample cut at every byte (a file caught mid-write never
publishes a cut name); Hypothesis text that never raises and gives only normal names; and
the bounds on line length, problems and domains.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshmail.slave import sources
from meshmail.slave.sources import (
    DovecotParsed,
    Parsed,
    PostconfParsed,
    parse_cpanel_userdomains,
    parse_domain_list,
    parse_dovecot_passwd,
    parse_postconf,
    parse_postfix_map,
)
from meshmail.state.names import normalize_domain

SAMPLES = Path(__file__).parent / "samples"
BUECHER = "xn--bcher-kva.example"
MUENCHEN = "xn--mnchen-3ya.de"

# (sample, parser, domains, problems as (line, quoted text or None))
CASES = [
    (
        "cpanel/userdomains",
        parse_cpanel_userdomains,
        {"example.com", "shop.example.com", "parked-domain.net", "addon.example.org", BUECHER, MUENCHEN},
        [(11, "a line pasted by hand"), (12, "exa mple.org"), (13, "orphan.example:")],
    ),
    (
        "cpanel/localdomains",
        parse_domain_list,
        {"server1.hosting.example", "example.com", "shop.example.com", "parked-domain.net", "addon.example.org"}
        | {BUECHER, MUENCHEN},
        [(11, "localhost"), (12, "-bad-.example")],
    ),
    (
        "cpanel/remotedomains",
        parse_domain_list,
        {"remote-mx.example", "office365-customer.example"},
        [(4, "192.0.2.10")],
    ),
    (
        "directadmin/domains",
        parse_domain_list,
        {"example.net", "www.example.net", "xn--strae-oqa.example", "clients.example.net"},
        [(6, "example..com"), (7, "[203.0.113.5]")],
    ),
    (
        "plesk/domain-list.txt",
        parse_domain_list,
        {"example.com", BUECHER, "xn--mller-shop-9db.de", "sub.example.com"},
        [(8, "exa mple.org"), (9, "xn--zz.example")],
    ),
    (
        "postfix/vmail_domains",
        parse_postfix_map,
        {"example.com", "example.net", BUECHER, MUENCHEN, "long-comment.example"},
        [(12, "bad_domain!.com"), (13, "@example.org")],
    ),
    (
        "postfix/postconf-simple.txt",
        parse_postconf,
        {"example.com", "example.net", BUECHER},
        [],
    ),
    (
        "postfix/postconf-tables.txt",
        parse_postconf,
        set(),
        [(1, "$mydestination"), (1, "mysql:/etc/postfix/mysql-virtual-domains.cf")],
    ),
    (
        "postfix/postconf-multiline.txt",
        parse_postconf,
        {"example.org", "last.example"},
        [
            (2, "proxy:hash:/etc/postfix/proxied"),
            (3, "pgsql:/etc/postfix/pgsql.cf"),
            (3, "ldap:/etc/postfix/ldap.cf"),
            (4, "!blocked.example"),
            (4, "hash:relative/path"),
            (5, "inline:{ inline-a.example,            inline-b.example }"),
        ],
    ),
    ("postfix/postconf-empty.txt", parse_postconf, set(), []),
    ("postfix/extra_domains", parse_postconf, {"extra-a.example", "extra-b.example", "extra-c.example"}, []),
    (
        "dovecot/passwd",
        parse_dovecot_passwd,
        {"example.com", BUECHER, MUENCHEN},
        [(9, None), (10, None), (11, "@example.org"), (12, "exa mple.net")],
    ),
]

PARSERS = [parse_domain_list, parse_postfix_map, parse_cpanel_userdomains, parse_postconf, parse_dovecot_passwd]


def read(sample: str) -> str:
    return (SAMPLES / sample).read_bytes().decode("utf-8")


def problem_lines(parsed: Parsed) -> list[tuple[int, str | None]]:
    """The (line number, quoted text) of each problem, read back from its text."""
    found = []
    for problem in parsed.problems:
        head, _, rest = problem.partition(": ")
        assert head.startswith("line ")
        quoted = ast.literal_eval(rest[: rest.index("': ") + 1]) if rest.startswith("'") else None
        found.append((int(head.removeprefix("line ")), quoted))
    return found


@pytest.mark.parametrize(("sample", "parse", "domains", "problems"), CASES, ids=[c[0] for c in CASES])
def test_sample(sample, parse, domains, problems):
    parsed = parse(read(sample))
    assert parsed.domains == domains
    assert problem_lines(parsed) == problems
    assert parsed.complete


def test_sample_problems_read_well():
    assert parse_domain_list(read("plesk/domain-list.txt")).problems[0] == "line 8: 'exa mple.org': has white space"
    assert parse_domain_list(read("cpanel/localdomains")).problems == (
        "line 11: 'localhost': is a single label; a mail domain has at least two, like example.com",
        "line 12: '-bad-.example': label '-bad-' starts or ends with a hyphen",
    )


def test_postconf_files():
    tables = parse_postconf(read("postfix/postconf-tables.txt"))
    assert tables.map_files == ("/etc/postfix/vmail_domains",)
    assert tables.list_files == ()
    multi = parse_postconf(read("postfix/postconf-multiline.txt"))
    assert multi.map_files == ("/etc/postfix/more_domains", "/etc/postfix/lmdb_domains", "/etc/postfix/vmail_domains")
    assert multi.list_files == ("/etc/postfix/extra_domains",)
    assert parse_postconf(read("postfix/extra_domains")).map_files == ("/etc/postfix/nested",)
    assert "postconf -xh" in tables.problems[0]


def test_postconf_from_main_cf_to_domains():
    """What a caller does: postconf's list, then each table's source through the map parser."""
    top = parse_postconf("hash:/etc/postfix/vmail_domains, example.com\n")
    files = {"/etc/postfix/vmail_domains": read("postfix/vmail_domains")}
    domains = set(top.domains)
    for path in top.map_files:
        domains |= parse_postfix_map(files[path]).domains
    assert BUECHER in domains and "long-comment.example" in domains


@pytest.mark.parametrize(
    ("text", "domains", "problems"),
    [
        ("a.example b.example\n", {"a.example", "b.example"}, 0),
        ("a.example,b.example,,\n", {"a.example", "b.example"}, 0),
        ("a.example,\n  b.example\n", {"a.example", "b.example"}, 0),
        ("{ a.example }\n", set(), 1),
        ("inline:{ a.example,\nb.example\n", set(), 1),  # never closed
        ("x.example }\n", {"x.example"}, 1),
        ("# a comment\nc.example\n", {"c.example"}, 0),
        ("foo:bar\n", set(), 1),
        ("HASH:/etc/postfix/x\n", set(), 0),
        ("${virtual_mailbox_maps}\n", set(), 1),
    ],
)
def test_postconf_shapes(text, domains, problems):
    parsed = parse_postconf(text)
    assert parsed.domains == domains
    assert len(parsed.problems) == problems, parsed.problems


def test_dovecot_passwords_never_in_problems():
    text = read("dovecot/passwd")
    parsed = parse_dovecot_passwd(text)
    assert isinstance(parsed, DovecotParsed)
    assert parsed.users_without_domain == 1  # postmaster
    for secret in ("hunter2", "topsecret", "nouserpw", "noLocalPw", "spacePw", "$6$", "{PLAIN}"):
        assert all(secret not in problem for problem in parsed.problems)


def test_dovecot_shapes():
    assert parse_dovecot_passwd("a@example.com:\n").domains == {"example.com"}
    assert parse_dovecot_passwd("a@example.com:x:::::::::\n").domains == {"example.com"}
    assert parse_dovecot_passwd('"a@b"@example.com:x\n').domains == {"example.com"}  # the last '@'
    assert parse_dovecot_passwd("bob:x\nalice:y\n").users_without_domain == 2
    assert parse_dovecot_passwd("bob:x\n").problems == ()


def test_domain_list_shapes():
    assert parse_domain_list("example.com # old customer\n").domains == {"example.com"}
    assert parse_domain_list("\texample.com \r\n").domains == {"example.com"}
    # Only Postfix's blanks are blanks: U+2028 and U+0085 inside or around a name are refused.
    assert parse_domain_list("example.com\u2028\nexample\x85.com\n").domains == frozenset()
    assert parse_domain_list("example.com OK\n").domains == frozenset()  # not a map unless asked
    assert parse_domain_list("example.com OK\n", first_column=True).domains == {"example.com"}
    assert parse_postfix_map(" indented.example OK\n").domains == frozenset()  # a continuation line


def test_userdomains_shapes():
    assert parse_cpanel_userdomains("*: nobody\n") == Parsed(domains=frozenset(), problems=(), complete=True)
    assert parse_cpanel_userdomains("example.com:bob\n").domains == {"example.com"}
    assert parse_cpanel_userdomains("example.com: bob\r\n").domains == {"example.com"}


@pytest.mark.parametrize(("sample", "parse"), [(c[0], c[1]) for c in CASES], ids=[c[0] for c in CASES])
def test_cut_at_every_byte(sample, parse):
    """A file read mid-write: only its finished lines count, and no cut name is published."""
    data = (SAMPLES / sample).read_bytes()
    full = parse(data.decode("utf-8"))
    for cut in range(len(data) + 1):
        prefix = data[:cut].decode("utf-8", errors="replace")  # a cut may split a UTF-8 character
        parsed = parse(prefix)
        assert parsed.complete == (cut == 0 or data[cut - 1 : cut] == b"\n")
        assert parsed.domains <= full.domains, (cut, parsed.domains - full.domains)
        finished = data[: data.rfind(b"\n", 0, cut) + 1].decode("utf-8")
        assert parsed.domains == parse(finished).domains
        assert parsed.problems == parse(finished).problems


def test_incomplete_last_line_is_ignored():
    parsed = parse_domain_list("example.com\nexam")
    assert parsed == Parsed(domains=frozenset({"example.com"}), problems=(), complete=False)
    assert parse_domain_list("").complete
    assert not parse_domain_list("example.com").complete
    assert parse_domain_list("example.com").domains == frozenset()


@pytest.mark.parametrize("parse", PARSERS)
def test_long_line(parse):
    long = "a" * (sources.MAX_LINE - len(".example")) + ".example"
    parsed = parse(f"{long}x\nok.example:u\n")
    assert parsed.problems[0].startswith("line 1: 'aaaa")
    assert parsed.problems[0].endswith(f"...: longer than {sources.MAX_LINE} characters")
    assert len(parsed.problems[0]) < 200
    at_limit = parse(long + "\n").problems  # a line of exactly MAX_LINE characters is allowed
    assert not any(f"longer than {sources.MAX_LINE}" in problem for problem in at_limit)


@pytest.mark.parametrize("parse", PARSERS)
def test_problems_are_bounded(parse):
    parsed = parse("bad_name\n" * 1000)
    assert len(parsed.problems) == sources.MAX_PROBLEMS + 1
    assert parsed.problems[-1] == f"... and {1000 - sources.MAX_PROBLEMS} more problems"
    assert parsed.problems[0].startswith("line 1: ")
    assert parsed.problems[99].startswith("line 100: ")


def test_domains_are_bounded(monkeypatch):
    monkeypatch.setattr(sources, "MAX_DOMAINS", 10)
    text = "".join(f"d{i}.example\n" for i in range(25)) + "d0.example\n"
    parsed = parse_domain_list(text)
    assert parsed.domains == {f"d{i}.example" for i in range(10)}
    assert parsed.problems == ("line 11: 'd10.example': more than 10 domains; this one and the rest are ignored",)


def test_a_million_domains():
    text = "".join(f"d{i}.example\n" for i in range(sources.MAX_DOMAINS + 5))
    parsed = parse_domain_list(text)
    assert len(parsed.domains) == sources.MAX_DOMAINS
    assert len(parsed.problems) == 1


def test_postconf_files_are_bounded(monkeypatch):
    monkeypatch.setattr(sources, "MAX_FILES", 3)
    parsed = parse_postconf(" ".join(f"hash:/etc/postfix/t{i}" for i in range(5)) + " /etc/a\n")
    assert len(parsed.map_files) == 3 and parsed.list_files == ()
    assert len(parsed.problems) == 3
    assert isinstance(parsed, PostconfParsed)


LINES = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(["example.com", "Bücher.Example.", "xn--bcher-kva.example", "*: nobody", "# c", ""]),
        st.builds(
            "{}{}{}".format,
            st.sampled_from(["", "u@", "@", " ", "hash:/", "$"]),
            st.from_regex(r"[A-Za-z0-9.\-]{1,20}", fullmatch=True),
            st.sampled_from(["", ":", ": bob", ":x:1:1::/h::", " OK", ",", "\r", " # c"]),
        ),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(lines=LINES, end=st.sampled_from(["\n", "", "\r\n"]))
@example(lines=["\ud800.example", "é" * 5000], end="\n")
def test_never_raises_and_names_are_normal(lines, end):
    text = "\n".join(lines) + end
    for parse in PARSERS:
        parsed = parse(text)
        assert isinstance(parsed, Parsed)
        assert all(normalize_domain(domain) == domain for domain in parsed.domains)
        assert all("\n" not in p and "\r" not in p and len(p) < 400 for p in parsed.problems)
        assert parsed.complete == (not text or text.endswith("\n"))


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_any_text(text):
    for parse in PARSERS:
        parsed = parse(text)
        assert all(normalize_domain(domain) == domain for domain in parsed.domains)
        assert len(parsed.problems) <= sources.MAX_PROBLEMS + 1
