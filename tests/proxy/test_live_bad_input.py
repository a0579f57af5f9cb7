"""Bad input on live sockets against a real `meshmail run` master proxying to a real Dovecot (and
its Postfix for submission), one protocol at a time: over 10,000 malformed, oversize, NUL-laden,
random and badly encoded lines each get the protocol's error or a close; a slow-loris client and
2,000 idle unauthenticated connections are closed at the login timeout while a good client logs
in meanwhile; the master's peak RSS stays within a bound of its RSS before, it is still running,
and its log holds no traceback. The codecs are fuzzed without sockets in tests/protocols/."""

from __future__ import annotations

import base64
import concurrent.futures
import imaplib
import itertools
import json
import poplib
import random
import re
import resource
import selectors
import smtplib
import socket
import threading
from collections.abc import Callable, Iterator

import attrs
import pytest
from helpers import mailkit
from helpers.cluster import Cluster, Node
from helpers.config import QUICK_SLAVE

from meshmail.core.address import Address
from meshmail.protocols import imap, pop3, smtp
from meshmail.protocols.common import MAX_SASL

HOST = "127.0.0.1"
USER, PASSWORD = "ann@one.example", "loris-proof-1"
#: The proxy's login timeout in this test: idle and slow clients are closed after it.
LOGIN_TIMEOUT = 8
#: Idle unauthenticated connections held at once, per protocol.
IDLE = 2000
#: Bad lines sent per protocol, and the client threads that send them side by side.
BAD_LINES = 10_000
SENDERS = 4
#: How long one reply may take before the session counts as hung (a loaded 2-core machine).
REPLY_TIMEOUT = 20.0
#: How much the master's peak RSS (VmHWM) may exceed its RSS before the storm. 2,000 idle
#: sessions cost about 2000 x (loop task, socket stream, codec, about 8 KiB) = 16 MiB (measured
#: with trio tasks: 15.6 MiB over the baseline, the same after all three protocols), and each sender's session
#: holds at most a line and a literal cap (16 KiB). 64 MiB is four times that, while an input
#: kept past a cap (10,000 lines of up to 32 KiB is 300 MiB; a literal announced at 4 GiB is
#: more) would blow through it.
RSS_BOUND = 64 * 2**20


# --- the cluster ----------------------------------------------------------------------------


@attrs.frozen
class Proxied:
    """The master (its node), the port of each proxy listener, and the master's RSS once every
    protocol served a login."""

    master: Node
    ports: dict[str, int]
    baseline: int


def rss(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test holds")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture(scope="module")
def proxied(tmp_path_factory) -> Iterator[Proxied]:
    """Master n1 with a [proxy] on every plain listener; slave n2 publishing a Dovecot that
    relays submission through a Postfix; one user."""
    mailkit.require("dovecot", "postfix")
    raise_fd_limit(IDLE + 512)  # the master inherits it too
    root = tmp_path_factory.mktemp("live-bad-input")
    with (
        mailkit.dovecot(root / "dovecot", {USER: PASSWORD}, name="d1") as dovecot,
        mailkit.postfix(root / "postfix", dovecot, ["one.example"]) as postfix,
    ):
        dovecot.relay_to(postfix.endpoint)
        (root / "nodes").mkdir()
        fleet = Cluster.configured(2, root / "nodes")
        try:
            master, slave = fleet.nodes["n1"], fleet.nodes["n2"]
            master.config.write_text(
                master.config.read_text()
                + f'\n[proxy]\nimap = "{HOST}:0"\npop3 = "{HOST}:0"\nsubmission = "{HOST}:0"\n'
                f"imaps = false\npop3s = false\nsubmissions = false\nlogin_timeout = {LOGIN_TIMEOUT}\n"
                f"max_sessions = {4 * IDLE}\nmax_sessions_per_client = {4 * IDLE}\n"
            )
            found = dovecot.endpoints()
            slave.config.write_text(
                slave.config.read_text().replace('name = "n2"', 'name = "n2"\nrole = "slave"')
                + f'\n[endpoints]\nimap = "{found["imap"]}"\npop3 = "{found["pop3"]}"\n'
                f'submission = "{found["submission"]}"\n{QUICK_SLAVE}\n'
                f'[[slave.sources]]\ntype = "dovecot"\npath = "{dovecot.passwd}"\n'
            )
            fleet.start()
            fleet.wait("one.example routed on n1", ["n1"], lambda statuses: statuses["n1"]["state"]["domains"] >= 1)
            bound = {name: Address.parse(text) for name, text in _ready(master).items()}
            ports = {protocol: bound[protocol].port for protocol in DIALECTS}
            for protocol, port in ports.items():
                log_in(protocol, port)
            assert master.process is not None
            yield Proxied(master, ports, rss(master.process.pid))
        finally:
            fleet.close()
            print(fleet.logs())


def _ready(node: Node) -> dict[str, str]:
    return json.loads(node.ready.read_text())


# --- good clients ---------------------------------------------------------------------------


def log_in(protocol: str, port: int) -> None:
    """A full login through the proxy with the standard library's client; raises on refusal."""
    if protocol == "imap":
        client = imaplib.IMAP4(HOST, port, timeout=REPLY_TIMEOUT)
        client.login(USER, PASSWORD)
        assert client.select("INBOX")[0] == "OK"
        client.logout()
    elif protocol == "pop3":
        pop = poplib.POP3(HOST, port, timeout=REPLY_TIMEOUT)
        pop.user(USER)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        pop.stat()
        pop.quit()
    else:
        with smtplib.SMTP(HOST, port, timeout=REPLY_TIMEOUT) as client:
            client.ehlo("good.example")
            client.login(USER, PASSWORD)
            assert client.noop()[0] == 250


# --- bad lines ------------------------------------------------------------------------------

#: A step of bad input: a line (without its line end) and whether it asks for a SASL
#: continuation (the first line of a two-step AUTH) rather than an error.
Step = tuple[bytes, bool]
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def random_bytes(rng: random.Random, longest: int = 300) -> bytes:
    """Random bytes without CR or LF (which would split the line)."""
    return bytes(rng.choice([b for b in range(256) if b not in b"\r\n"]) for _ in range(rng.randint(1, longest)))


def with_nuls(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        data.insert(rng.randint(1, len(data)), 0)
    return bytes(data)


def bad_base64(rng: random.Random) -> bytes:
    """A SASL response that is no usable base64 PLAIN or LOGIN answer: a character outside the
    alphabet, a length that is no multiple of 4, valid base64 of bytes with one NUL (PLAIN
    needs two, LOGIN none), or longer than any response the codecs take."""
    body = bytes(rng.choice(B64) for _ in range(4 * rng.randint(1, 40)))
    kind = rng.randrange(4)
    if kind == 0:
        at = rng.randrange(len(body))
        return body[:at] + bytes([rng.choice(b"!#$%&()-.:;<>?@[]^_`{|}~")]) + body[at + 1 :]
    if kind == 1:
        return rng.choice([body + b"A", body + b"AB", body + b"AB=", body + b"A===", b"=" + body, body[:-1] + b"=A"])
    if kind == 2:
        data = bytearray(rng.randint(1, 255) for _ in range(rng.randint(1, 60)))
        data.insert(rng.randint(0, len(data)), 0)
        return base64.b64encode(data)
    return b"A" * (MAX_SASL + 4)


def oversize(rng: random.Random, limit: int, prefix: bytes = b"") -> bytes:
    filler = rng.choice([b"A", b"\0", b"x y ", b'"', b"{"])
    return (prefix + filler * (4 * limit))[: rng.randint(limit + 1, 4 * limit)]


def imap_steps(rng: random.Random) -> list[Step]:
    tag = b"t%d" % rng.randrange(10_000)
    choices: list[Callable[[], list[Step]]] = [
        lambda: [(oversize(rng, imap.MAX_LINE, tag + b" LOGIN "), False)],
        lambda: [(with_nuls(rng, tag + b" LOGIN ann@one.example secret"), False)],
        lambda: [(random_bytes(rng), False)],
        lambda: [
            (tag + b" " + rng.choice([b"SELECT INBOX", b"FETCH 1:* (BODY[])", b"XYZZY", b"APPEND INBOX {5}"]), False)
        ],
        lambda: [(rng.choice([b"", b" ", tag, tag + b" ", b"* LOGIN a b", b"+ x", tag + b"  NOOP"]), False)],
        lambda: [(tag + b" LOGIN " + rng.choice([b"onlyone", b"a b c", b"() x", b'"a" ()']), False)],
        lambda: [(tag + b' LOGIN "ann@one.example secret', False)],
        lambda: [(tag + b' LOGIN "ann" "sec\\', False)],
        lambda: [(tag + b" LOGIN ann " + rng.choice([b"{4294967296}", b"{8193}", b"{99999999999}"]), False)],
        lambda: [(tag + b" LOGIN " + rng.choice([b"{4294967296+}", b"{99999999999999999999+}"]), False)],
        lambda: [(tag + b" LOGIN {99999999999999999999}", False)],
        lambda: [(tag + b" AUTHENTICATE PLAIN " + bad_base64(rng), False)],
        lambda: [(tag + b" AUTHENTICATE " + rng.choice([b"PLAIN", b"LOGIN"]), True), (bad_base64(rng), False)],
        lambda: [(tag + b" AUTHENTICATE " + rng.choice([b"CRAM-MD5", b"GSSAPI", b"", b"PLAIN a b"]), False)],
        lambda: [(tag + b" ID " + rng.choice([b"(", b'("a")', b'("a" "' + b"v" * 2000 + b'")', b"x"]), False)],
        lambda: [(tag + b" " + rng.choice([b"STARTTLS", b"NOOP x", b"CAPABILITY y", b"LOGOUT z"]), False)],
    ]
    return rng.choice(choices)()


def pop3_steps(rng: random.Random) -> list[Step]:
    choices: list[Callable[[], list[Step]]] = [
        lambda: [(oversize(rng, pop3.MAX_LINE, b"AUTH PLAIN "), False)],
        lambda: [(with_nuls(rng, rng.choice([b"USER ann@one.example", b"CAPA", b"QUIT"])), False)],
        lambda: [(random_bytes(rng), False)],
        lambda: [(rng.choice([b"RETR 1", b"STAT", b"LIST", b"TOP 1 10", b"XYZZY", b"UIDL", b"DELE 1"]), False)],
        lambda: [(rng.choice([b"", b" ", b"USER", b"USER ", b"PASS secret", b"PASS", b"CAPA x", b"STLS"]), False)],
        lambda: [(b"PASS " + rng.choice([b"{4294967296}", b"{99999999999999999999+}"]), False)],
        lambda: [(b"AUTH " + rng.choice([b"CRAM-MD5", b"PLAIN a b", b"XOAUTH2 x"]), False)],
        lambda: [(b"AUTH PLAIN " + rng.choice([b"{4294967296}", bad_base64(rng)]), False)],
        lambda: [(b"AUTH LOGIN " + bad_base64(rng), False)],
        lambda: [(b"AUTH " + rng.choice([b"PLAIN", b"LOGIN"]), True), (bad_base64(rng), False)],
    ]
    return rng.choice(choices)()


def submission_steps(rng: random.Random) -> list[Step]:
    choices: list[Callable[[], list[Step]]] = [
        lambda: [(oversize(rng, smtp.MAX_AUTH_LINE, b"AUTH PLAIN "), False)],
        lambda: [(oversize(rng, smtp.MAX_COMMAND_LINE, b"MAIL FROM:<"), False)],
        lambda: [(with_nuls(rng, rng.choice([b"EHLO client.example", b"NOOP", b"AUTH PLAIN"])), False)],
        lambda: [(random_bytes(rng), False)],
        lambda: [(rng.choice([b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@y.example>", b"DATA", b"VRFY root"]), False)],
        lambda: [(b"BDAT " + rng.choice([b"4294967296 LAST", b"99999999999999999999", b"-1"]), False)],
        lambda: [(rng.choice([b"", b" ", b"XYZZY", b"EHLO", b"HELO", b"EHLO a b", b"RSET x", b"STARTTLS"]), False)],
        lambda: [(b"AUTH " + rng.choice([b"CRAM-MD5", b"PLAIN a b", b"", b"LOGIN x y"]), False)],
        lambda: [(b"AUTH PLAIN " + rng.choice([b"{4294967296}", bad_base64(rng)]), False)],
        lambda: [(b"AUTH LOGIN " + bad_base64(rng), False)],
        lambda: [(b"AUTH " + rng.choice([b"PLAIN", b"LOGIN"]), True), (bad_base64(rng), False)],
    ]
    return rng.choice(choices)()


@attrs.frozen
class Dialect:
    """How one protocol looks on the wire to the bad-input client."""

    greeting: bytes
    #: Lines sent after the greeting on each connection, each answered by a success.
    setup: tuple[bytes, ...]
    error: re.Pattern[bytes]
    continuation: re.Pattern[bytes]
    steps: Callable[[random.Random], list[Step]]
    #: Replies run over several lines (SMTP's "250-"): a line with "-" after the code goes on.
    multiline: bool = False


DIALECTS = {
    "imap": Dialect(b"* OK ", (), re.compile(rb"(\S+ (BAD|NO)|\* (BAD|BYE)) "), re.compile(rb"\+ "), imap_steps),
    "pop3": Dialect(b"+OK ", (), re.compile(rb"-ERR( |\Z)"), re.compile(rb"\+ "), pop3_steps),
    "submission": Dialect(
        b"220 ",
        (b"EHLO storm.example",),
        re.compile(rb"(5\d\d|421)[ -]"),
        re.compile(rb"334 "),
        submission_steps,
        multiline=True,
    ),
}


class Closed(Exception):
    """The proxy closed the connection (end of stream or reset)."""


class LineClient:
    """One client connection read a reply at a time; raises Closed when the proxy closes it
    and AssertionError when it neither answers nor closes within REPLY_TIMEOUT."""

    def __init__(self, port: int, dialect: Dialect) -> None:
        self.dialect = dialect
        self.sock = socket.create_connection((HOST, port), timeout=REPLY_TIMEOUT)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, line: bytes) -> None:
        try:
            self.sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            raise Closed from None

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise AssertionError(f"no reply and no close within {REPLY_TIMEOUT} s") from None
            if not chunk:
                raise Closed
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.removesuffix(b"\r")

    def reply(self) -> list[bytes]:
        lines = [self.line()]
        while self.dialect.multiline and lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def closes(self) -> None:
        """The proxy is saying goodbye: nothing but its goodbye line and the end of the stream
        may follow."""
        try:
            while True:
                extra = self.line()
                assert extra.startswith((b"* BYE ", b"421 ")), f"{extra!r} after a closing reply"
        except Closed:
            return


@attrs.define
class Tally:
    errors: int = 0
    closes: int = 0
    connections: int = 0


def storm(port: int, dialect: Dialect, seed: int, lines: int) -> Tally:
    """Send `lines` bad lines (and the continuations before some) over as many connections as
    the proxy's closes need; every bad line gets an error reply or the connection's close."""
    rng = random.Random(seed)
    tally = Tally()
    client: LineClient | None = None
    sent = 0
    try:
        while sent < lines:
            steps = dialect.steps(rng)
            for line, continued in steps:
                if client is None:
                    client = connect(port, dialect)
                    tally.connections += 1
                sent += not continued
                end = b"\n" if rng.random() < 0.1 else b"\r\n"
                try:
                    client.send(line + end)
                    reply = client.reply()
                except Closed:
                    tally.closes += not continued
                    client.close()
                    client = None
                    break
                expected = dialect.continuation if continued else dialect.error
                assert expected.match(reply[-1]), f"{line[:200]!r} got {reply!r}"
                tally.errors += not continued
                if reply[-1].startswith((b"* BYE", b"421")) or client.buffer.startswith(b"* BYE"):
                    client.closes()
                    client.close()
                    client = None
                    break
    finally:
        if client is not None:
            client.close()
    return tally


def connect(port: int, dialect: Dialect) -> LineClient:
    client = LineClient(port, dialect)
    greeting = client.reply()
    assert greeting[-1].startswith(dialect.greeting), greeting
    for line in dialect.setup:
        client.send(line + b"\r\n")
        reply = client.reply()
        assert reply[-1][:1] in b"2", (line, reply)
    return client


# --- slow and idle clients ------------------------------------------------------------------

#: How a slow-loris client starts its never-ending line.
LORIS_START = {"imap": b"l1 LOGIN ", "pop3": b"USER ", "submission": b"AUTH PLAIN "}
#: Seconds between two bytes of the slow-loris client.
LORIS_INTERVAL = 0.5
#: Longer than this the proxy must not keep a client that has not logged in.
CLOSE_DEADLINE = 4 * LOGIN_TIMEOUT + REPLY_TIMEOUT


def slow_loris(port: int, protocol: str) -> bytes:
    """Trickle a line one byte per LORIS_INTERVAL, never ending it, until the proxy closes the
    connection; returns what the proxy sent after the greeting. Fails if the connection is
    still open after CLOSE_DEADLINE worth of bytes."""
    dialect = DIALECTS[protocol]
    client = connect(port, dialect)
    received = client.buffer
    client.sock.settimeout(LORIS_INTERVAL)
    try:
        payload = itertools.chain(LORIS_START[protocol], itertools.repeat(ord("x")))
        for byte in itertools.islice(payload, int(CLOSE_DEADLINE / LORIS_INTERVAL)):
            try:
                client.send(bytes([byte]))
                chunk = client.sock.recv(4096)
            except TimeoutError:
                continue
            except (Closed, ConnectionResetError):
                return received
            if not chunk:
                return received
            received += chunk
        raise AssertionError(f"a slow-loris {protocol} client still connected after {CLOSE_DEADLINE} s of bytes")
    finally:
        client.close()


def hold_idle(port: int, dialect: Dialect, count: int) -> list[socket.socket]:
    """`count` connections that each read the greeting and then say nothing."""
    idle = [socket.create_connection((HOST, port), timeout=REPLY_TIMEOUT) for _ in range(count)]
    for heard in read_until(idle, lambda data: b"\n" in data, REPLY_TIMEOUT).values():
        assert heard.startswith(dialect.greeting), heard
    return idle


def read_until(socks: list[socket.socket], done: Callable[[bytes], bool], timeout: float) -> dict[socket.socket, bytes]:
    """Read every socket until done(what it sent) or its end of stream (b"" then added to what it
    sent is what done sees last); fails after `timeout` seconds with no progress."""
    heard = {sock: b"" for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while selector.get_map():
            events = selector.select(timeout)
            assert events, f"{len(selector.get_map())} of {len(socks)} connections neither answered nor closed"
            for key, _ in events:
                sock = key.fileobj
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                heard[sock] += chunk
                if not chunk or done(heard[sock]):
                    selector.unregister(sock)
                    if not chunk:
                        heard[sock] += b"<closed>"
    for sock in socks:
        sock.setblocking(True)
    return heard


def closed_by_proxy(socks: list[socket.socket], dialect: Dialect) -> None:
    """Every idle connection is closed by the proxy (its login timeout), after an error line
    that says so."""
    for heard in read_until(socks, lambda data: False, CLOSE_DEADLINE).values():
        assert heard.endswith(b"<closed>")
        lines = heard.removesuffix(b"<closed>").splitlines()
        assert lines and all(dialect.error.match(line) for line in lines), heard


# --- the test -------------------------------------------------------------------------------


def good_logins(protocol: str, port: int, stop: threading.Event) -> int:
    """Log in through the proxy again and again until `stop`; returns how many times."""
    count = 0
    while not stop.is_set() or not count:
        log_in(protocol, port)
        count += 1
    return count


@pytest.mark.parametrize("protocol", list(DIALECTS))
def test_bad_input_gets_errors_or_a_close_and_good_clients_still_log_in(proxied, protocol):
    dialect, port = DIALECTS[protocol], proxied.ports[protocol]
    master = proxied.master
    assert master.process is not None

    idle = hold_idle(port, dialect, IDLE)
    try:
        sessions = master.get("/status")["proxy"]["sessions"][protocol]
        assert sessions >= IDLE, f"{sessions} {protocol} sessions open while {IDLE} idle clients are connected"
        log_in(protocol, port)
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(SENDERS + 2) as pool:
            good = pool.submit(good_logins, protocol, port, stop)
            loris = pool.submit(slow_loris, port, protocol)
            senders = [pool.submit(storm, port, dialect, seed, BAD_LINES // SENDERS) for seed in range(SENDERS)]
            try:
                tallies = [sender.result() for sender in senders]
            finally:
                stop.set()
            assert good.result() >= 1
            for line in loris.result().splitlines():
                assert dialect.error.match(line), line
        closed_by_proxy(idle, dialect)
    finally:
        for sock in idle:
            sock.close()

    errors, closes = sum(t.errors for t in tallies), sum(t.closes for t in tallies)
    print(f"{protocol}: {errors} errors, {closes} closes over {sum(t.connections for t in tallies)} connections")
    assert errors + closes == SENDERS * (BAD_LINES // SENDERS) >= BAD_LINES
    assert errors >= BAD_LINES // 2, "most bad lines are answered, not just cut off"
    log_in(protocol, port)

    peak = rss(master.process.pid, "VmHWM")
    print(f"{protocol}: master RSS {proxied.baseline / 2**20:.1f} MiB before, peak {peak / 2**20:.1f} MiB")
    assert peak - proxied.baseline <= RSS_BOUND
    assert master.exited() is None
    assert "Traceback" not in master.log.read_text(errors="replace")
