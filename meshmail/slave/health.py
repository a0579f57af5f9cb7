"""Health probes of a slave's own mail services: connect, read the greeting, judge it.

`judge` is the sans-IO part: the greeting bytes of a service -> up or down, with a reason.
`probe` is the trio part: one connection with a deadline (TLS first for transport "tls";
certificates are not checked: the probe asks whether the service answers, not who it is).
"""

from __future__ import annotations

import ssl

import attrs
import trio

#: What a healthy service says first (RFC 9051 / 1939 / 5321 / 2033); http says nothing first.
GREETINGS = {
    "imap": (b"* OK", b"* PREAUTH"),
    "pop3": (b"+OK",),
    "smtp": (b"220",),
    "submission": (b"220",),
    "lmtp": (b"220",),
}
#: Most bytes read of a greeting.
MAX_GREETING = 1024


@attrs.frozen
class Health:
    up: bool
    detail: str


def judge(service: str, greeting: bytes) -> Health:
    """Whether `greeting` (the first bytes a service sent) shows a healthy `service`."""
    expected = GREETINGS.get(service)
    if expected is None:
        return Health(True, "accepts connections")
    line = greeting.split(b"\n", 1)[0].rstrip(b"\r")
    shown = line[:80].decode("ascii", "replace")
    if not line:
        return Health(False, "closed without a greeting")
    if line.startswith(expected):
        return Health(True, f"greets {shown!r}")
    return Health(False, f"greets {shown!r}, not {expected[0].decode()}")


_CONTEXT = ssl.create_default_context()
_CONTEXT.check_hostname = False
_CONTEXT.verify_mode = ssl.CERT_NONE


async def probe(service: str, address: tuple[str, int], transport: str, timeout: float) -> Health:
    """Connect to a service and judge its greeting, all within `timeout` seconds."""
    host, port = address
    with trio.move_on_after(timeout):
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return Health(False, f"cannot connect: {exc.strerror or exc}")
        try:
            if transport == "tls":
                stream = trio.SSLStream(stream, _CONTEXT, server_hostname=None)
                await stream.do_handshake()
            if service not in GREETINGS:
                return Health(True, "accepts connections")
            greeting = b""
            while b"\n" not in greeting and len(greeting) < MAX_GREETING:
                data = await stream.receive_some(MAX_GREETING)
                if not data:
                    break
                greeting += data
            return judge(service, greeting)
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            return Health(False, f"connection failed: {exc}"[:200])
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(stream)
    return Health(False, f"no greeting within {timeout:g} s")
