"""Splicing a logged-in client to its backend: bytes both ways, large reads, backpressure from
send_all (a slow reader slows its writer down, nothing piles up here), half-close passed on
where the stream allows it, and an idle timeout. Counts the bytes each way.
"""

from __future__ import annotations

import attrs
import trio

from .backend import READ_SIZE


@attrs.define(eq=False)
class Splice:
    """Bytes moved each way: `up` client -> backend, `down` backend -> client."""

    up: int = 0
    down: int = 0
    idled_out: bool = False
    _last: float = attrs.field(factory=trio.current_time)

    async def run(self, client: trio.abc.Stream, backend: trio.abc.Stream, idle: float) -> None:
        """Copy both ways until both sides have closed, either breaks, or nothing moved for
        `idle` seconds. A side that ends is passed on as a half-close when the other stream
        can send EOF (plain TCP); TLS cannot, so the session ends there."""
        async with trio.open_nursery() as nursery:
            done = [False, False]

            async def pump(source: trio.abc.Stream, sink: trio.abc.Stream, index: int) -> None:
                try:
                    while data := await source.receive_some(READ_SIZE):
                        self._last = trio.current_time()
                        await sink.send_all(data)
                        if index == 0:
                            self.up += len(data)
                        else:
                            self.down += len(data)
                    done[index] = True
                    if all(done) or not isinstance(sink, trio.abc.HalfCloseableStream):
                        nursery.cancel_scope.cancel()
                    else:
                        await sink.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, backend, 0)
            nursery.start_soon(pump, backend, client, 1)
            while True:
                await trio.sleep_until(self._last + idle)
                if trio.current_time() >= self._last + idle:
                    self.idled_out = True
                    nursery.cancel_scope.cancel()
                    return
