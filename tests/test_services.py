"""The service shape (meshmail.services): supervision, listeners bound once, a new service
added to a role by one entry, and `meshmail run --ready-file`."""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import time
import urllib.request

import pytest
import trio
from helpers.config import MESHMAIL, minimal_config

from meshmail import node
from meshmail.config import loads
from meshmail.core.address import Address
from meshmail.metrics import Metrics
from meshmail.node import serve
from meshmail.services import Context, ListenError, Service, supervise
from meshmail.web.server import AcceptShortage


class Crashing:
    """A service that reports started, then fails `failures` times before it runs for good."""

    def __init__(self, failures: int, *, before_start: bool = False) -> None:
        self.failures = failures
        self.before_start = before_start
        self.starts = 0

    async def serve(self, ctx, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.starts += 1
        if self.before_start:
            raise RuntimeError("cannot start")
        task_status.started({})
        if self.starts <= self.failures:
            raise RuntimeError(f"bug number {self.starts}")
        await ctx.stopping.wait()


def bare_context() -> Context:
    return Context(config=None, replication=None, members=None, router=None, authority=None, metrics=Metrics())


async def test_a_service_that_fails_after_its_start_is_restarted_and_counted(autojump_clock):
    ctx, service, restarts = bare_context(), Crashing(failures=3), []
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, Service("dummy", service.serve), ctx, restarts.append)
        await trio.sleep(10)
        assert service.starts == 4 and restarts == ["dummy"] * 3
        ctx.request_leave()
    assert service.starts == 4


async def test_a_service_that_cannot_start_stops_the_start(autojump_clock):
    service = Crashing(failures=0, before_start=True)
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, Service("dummy", service.serve), bare_context(), lambda name: None)
    leaves = []
    groups = [info.value]
    while groups:
        for exc in groups.pop().exceptions:
            (groups if isinstance(exc, BaseExceptionGroup) else leaves).append(exc)
    assert [str(exc) for exc in leaves] == ["cannot start"]
    assert service.starts == 1


async def test_listen_binds_once_per_name():
    ctx = bare_context()
    try:
        first = await ctx.listen("imap", Address("127.0.0.1", 0))
        again = await ctx.listen("imap", Address("127.0.0.1", 0))
        other = await ctx.listen("pop3", Address("127.0.0.1", 0))
        assert again is first and other is not first
        port = first.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen for smtp on 127.0.0.1:{port}"):
            await bare_context().listen("smtp", Address("127.0.0.1", port))
    finally:
        ctx.close()


async def test_a_new_service_is_one_entry_in_the_role_list(nursery, monkeypatch):
    """What a proxy service does: a package with serve(ctx) and one line in ROLE_SERVICES."""

    async def echo(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.SocketListener(await ctx.listen("echo", Address("127.0.0.1", 0)))
        task_status.started({"echo": Address(*listener.socket.getsockname()[:2])})

        async def one(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.send_all(f"{ctx.name}: ".encode() + await stream.receive_some(100))

        await trio.serve_listeners(one, [listener])

    roles = dict(node.ROLE_SERVICES, master=(*node.ROLE_SERVICES["master"], Service("echo", echo)))
    monkeypatch.setattr(node, "ROLE_SERVICES", roles)
    bound = await nursery.start(serve, loads(minimal_config("m1")))
    assert set(bound) == {"gossip", "http", "mx", "echo"}
    stream = await trio.open_tcp_stream(*bound["echo"])
    await stream.send_all(b"hello")
    assert await stream.receive_some(100) == b"m1: hello"


@pytest.mark.slow
def test_run_writes_the_ready_file_and_removes_it_when_it_stops(tmp_path):
    config = tmp_path / "m1.toml"
    config.write_text(minimal_config("m1"))
    ready = tmp_path / "ready.json"
    process = subprocess.Popen([*MESHMAIL, "run", "--config", str(config), "--ready-file", str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the node never became ready"
            time.sleep(0.05)
        bound = {name: Address.parse(text) for name, text in json.loads(ready.read_text()).items()}
        assert set(bound) == {"gossip", "http", "mx"} and all(address.port > 0 for address in bound.values())
        with urllib.request.urlopen(f"http://{bound['http']}/health", timeout=10) as response:
            assert response.status == 200
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    assert not ready.exists()


def test_run_raises_its_soft_open_files_limit_to_the_hard_one(tmp_path):
    config = tmp_path / "m1.toml"
    config.write_text(minimal_config("m1"))
    ready = tmp_path / "ready.json"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > 256, "this machine's hard limit leaves nothing to raise"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    process = subprocess.Popen(
        [*MESHMAIL, "run", "--config", str(config), "--ready-file", str(ready)], preexec_fn=low_soft_limit
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the node never became ready"
            time.sleep(0.05)
        http = json.loads(ready.read_text())["http"]
        with urllib.request.urlopen(f"http://{http}/status", timeout=10) as response:
            assert json.loads(response.read())["process"]["fd_limit"] == hard
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_the_http_accept_loop_says_once_a_minute_that_descriptors_ran_out():
    shortage = AcceptShortage(interval=60.0)

    def record(message: str) -> logging.LogRecord:
        error = OSError(24, "Too many open files")
        traceback = (OSError, error, None)
        return logging.LogRecord("trio.serve_listeners", logging.ERROR, __file__, 1, message, (), traceback)

    emfile = "accept returned EMFILE (Too many open files); retrying in 0.1 seconds"
    shown = [shortage.filter(record(emfile)) for _ in range(600)]
    assert shown == [True] + [False] * 599
    kept = record(emfile)
    shortage.last -= 61  # a minute later: one line again, counting what it hid, without a traceback
    assert shortage.filter(kept) and kept.exc_info is None and "599 more" in kept.getMessage()
    assert shortage.filter(record("something else"))
