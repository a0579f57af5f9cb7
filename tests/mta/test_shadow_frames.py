"""The shadow store's framing and requests under malformed input: any bytes give a frame, the
end of the stream or ShadowError, never another exception; a length past the limit is refused
before anything is read; requests that are not what the protocol says get an error answer."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmail.mta.shadow import Frames, ShadowError, _answer

LIMIT = 4096


async def read_all(data: bytes, limit: int = LIMIT) -> list[dict]:
    """Frames read from `data` (then the end of the stream) until the end or an error."""
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(data)
    await send.aclose()
    frames = Frames(receive, limit)
    found = []
    while (frame := await frames.read()) is not None:
        found.append(frame)
    return found


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("!I", len(body)) + body


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_frames_or_shadow_error(data):
    try:
        frames = trio.run(read_all, data)
    except ShadowError:
        return
    assert all(isinstance(f, dict) for f in frames)


def test_whole_frames_read_back_and_bad_ones_are_refused():
    assert trio.run(read_all, frame({"op": "taken"}) * 3) == [{"op": "taken"}] * 3
    for bad, why in [
        (struct.pack("!I", LIMIT + 1), "limit"),  # refused before a byte of the body arrives
        (frame([1, 2, 3]), "not a map"),
        (struct.pack("!I", 3) + b"\xc1\xc1\xc1", "not msgpack"),
        (frame({"op": "drop"})[:-1], "inside a frame"),
        (b"\x00\x00", "inside a frame"),
    ]:
        with pytest.raises(ShadowError, match=why):
            trio.run(read_all, bad)


class NoRunner:
    """Stands where the runner would be: a request that gets past the checks fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a malformed request reached runner.{name}")


@pytest.mark.parametrize(
    "request_",
    [
        {},
        {"op": "nonsense"},
        {"op": "store"},
        {"op": "store", "envelope": b"\x00garbage", "data": b"x"},
        {"op": "store", "envelope": "text", "data": b""},
        {"op": "drop"},
        {"op": "drop", "ids": "abc"},
        {"op": "drop", "ids": [1, 2]},
        {"op": "drop", "ids": ["a"] * 10_001},
        {"op": "copies"},
        {"op": "copies", "copies": "abc"},
        {"op": "copies", "copies": []},
        {"op": "copies", "copies": [[b"e", b"d"]] * 101},
    ],
)
def test_malformed_requests_get_an_error_answer(request_):
    answer = trio.run(_answer, NoRunner(), "m1", request_)
    assert set(answer) == {"error"}


@pytest.mark.parametrize(
    "copy",
    [None, b"x", [], [b"e"], [b"e", b"d", b"x"], ["text", b""], [b"\x00garbage", b"x"], [b"\x93\x01", 5]],
)
def test_each_malformed_copy_of_a_frame_gets_its_own_reason_and_none_reaches_the_runner(copy):
    answer = trio.run(_answer, NoRunner(), "m1", {"op": "copies", "copies": [copy, copy]})
    assert answer["ok"] is True
    assert len(answer["results"]) == 2 and all(isinstance(reason, str) and reason for reason in answer["results"])


def test_random_request_maps_never_raise():
    rng = random.Random(11)
    values = [None, 0, -1, "", "store", "drop", "taken", "copies", b"", b"\x93\x01", [], ["x"], [[b"a", 1]],
              {"a": 1}, 2**40]  # fmt: skip
    for _ in range(2000):
        request = {rng.choice(["op", "envelope", "data", "ids", "copies", "x"]): rng.choice(values) for _ in range(3)}
        ids = request.get("ids")
        if request.get("op") == "taken" or (request.get("op") == "drop" and isinstance(ids, list)
                                            and all(isinstance(i, str) for i in ids)):  # fmt: skip
            continue  # a well-formed request: it reaches the runner
        answer = trio.run(_answer, NoRunner(), "m1", request)
        # A frame of copies answers per copy: every one of these malformed ones with a reason.
        assert "error" in answer or all(isinstance(reason, str) for reason in answer["results"]), answer
