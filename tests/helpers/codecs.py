"""A fuzz session driver shared by the tests of the pre-login codecs (meshmail/protocols)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshmail.protocols.common import (
    Closed,
    Credentials,
    LineCodec,
    ProtocolError,
    StartTls,
)


def fuzz_session(
    codec: LineCodec,
    data: bytes,
    chunk: int,
    *,
    check_output: Callable[[bytes], None],
    cap: int,
    password: str,
    answer: Callable[[Any, object], None] | None = None,
) -> None:
    """Feed `data` to a server codec `chunk` bytes at a time, answering logins in turn with
    accept, reject and unavailable, and every event with `answer(codec, event)` when given:
    only ProtocolError may be raised, every reply passes `check_output`, the buffer stays
    within `cap` + 1, and `password` appears nowhere."""
    decisions = iter(["accept", "reject", "unavailable"] * 100)
    try:
        for i in range(0, len(data) + 1, chunk):
            codec.receive_data(data[i : i + chunk])
            while (event := codec.next_event()) is not None:
                assert password not in repr(event)
                if isinstance(event, StartTls):
                    codec.tls_started()
                elif answer is not None:
                    answer(codec, event)
                decide = next(decisions) if isinstance(event, Credentials) else None
                if decide:
                    getattr(codec, decide)()
                check_output(codec.data_to_send())
                if isinstance(event, Closed) or decide == "accept":
                    return  # the rest is trailing data for the backend
            assert codec.buffered <= cap + 1
            check_output(codec.data_to_send())
    except ProtocolError as exc:
        assert exc.close and "\n" not in str(exc)
        check_output(exc.reply)
        assert password.encode() not in exc.reply and password not in str(exc)
