"""A fuzz session driver shared by the tests of the pre-login codecs (meshmail/protocols)."""

from __future__ import annotations

from collections.abc import Callable

from meshmail.protocols.common import (
    Closed,
    Credentials,
    LoginServer,
    ProtocolError,
    StartTls,
)


def fuzz_session(
    codec: LoginServer, data: bytes, chunk: int, *, check_output: Callable[[bytes], None], cap: int, password: str
) -> None:
    """Feed `data` to a server codec `chunk` bytes at a time, answering logins in turn with
    accept, reject and unavailable: only ProtocolError may be raised, every reply passes
    `check_output`, the buffer stays within `cap` + 1, and `password` appears nowhere."""
    server = type(codec)
    decisions = iter([server.accept, server.reject, server.unavailable] * 100)
    try:
        for i in range(0, len(data) + 1, chunk):
            codec.receive_data(data[i : i + chunk])
            while (event := codec.next_event()) is not None:
                assert password not in repr(event)
                if isinstance(event, StartTls):
                    codec.tls_started()
                decide = next(decisions) if isinstance(event, Credentials) else None
                if decide:
                    decide(codec)
                check_output(codec.data_to_send())
                if isinstance(event, Closed) or decide is server.accept:
                    return  # the rest is trailing data for the backend
            assert codec.buffered <= cap + 1
            check_output(codec.data_to_send())
    except ProtocolError as exc:
        assert exc.close and "\n" not in str(exc)
        check_output(exc.reply)
        assert password.encode() not in exc.reply and password not in str(exc)
