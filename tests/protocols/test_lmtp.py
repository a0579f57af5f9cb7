"""protocols.lmtp: the delivery client against scripted servers (LMTP's reply per recipient,
SMTP's one reply, STARTTLS, XCLIENT, XFORWARD, verification, refusals, a server going away), the
dot-stuffing round trip through MxServer, and against a real Dovecot LMTP and a real Postfix."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshmail.protocols.common import Closed, ProtocolError, StartTls
from meshmail.protocols.lmtp import (
    NO_SMTPUTF8,
    DeliveryClient,
    Done,
    Failed,
    Ready,
    SendBody,
    Transaction,
    Xforward,
)
from meshmail.protocols.mx import DataChunk, DataEnd, MailFrom, MxServer, RcptTo
from meshmail.protocols.smtp import Reply, Xclient

MESSAGE = b"From: alice@a.test\r\nSubject: hi\r\nMessage-ID: <m1@a.test>\r\n\r\n.hidden dot\r\nbye\r\n"
#: A server that takes commands one at a time, and one that offers PIPELINING (RFC 2920).
LHLO = b"250-slave.test\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE 1000\r\n"
LHLO_PIPELINING = b"250-slave.test\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
OK = b"250 2.0.0 OK\r\n"
UNKNOWN = b"550 5.1.1 <nobody@a.test> User doesn't exist\r\n"


def transaction(**options) -> Transaction:
    return Transaction(**({"sender": "s@x.test", "recipients": ("a@a.test", "nobody@a.test", "b@a.test")} | options))


def converse(client: DeliveryClient, script: list[bytes], chunk: int | None = None, message: bytes = MESSAGE):
    """Plays a server: each scripted reply is fed after the client's last command. Ready and Done
    are answered with the next of `transactions` (then quit), SendBody with `message`. Returns
    the client's commands and events."""
    sent, events = [], []
    for reply in script:
        pieces = [reply] if chunk is None else [reply[i : i + chunk] for i in range(0, len(reply), chunk)]
        for piece in pieces:
            client.receive_data(piece)
            while (event := client.next_event()) is not None:
                events.append(event)
                if isinstance(event, StartTls):
                    client.tls_started()
                elif isinstance(event, SendBody):
                    client.body(message[:10])
                    client.body(message[10:])
                    client.end_body()
        sent.append(client.data_to_send())
    return sent, events


def ready(client: DeliveryClient, script: list[bytes] | None = None) -> None:
    _, events = converse(client, script or [b"220 slave.test LMTP\r\n", LHLO])
    assert events[-1] == Ready()


R = Reply(250, "2.0.0", "OK")
R_UNKNOWN = Reply(550, "5.1.1", "<nobody@a.test> User doesn't exist")


@pytest.mark.parametrize("chunk", [None, 1])
def test_lmtp_delivery_maps_a_reply_to_each_accepted_recipient(chunk):
    client = DeliveryClient(ehlo_name="mx.test")
    sent, events = converse(client, [b"220 slave.test LMTP\r\n", LHLO], chunk)
    assert sent == [b"LHLO mx.test\r\n", b""] and events == [Ready()]
    client.send(transaction(size=len(MESSAGE), body="8BITMIME"))
    assert client.data_to_send() == b"MAIL FROM:<s@x.test> SIZE=78 BODY=8BITMIME\r\n"
    a_ok, b_later = b"250 2.0.0 <a@a.test> Saved\r\n", b"452 4.2.2 <b@a.test> Quota exceeded\r\n"
    sent, events = converse(client, [OK, OK, UNKNOWN, OK, b"354 go\r\n", a_ok, b_later], chunk)
    assert sent == [
        b"RCPT TO:<a@a.test>\r\n",
        b"RCPT TO:<nobody@a.test>\r\n",
        b"RCPT TO:<b@a.test>\r\n",
        b"DATA\r\n",
        MESSAGE.replace(b"\n.hidden", b"\n..hidden") + b".\r\n",
        b"",
        b"",
    ]
    saved, quota = Reply(250, "2.0.0", "<a@a.test> Saved"), Reply(452, "4.2.2", "<b@a.test> Quota exceeded")
    assert events == [SendBody(), Done((saved, R_UNKNOWN, quota))]
    client.quit()
    sent, events = converse(client, [b"221 2.0.0 Bye\r\n"])
    assert events == [Closed()]


def test_mail_parameters_only_where_offered():
    client = DeliveryClient()
    ready(client)
    client.send(transaction(size=10, body="8BITMIME"))
    assert client.data_to_send() == b"MAIL FROM:<s@x.test> SIZE=10 BODY=8BITMIME\r\n"
    client = DeliveryClient(lmtp=False)
    ready(client, [b"220 mx\r\n", b"250 mx\r\n"])
    client.send(transaction(size=10, body="8BITMIME"))
    assert client.data_to_send() == b"MAIL FROM:<s@x.test>\r\n"
    client = DeliveryClient(lmtp=False)
    ready(client, [b"220 mx\r\n", b"250 mx\r\n"])
    client.send(transaction(sender="jörg@x.test", smtputf8=True))
    assert client.next_event() == Done((NO_SMTPUTF8,) * 3) and client.data_to_send() == b""


@pytest.mark.parametrize("chunk", [None, 1])
def test_pipelining_sends_mail_rcpts_and_data_at_once(chunk):
    client = DeliveryClient(ehlo_name="mx.test")
    ready(client, [b"220 slave.test LMTP\r\n", LHLO_PIPELINING])
    client.send(transaction(size=len(MESSAGE)))
    assert client.data_to_send() == (
        b"MAIL FROM:<s@x.test> SIZE=78\r\nRCPT TO:<a@a.test>\r\nRCPT TO:<nobody@a.test>\r\n"
        b"RCPT TO:<b@a.test>\r\nDATA\r\n"
    )
    a_ok, b_ok = b"250 2.0.0 <a@a.test> Saved\r\n", b"250 2.0.0 <b@a.test> Saved\r\n"
    sent, events = converse(client, [OK, OK, UNKNOWN, OK, b"354 go\r\n", a_ok, b_ok], chunk)
    assert sent == [b"", b"", b"", b"", MESSAGE.replace(b"\n.hidden", b"\n..hidden") + b".\r\n", b"", b""]
    saved = [Reply(250, "2.0.0", f"<{who}@a.test> Saved") for who in "ab"]
    assert events == [SendBody(), Done((saved[0], R_UNKNOWN, saved[1]))]
    client.send(transaction(recipients=("a@a.test",)))  # the session takes the next one
    assert client.data_to_send().count(b"\r\n") == 3


def test_pipelined_refusals_read_every_reply_then_reset():
    client = DeliveryClient()
    ready(client, [b"220 x\r\n", LHLO_PIPELINING])
    client.send(transaction(recipients=("a@a.test", "b@a.test")))
    assert client.data_to_send().endswith(b"DATA\r\n")
    later, no_mail = Reply(451, "4.3.0", "Try later"), b"503 5.5.1 MAIL needed first\r\n"
    sent, events = converse(client, [b"451 4.3.0 Try later\r\n", no_mail, no_mail, no_mail, OK])
    assert sent == [b"", b"", b"", b"RSET\r\n", b""] and events == [Done((later, later))]
    client.send(transaction(recipients=("nobody@a.test",)))  # no recipient taken: DATA refused
    assert client.data_to_send().endswith(b"DATA\r\n")
    sent, events = converse(client, [OK, UNKNOWN, b"554 5.5.1 No valid recipients\r\n", OK])
    assert sent[-2:] == [b"RSET\r\n", b""] and events == [Done((R_UNKNOWN,))]
    client.send(transaction(recipients=("nobody@a.test",)))  # a server taking DATA anyway is broken
    assert client.data_to_send().endswith(b"DATA\r\n")
    sent, events = converse(client, [OK, UNKNOWN, b"354 go\r\n"])
    assert events == [Failed("server took DATA with no recipient", Reply(354, "", "go"))]
    assert sent[-1].endswith(b"QUIT\r\n") and client.results == [R_UNKNOWN]


def test_a_recipient_check_is_not_pipelined():
    client = DeliveryClient()
    ready(client, [b"220 x\r\n", LHLO_PIPELINING])
    client.send(transaction(recipients=("nobody@a.test",), verify=True))
    assert client.data_to_send() == b"MAIL FROM:<s@x.test>\r\n"
    sent, events = converse(client, [OK, UNKNOWN, OK])
    assert sent == [b"RCPT TO:<nobody@a.test>\r\n", b"RSET\r\n", b""] and events == [Done((R_UNKNOWN,))]


def test_smtp_delivery_applies_one_reply_to_every_accepted_recipient():
    client = DeliveryClient(lmtp=False, ehlo_name="mx.test")
    sent, _ = converse(client, [b"220 mx ESMTP\r\n", b"250-mx\r\n250 SMTPUTF8\r\n"])
    assert sent[0] == b"EHLO mx.test\r\n"
    client.send(transaction(smtputf8=True))
    assert client.data_to_send() == b"MAIL FROM:<s@x.test> SMTPUTF8\r\n"
    queued = b"250 2.0.0 Ok: queued as 4Xy\r\n"
    sent, events = converse(client, [OK, OK, UNKNOWN, OK, b"354 go\r\n", queued])
    assert sent[0].startswith(b"RCPT") and client.data_to_send() == b""
    assert events[-1] == Done(
        (Reply(250, "2.0.0", "Ok: queued as 4Xy"), R_UNKNOWN, Reply(250, "2.0.0", "Ok: queued as 4Xy"))
    )


def test_verification_is_rcpt_then_rset_and_the_session_goes_on():
    client = DeliveryClient()
    ready(client)
    client.send(transaction(recipients=("a@a.test", "nobody@a.test"), verify=True))
    assert client.data_to_send() == b"MAIL FROM:<s@x.test>\r\n"
    sent, events = converse(client, [OK, OK, UNKNOWN, OK])
    assert sent == [b"RCPT TO:<a@a.test>\r\n", b"RCPT TO:<nobody@a.test>\r\n", b"RSET\r\n", b""]
    assert events == [Done((R, R_UNKNOWN))]
    client.send(transaction(recipients=("nobody@a.test",)))  # none accepted: RSET, no DATA
    sent, events = converse(client, [OK, UNKNOWN, OK])
    assert sent[-2:] == [b"RSET\r\n", b""] and events == [Done((R_UNKNOWN,))]


def test_refused_sender_and_refused_data():
    client = DeliveryClient()
    ready(client)
    client.send(transaction())
    _, events = converse(client, [b"451 4.3.0 Try later\r\n"])
    assert events == [Done((Reply(451, "4.3.0", "Try later"),) * 3)]
    client.send(transaction(recipients=("a@a.test", "nobody@a.test")))
    sent, events = converse(client, [OK, OK, UNKNOWN, b"554 5.5.1 No thanks\r\n", OK])
    assert sent[-2:] == [b"RSET\r\n", b""] and events == [Done((Reply(554, "5.5.1", "No thanks"), R_UNKNOWN))]


def test_starttls_xclient_then_xforward():
    client = DeliveryClient(
        lmtp=False,
        xclient=Xclient("192.0.2.7", 40000, helo="client.test"),
        xforward=Xforward("2001:db8::7", 40000, name="[UNAVAILABLE]", helo="c l", proto="ESMTP"),
    )
    ehlo = b"250-mx\r\n250-STARTTLS\r\n250-XCLIENT ADDR PORT HELO\r\n250 XFORWARD NAME ADDR PORT PROTO HELO\r\n"
    sent, events = converse(client, [b"220 mx\r\n", ehlo, b"220 go\r\n", ehlo, b"220 mx again\r\n", ehlo, OK])
    assert sent == [
        b"EHLO localhost\r\n",
        b"STARTTLS\r\n",
        b"EHLO localhost\r\n",
        b"XCLIENT ADDR=192.0.2.7 PORT=40000 HELO=client.test\r\n",
        b"EHLO localhost\r\n",
        b"XFORWARD NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::7 PORT=40000 PROTO=ESMTP HELO=c+20l\r\n",
        b"",
    ]
    assert events == [StartTls(), Ready()] and client.tls_active


@pytest.mark.parametrize(
    ("options", "script", "failure"),
    [
        ({}, [b"554 5.3.2 go away\r\n"], Failed("greeting", Reply(554, "5.3.2", "go away"))),
        ({}, [b"220 x\r\n", b"500 5.5.1 no\r\n"], Failed("LHLO", Reply(500, "5.5.1", "no"))),
        ({"require_tls": True}, [b"220 x\r\n", LHLO], Failed("server offers no STARTTLS")),
        (
            {},
            [b"220 x\r\n", b"250-x\r\n250 STARTTLS\r\n", b"454 4.7.0 no\r\n"],
            Failed("STARTTLS", Reply(454, "4.7.0", "no")),
        ),
        (
            {"xclient": Xclient("192.0.2.7")},
            [b"220 x\r\n", b"250-x\r\n250 XCLIENT ADDR\r\n", b"550 5.7.0 insufficient authorization\r\n"],
            Failed("XCLIENT", Reply(550, "5.7.0", "insufficient authorization")),
        ),
    ],
)
def test_session_failures_queue_quit(options, script, failure):
    sent, events = converse(DeliveryClient(**options), script)
    assert events == [failure] and sent[-1].endswith(b"QUIT\r\n")


def test_a_server_going_away_answers_what_is_open():
    client = DeliveryClient()
    ready(client)
    client.send(transaction())
    _, events = converse(client, [OK, OK, b"421 4.3.2 Shutting down\r\n"])
    down = Reply(421, "4.3.2", "Shutting down")
    assert events == [Done((down, down, down)), Failed("server closing", down)]  # accepted is not delivered
    assert client.data_to_send() == b""  # the server closes; no QUIT


def test_end_of_stream_mid_transaction_keeps_the_known_results():
    client = DeliveryClient()
    ready(client)
    client.send(transaction(recipients=("a@a.test", "b@a.test")))
    converse(client, [OK, OK, OK, b"354 go\r\n", b"250 2.0.0 <a@a.test> Saved\r\n"])
    client.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        client.next_event()
    assert info.value.close
    assert client.results == [Reply(250, "2.0.0", "<a@a.test> Saved"), None]  # b: not known, a: never again


def test_idle_close_is_closed_and_bad_input_is_an_error():
    client = DeliveryClient()
    ready(client)
    client.receive_data(b"")
    assert client.next_event() == Closed()
    for script in [[b"+OK POP3\r\n"], [b"220 x\r\n", b"250-x\r\n" * 65], [b"220 " + b"x" * 1000 + b"\r\n"]]:
        with pytest.raises(ProtocolError):
            converse(DeliveryClient(), script)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Transaction("s@x.test", ()),
        lambda: Transaction("s@x.test", ("",)),
        lambda: Transaction("s@x.test\r\nRSET", ("a@a.test",)),
        lambda: Transaction("s@x.test", ("a@a.test>\r\nDATA",)),
        lambda: Transaction("s@x.test", ("a@a.test",), body="BINARYMIME"),
        lambda: DeliveryClient(ehlo_name="a b"),
    ],
)
def test_nothing_unsendable_is_accepted(bad):
    with pytest.raises(ValueError):
        bad()


def test_calls_out_of_turn_raise():
    client = DeliveryClient()
    for call in (lambda: client.send(transaction()), client.quit, client.end_body, client.tls_started):
        with pytest.raises(RuntimeError):
            call()


# --- the round trip through MxServer -------------------------------------------------------------


def relay(body_chunks: list[bytes], server_chunk: int) -> bytes:
    """Delivers a message of `body_chunks` from DeliveryClient (SMTP) to MxServer; returns what
    the server handed out."""
    server, client, got = MxServer(hostname="mx.test", max_size=10**6), DeliveryClient(lmtp=False), bytearray()
    for _ in range(200):
        data = server.data_to_send()
        client.receive_data(data)
        while (event := client.next_event()) is not None:
            if isinstance(event, Ready):
                client.send(Transaction("s@x.test", ("a@a.test",)))
            elif isinstance(event, SendBody):
                for chunk in body_chunks:
                    client.body(chunk)
                client.end_body()
            elif isinstance(event, Done):
                assert event.results[0].code == 250
                return bytes(got)
        data = client.data_to_send()
        for i in range(0, len(data), server_chunk):
            server.receive_data(data[i : i + server_chunk])
            while (event := server.next_event()) is not None:
                if isinstance(event, DataChunk):
                    got += event.data
                elif isinstance(event, MailFrom | RcptTo | DataEnd):
                    server.accept()
    raise AssertionError("the pair did not settle")


body_lines = st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=12)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([b"", b".", b"..", b"x", b".x", b"\x00", b"\xff"]) | st.binary(max_size=8), max_size=12),
    st.lists(st.integers(0, 200), max_size=6),
    st.sampled_from([1, 3, 4096]),
)
def test_dot_stuffing_round_trip(lines, cuts, server_chunk):
    lines = [line.replace(b"\r", b"").replace(b"\n", b"") for line in lines]
    body = b"".join(line + b"\r\n" for line in lines)
    points = sorted({min(cut, len(body)) for cut in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert relay(chunks, server_chunk) == body


def test_a_body_without_its_last_crlf_gets_one():
    assert relay([b"no end"], 4096) == b"no end\r\n"
    assert relay([b"a\r\n.", b"b"], 1) == b"a\r\n.b\r\n"


# --- against a real Dovecot LMTP and a real Postfix -----------------------------------------------


def deliver(
    client: DeliveryClient, address: tuple[str, int], transactions: list[Transaction], message=MESSAGE, context=None
) -> list:
    """Drives `client` over a blocking socket through `transactions`, then QUIT; returns the events."""  # fmt: skip
    events, todo = [], list(transactions)
    with socket.create_connection(address, timeout=10) as sock:
        stream = sock
        while True:
            event = client.next_event()
            if event is not None:
                events.append(event)
            if isinstance(event, StartTls):
                stream.sendall(client.data_to_send())
                stream = context.wrap_socket(sock, server_hostname=address[0])
                client.tls_started()
            elif isinstance(event, Ready | Done):
                client.send(todo.pop(0)) if todo else client.quit()
            elif isinstance(event, SendBody):
                client.body(message)
                client.end_body()
            if data := client.data_to_send():
                stream.sendall(data)
            if isinstance(event, Failed | Closed):
                return events
            if event is None:
                client.receive_data(stream.recv(65536))


def wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
def test_delivery_and_verification_at_dovecot_lmtp_and_xclient_through_postfix(tmp_path):
    from helpers import mailkit

    users = {"alice@a.test": "pw", "bob@a.test": "pw"}
    with (
        mailkit.dovecot(tmp_path / "a", users) as dovecot,
        mailkit.postfix(tmp_path / "mx", dovecot, ["a.test"], xclient=True) as postfix,
    ):
        lmtp = (dovecot.host, dovecot.ports["lmtp"])
        message = Transaction("sender@x.test", ("alice@a.test", "nobody@a.test"), size=len(MESSAGE))
        check = Transaction("sender@x.test", ("bob@a.test", "ghost@a.test"), verify=True)
        client = DeliveryClient(ehlo_name="mx.test")
        events = deliver(client, lmtp, [message, check], context=dovecot.client_context())
        done = [event for event in events if isinstance(event, Done)]
        assert [[reply.code for reply in event.results] for event in done] == [[250, 550], [250, 550]]
        assert done[0].results[1].enhanced == "5.1.1" and events[-1] == Closed()
        (stored,) = dovecot.mailbox("alice@a.test")
        assert stored.endswith(MESSAGE.replace(b"\r\n", b"\n"))  # unstuffed again, nothing changed
        assert dovecot.mailbox("bob@a.test") == []  # verification delivers nothing

        client = DeliveryClient(lmtp=False, ehlo_name="mx.test", xclient=Xclient("192.0.2.7", 40000, helo="c.test"))
        events = deliver(client, (postfix.host, postfix.port), [Transaction("sender@x.test", ("bob@a.test",))])
        (done,) = [event for event in events if isinstance(event, Done)]
        assert done.results[0].code == 250 and "queued" in done.results[0].text
        assert wait_for(lambda: len(dovecot.mailbox("bob@a.test")) == 1)
        assert b"192.0.2.7" in dovecot.mailbox("bob@a.test")[0]  # Postfix's Received header names the client
