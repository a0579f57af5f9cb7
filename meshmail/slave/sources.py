"""Sans-IO parsers of the files and command outputs that list a mail server's domains.

Each parser takes text (a file's contents, a command's output) and returns the mail domains
in normal form with the problems found, line by line. Nothing here reads files or runs
commands: the caller does, and decides what to publish. No parser raises for any text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import attrs

from meshmail.state.names import InvalidName, normalize_domain

MAX_DOMAINS = 1_000_000  # per source; more is a problem, not memory exhaustion
MAX_PROBLEMS = 100  # kept; the rest are counted in a last "... and N more"
MAX_FILES = 1000  # table and list files named by one postconf list
MAX_LINE = 4096  # characters, without the line end
QUOTE = 80  # characters of the offending text quoted in a problem
MAX_REASON = 200  # characters of a reason from InvalidName, which may quote a long label

# Postfix's ISSPACE in the C locale. Not str.split(): Python's idea of white space includes
# U+0085, U+2028 and the ASCII separators, which no mail server treats as blanks.
_BLANKS = " \t\v\f\r"
_BLANK = re.compile(r"[ \t\v\f\r]")
_INLINE_COMMENT = re.compile(r"(?:\A|[ \t\v\f\r])#.*", re.DOTALL)
_LIST_SEPARATORS = re.compile(r"[, \t\v\f\r]+")
_TABLE = re.compile(r"([A-Za-z0-9_]+):(.*)", re.DOTALL)
# Postfix table types whose source is a text file of "key value" lines at the named path
# (the indexed types build "path.db", "path.cdb", ... from it with postmap).
_FILE_TABLES = frozenset({"hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash"})


@attrs.frozen(kw_only=True)
class Parsed:
    """The domains of one source, in normal form, and the problems found reading it.

    `problems` are one line each ("line 7: 'exa mple.com': has white space"), at most
    MAX_PROBLEMS and then "... and N more problems". `complete` is False when the text is
    not empty and does not end in a newline, as a file caught mid-write: the unfinished last
    line is ignored, so a cut name never appears in `domains`, and callers keep the last
    complete list.
    """

    domains: frozenset[str]
    problems: tuple[str, ...]
    complete: bool


@attrs.frozen(kw_only=True)
class PostconfParsed(Parsed):
    """A Postfix domain list: its literal domains, and the files it names for more.

    Read each of `map_files` and parse it with parse_postfix_map (a "hash:/path" table's
    source text is "/path"); read each of `list_files` (a bare "/path" item, which Postfix
    replaces with the file's contents) and parse it with parse_postconf.
    """

    map_files: tuple[str, ...] = ()
    list_files: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class DovecotParsed(Parsed):
    """The domains of a Dovecot passwd-file's users; `users_without_domain` counts the
    users named without "@domain", which are not a problem but give no domain."""

    users_without_domain: int = 0


def parse_domain_list(text: str, *, first_column: bool = False) -> Parsed:
    """Parse a list of domains, one a line.

    The shape of DirectAdmin's /etc/virtual/domains, cPanel's /etc/localdomains and
    /etc/remotedomains, `plesk bin domain --list` and a plain Postfix domain file. Blank
    lines are skipped, and "#" starts a comment at the start of a line or after a blank.

    With `first_column`, lines are Postfix lookup-table source ("key  value"), as read by
    postmap: the key is the domain and the value is ignored, a line starting with a blank
    continues the previous line's value, and only lines whose first non-blank is "#" are
    comments. parse_postfix_map is this.
    """
    out = _Collector()
    for number, line in _lines(text, out):
        stripped = line.strip(_BLANKS)
        if not stripped or stripped.startswith("#"):
            continue
        if first_column:
            if line[0] in _BLANKS:
                continue  # the continuation of the previous entry's value
            item = _BLANK.split(stripped, 1)[0]
        else:
            item = _INLINE_COMMENT.sub("", stripped)
            if not item:
                continue
        out.domain(number, item)
    return out.parsed(text)


def parse_postfix_map(text: str) -> Parsed:
    """Parse the source text of a Postfix lookup table ("domain  value" lines): the keys.

    The source of a "hash:", "lmdb:", "texthash:", ... table of virtual_mailbox_domains,
    as for parse_domain_list(text, first_column=True).
    """
    return parse_domain_list(text, first_column=True)


def parse_cpanel_userdomains(text: str) -> Parsed:
    """Parse cPanel's /etc/userdomains: "domain: user" lines.

    The wildcard line "*: nobody" is skipped. A line without ":" or without a user is a
    problem, and its domain is not taken.
    """
    out = _Collector()
    for number, line in _lines(text, out):
        stripped = line.strip(_BLANKS)
        if not stripped or stripped.startswith("#"):
            continue
        domain, colon, user = stripped.partition(":")
        domain, user = domain.rstrip(_BLANKS), user.strip(_BLANKS)
        if not colon:
            out.problem(number, stripped, "no ':' (expected 'domain: user')")
        elif domain == "*":
            continue
        elif not user:
            out.problem(number, stripped, "no user after ':' (expected 'domain: user')")
        else:
            out.domain(number, domain)
    return out.parsed(text)


def parse_postconf(text: str) -> PostconfParsed:
    """Parse a Postfix domain list, as printed by `postconf -h virtual_mailbox_domains`.

    Items are separated by commas and/or blanks, over any number of lines; "{...}" groups
    are kept whole, as Postfix does. An item is a domain; "type:/path" for a file-backed
    table (hash, btree, lmdb, cdb, dbm, sdbm, texthash), whose source path goes to
    `map_files`; or "/path", which goes to `list_files`. Other tables (mysql:, pgsql:,
    ldap:, proxy:, regexp:, inline:, ...), "$parameter" references (run `postconf -xh` to
    expand them), "!" negations and brace groups are problems. Lines starting with "#" are
    comments, as in the list files Postfix reads.
    """
    out = _Collector()
    files = _Files(out)
    for number, item in _postfix_items(_lines(text, out), out):
        if "$" in item:
            out.problem(number, item, "a parameter reference; expand it with 'postconf -xh virtual_mailbox_domains'")
        elif item.startswith("!"):
            out.problem(number, item, "a negation ('!'), not supported in a domain list here")
        elif item.startswith("/"):
            files.add(number, item, files.lists)
        elif (table := _TABLE.fullmatch(item)) is not None:
            kind, path = table.groups()
            if kind.lower() not in _FILE_TABLES:
                out.problem(number, item, f"{kind}: tables are not supported (only {', '.join(sorted(_FILE_TABLES))})")
            elif not path.startswith("/"):
                out.problem(number, item, "the table's path is not absolute")
            else:
                files.add(number, path, files.maps)
        elif "{" in item or "}" in item:
            out.problem(number, item, "a brace group, not supported in a domain list here")
        else:
            out.domain(number, item)
    parsed = out.parsed(text)
    return PostconfParsed(
        domains=parsed.domains,
        problems=parsed.problems,
        complete=parsed.complete,
        map_files=tuple(files.maps),
        list_files=tuple(files.lists),
    )


def parse_dovecot_passwd(text: str) -> DovecotParsed:
    """Parse a Dovecot passwd-file ("user@domain:{SCHEME}password:uid:gid:gecos:home:shell:extra").

    Returns the domains of the user names. A line without ":", with an empty user name,
    with nothing before the "@" or with a bad domain is a problem. Problems quote the user
    name or domain only, never the line: the rest of it is a password hash.
    """
    out = _Collector()
    without_domain = 0
    for number, line in _lines(text, out):
        stripped = line.strip(_BLANKS)
        if not stripped or stripped.startswith("#"):
            continue
        user, colon, _ = line.partition(":")
        if not colon:
            out.problem(number, None, "no ':' (expected 'user@domain:password:...')")
        elif not user:
            out.problem(number, None, "the user name (before the first ':') is empty")
        else:
            local, at, domain = user.rpartition("@")
            if not at:
                without_domain += 1
            elif not local:
                out.problem(number, user, "nothing before the '@'")
            else:
                out.domain(number, domain)
    parsed = out.parsed(text)
    return DovecotParsed(
        domains=parsed.domains,
        problems=parsed.problems,
        complete=parsed.complete,
        users_without_domain=without_domain,
    )


@attrs.define(eq=False)
class _Collector:
    """Domains and problems as a parser finds them, within MAX_DOMAINS and MAX_PROBLEMS."""

    domains: set[str] = attrs.Factory(set)
    problems: list[str] = attrs.Factory(list)
    problem_count: int = 0
    full: bool = False

    def domain(self, number: int, text: str) -> None:
        """Add the normal form of `text`, or record why it is not a domain."""
        try:
            name = normalize_domain(text)
        except InvalidName as e:
            # names.py reasons start with the text they refuse; the problem quotes it already.
            reason = str(e).removeprefix(f"{text!r} ")
            self.problem(number, text, _clip(reason, MAX_REASON))
            return
        if name in self.domains:
            return
        if len(self.domains) >= MAX_DOMAINS:
            if not self.full:
                self.full = True
                self.problem(number, text, f"more than {MAX_DOMAINS} domains; this one and the rest are ignored")
            return
        self.domains.add(name)

    def problem(self, number: int, quoted: str | None, reason: str) -> None:
        """Record a problem on line `number`, quoting `quoted` (if given) shortened to QUOTE."""
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            reason = reason.replace("\n", "\\n").replace("\r", "\\r")  # one line, whatever the reason says
            where = f"line {number}: " if quoted is None else f"line {number}: {_quote(quoted)}: "
            self.problems.append(where + reason)

    def parsed(self, text: str) -> Parsed:
        problems = self.problems
        if self.problem_count > len(problems):
            problems = [*problems, f"... and {self.problem_count - len(problems)} more problems"]
        return Parsed(
            domains=frozenset(self.domains),
            problems=tuple(problems),
            complete=not text or text.endswith("\n"),
        )


@attrs.define(eq=False)
class _Files:
    """The files a postconf list names, each once, in order, at most MAX_FILES."""

    out: _Collector
    maps: list[str] = attrs.Factory(list)
    lists: list[str] = attrs.Factory(list)
    seen: set[str] = attrs.Factory(set)

    def add(self, number: int, path: str, into: list[str]) -> None:
        if path in self.seen:
            return
        if len(self.seen) >= MAX_FILES:
            self.out.problem(number, path, f"more than {MAX_FILES} files named; this one is ignored")
            return
        self.seen.add(path)
        into.append(path)


def _lines(text: str, out: _Collector) -> Iterator[tuple[int, str]]:
    """Yield (number, line) for each finished line of `text`, without its "\\n" or "\\r\\n".

    Lines are split at "\\n" only, as the mail servers' own readers do. What follows the
    last "\\n" is unfinished (a file caught mid-write) and is not yielded. Lines longer than
    MAX_LINE are problems, and not yielded.
    """
    start = 0
    number = 0
    while (end := text.find("\n", start)) >= 0:
        number += 1
        if end - start > MAX_LINE:
            out.problem(number, text[start : start + QUOTE + 1], f"longer than {MAX_LINE} characters")
        else:
            yield number, text[start:end].removesuffix("\r")
        start = end + 1


def _postfix_items(lines: Iterator[tuple[int, str]], out: _Collector) -> Iterator[tuple[int, str]]:
    """Yield (line number, item) of a Postfix list: items separated by commas and blanks.

    A "{...}" group is one item, and may span lines (a line end inside it is a blank), as
    Postfix's mystrtokq reads lists; an unclosed group is a problem.
    """
    tokens = _PostfixTokens()
    for number, line in lines:
        if tokens.depth == 0:
            stripped = line.strip(_BLANKS)
            if stripped.startswith("#"):
                continue
            if "{" not in line and "}" not in line:
                yield from ((number, item) for item in _LIST_SEPARATORS.split(stripped) if item)
                continue
        yield from tokens.feed(number, line)
    if tokens.group:
        out.problem(tokens.line, "".join(tokens.group).rstrip(), "a '{' that is never closed")


@attrs.define
class _PostfixTokens:
    """Characters of a Postfix list in, items out; a "{...}" group is kept whole across lines."""

    group: list[str] = attrs.Factory(list)
    depth: int = 0
    #: Where the current item started.
    line: int = 0

    def feed(self, number: int, line: str) -> Iterator[tuple[int, str]]:
        for char in line:
            if self.depth == 0 and char in ", \t\v\f\r":
                yield from self.flush()
                continue
            if not self.group:
                self.line = number
            self.group.append(char)
            if char == "{":
                self.depth += 1
            elif char == "}" and self.depth > 0:
                self.depth -= 1
        if self.depth == 0:
            yield from self.flush()
        elif self.group:
            self.group.append(" ")

    def flush(self) -> Iterator[tuple[int, str]]:
        if self.group:
            yield self.line, "".join(self.group)
            self.group = []


def _quote(text: str) -> str:
    return repr(text) if len(text) <= QUOTE else repr(text[:QUOTE]) + "..."


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
