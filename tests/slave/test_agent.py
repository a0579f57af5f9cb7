"""The slave agent over real files, commands and sockets, with a real ClusterState. Time is
trio's MockClock where the agent only waits; it jumps ahead only after the program has been
idle for a moment of real time, because files are read in worker threads (an autojump at
zero would run the clock far ahead while a thread reads)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from meshmail.config import EndpointConfig, SlaveSection, SourceConfig, loads
from meshmail.core.clock import wall_ms
from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.metrics import Metrics
from meshmail.replication import Replication
from meshmail.security.admission import remove_node
from meshmail.slave.agent import (
    PUBLISH_DELAY,
    REPUBLISH_INTERVAL,
    SlaveAgent,
    SourceError,
)
from meshmail.slave.health import GREETINGS, judge
from meshmail.state.hlc import Timestamp
from meshmail.state.lww import Entry, encode_entries
from meshmail.state.records import DomainRoute, Redemption
from meshmail.state.replica import ClusterState

SETTINGS = SlaveSection(poll_interval=1.0, settle=2.0, command_interval=30.0, probe_interval=5.0, probe_timeout=2.0)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """pytest-trio runs a test with the clock of any fixture that returns one."""
    return trio.testing.MockClock(autojump_threshold=0.02)


@pytest.fixture
def replication(tmp_path):
    with ClusterState.open(tmp_path / "state", "s1", wall_ms, fsync=False) as state:
        replication = Replication(state, wall_ms)
        replication.synced.set()  # as if synced with a peer: the agent publishes from the start
        yield replication


def member(name: str, state: State = State.ALIVE) -> MemberInfo:
    return MemberInfo(name, "192.0.2.1", 7946, b"", 1, state, 0.0)


def agent_for(replication, *sources: SourceConfig, endpoints=None, on_health=lambda: None, members=None) -> SlaveAgent:
    settings = SlaveSection(sources=sources, **{k: getattr(SETTINGS, k) for k in (
        "poll_interval", "settle", "command_interval", "probe_interval", "probe_timeout")})  # fmt: skip
    members = {"s1": member("s1")} if members is None else members
    return SlaveAgent("s1", settings, endpoints or {}, replication, members, Metrics(), on_health)


def published(replication) -> set[str]:
    return {domain for domain, route in replication.state.domains("s1") if route == DomainRoute("s1", "slave")}


def file_source(path: Path, kind: str = "directadmin", name: str | None = None) -> SourceConfig:
    return SourceConfig(kind, name or kind, paths={"path": str(path)})


def replace(path: Path, text: str) -> None:
    """Rewrite a file atomically, as careful tools do (temporary file, rename)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def run_agent(nursery, agent: SlaveAgent) -> None:
    await agent.load()
    await agent.publish()
    for loop in agent.loops:
        nursery.start_soon(loop)


async def test_sources_are_published_and_follow_file_edits(replication, tmp_path, clock):
    domains = tmp_path / "domains"
    domains.write_text("# DirectAdmin\nexample.com\nOld.Example\nbücher.example\n")
    static = SourceConfig("static", "static", domains=("static.example", "example.com"))
    agent = agent_for(replication, file_source(domains), static)
    async with trio.open_nursery() as nursery:
        await run_agent(nursery, agent)
        assert published(replication) == {"example.com", "old.example", "xn--bcher-kva.example", "static.example"}
        by_domain = {d["domain"]: d for d in agent.document()["domains"]}
        assert by_domain["example.com"]["sources"] == ["directadmin", "static"]
        assert by_domain["example.com"]["status"] == "published"

        replace(domains, "example.com\nnew.example\nbücher.example\n")
        start = trio.current_time()
        with trio.fail_after(60):
            while "new.example" not in published(replication):
                await trio.sleep(0.25)
        # Seen at the next poll (1 s), read once unchanged for settle (2 s) at a poll (1 s),
        # published after PUBLISH_DELAY; one more poll of slack for a slow worker thread.
        bound = SETTINGS.poll_interval * 3 + SETTINGS.settle + PUBLISH_DELAY + 0.25
        assert trio.current_time() - start <= bound
        assert "old.example" not in published(replication)
        nursery.cancel_scope.cancel()


async def test_a_file_rewritten_slowly_in_place_never_loses_a_domain(replication, tmp_path, clock):
    """A writer truncates the file and writes it back in pieces 1.5 s apart (under `settle`):
    at no moment is a domain unpublished, and the finished file is then published."""
    path = tmp_path / "domains"
    names = [f"d{i}.example" for i in range(40)]
    path.write_text("".join(f"{name}\n" for name in names))
    agent = agent_for(replication, file_source(path))
    async with trio.open_nursery() as nursery:
        await run_agent(nursery, agent)
        assert published(replication) == set(names)
        lowest = len(names)

        async def watch() -> None:
            nonlocal lowest
            while True:
                lowest = min(lowest, len(published(replication) & set(names)))
                await trio.sleep(0.1)

        nursery.start_soon(watch)
        final = "".join(f"{name}\n" for name in [*names, "late.example"])
        with open(path, "r+") as file:
            file.truncate(0)
            file.flush()
            for start in range(0, len(final), 37):  # pieces that cut names in the middle
                await trio.sleep(1.5)
                file.write(final[start : start + 37])
                file.flush()
        with trio.fail_after(60):
            while "late.example" not in published(replication):
                await trio.sleep(0.25)
        assert lowest == len(names), "a domain was unpublished while the file was being written"
        assert not any(name.startswith("d") and name not in names for name in published(replication))
        nursery.cancel_scope.cancel()


async def test_a_source_that_breaks_later_keeps_its_last_good_list(replication, tmp_path, clock):
    path = tmp_path / "domains"
    path.write_text("a.example\nb.example\n")
    agent = agent_for(replication, file_source(path))
    async with trio.open_nursery() as nursery:
        await run_agent(nursery, agent)
        [source] = agent.sources
        wait = SETTINGS.poll_interval * 3 + SETTINGS.settle
        breakages = {
            "emptied": lambda: path.write_text("# nothing here\n"),
            "left half-written": lambda: path.write_text("a.example\nb.exa"),
            "deleted": lambda: path.unlink(),
            "a folder now": lambda: (path.unlink(), path.mkdir()),
            "a FIFO now": lambda: (path.unlink(), os.mkfifo(path)),  # a read must not block on it
        }
        for what, breakage in breakages.items():
            breakage()
            await trio.sleep(wait)
            assert source.status == "stale", what
            assert published(replication) == {"a.example", "b.example"}, what
            if path.is_dir():
                path.rmdir()
            elif not path.is_file():
                path.unlink(missing_ok=True)
            path.write_text("a.example\nb.example\n")
            await trio.sleep(wait)
            assert source.status == "ok", what
        failures = {"source": source.name}
        assert agent.metrics.registry.get_sample_value("meshmail_slave_source_failures_total", failures) >= 5
        path.write_text("b.example\n")
        await trio.sleep(SETTINGS.poll_interval * 3 + SETTINGS.settle)
        assert source.status == "ok" and published(replication) == {"b.example"}
        nursery.cancel_scope.cancel()


async def test_a_source_missing_at_start_is_an_error(replication, tmp_path):
    agent = agent_for(replication, file_source(tmp_path / "absent", name="da"))
    with pytest.raises(SourceError, match=r"^slave source da: .*absent does not exist$"):
        await agent.load()


async def test_command_sources(replication, tmp_path, clock):
    listing = tmp_path / "plesk-output"
    listing.write_text("shop.example\nBLOG.example\n")
    plesk = SourceConfig("plesk", "plesk", command=("cat", str(listing)))
    agent = agent_for(replication, plesk)
    async with trio.open_nursery() as nursery:
        await run_agent(nursery, agent)
        assert published(replication) == {"shop.example", "blog.example"}
        listing.unlink()  # the command now fails: the last good list stays
        await trio.sleep(SETTINGS.command_interval + 1)
        [source] = agent.sources
        assert source.status == "stale" and "exited with status 1" in source.detail
        assert published(replication) == {"shop.example", "blog.example"}
        listing.write_text("shop.example\n")
        await trio.sleep(SETTINGS.command_interval + 1)
        assert published(replication) == {"shop.example"}
        nursery.cancel_scope.cancel()
    failing = agent_for(replication, SourceConfig("plesk", "plesk", command=("false",)))
    with pytest.raises(SourceError, match="`false` exited with status 1"):
        await failing.load()


async def test_postconf_output_and_the_files_it_names(replication, tmp_path):
    table = tmp_path / "vmail_domains"
    table.write_text("# postmap source\nmail.example   OK\nother.example  OK\n")
    script = f"print('direct.example, hash:{table}')"
    postfix = SourceConfig("postfix", "postfix", command=(sys.executable, "-c", script))
    agent = agent_for(replication, postfix)
    await agent.load()
    await agent.publish()
    assert published(replication) == {"direct.example", "mail.example", "other.example"}


async def test_cpanel_files(replication, tmp_path):
    (tmp_path / "userdomains").write_text("shop.example: shop\nremote.example: bob\n*: nobody\n")
    (tmp_path / "localdomains").write_text("host.example\nshop.example\n")
    (tmp_path / "remotedomains").write_text("remote.example\n")
    paths = {name: str(tmp_path / name) for name in ("userdomains", "localdomains", "remotedomains")}
    agent = agent_for(replication, SourceConfig("cpanel", "cpanel", paths=paths))
    await agent.load()
    await agent.publish()
    # remote.example gets its mail elsewhere (remote MX): not hosted here.
    assert published(replication) == {"shop.example", "host.example"}


async def test_a_cpanel_file_emptied_is_judged_on_its_own(replication, tmp_path, clock):
    """userdomains half-written (empty) while localdomains still lists a domain: the union is
    not empty, but that file had domains and lists none now, so the last good list stays."""
    (tmp_path / "userdomains").write_text("shop.example: shop\nblog.example: ann\n*: nobody\n")
    (tmp_path / "localdomains").write_text("host.example\n")
    paths = {name: str(tmp_path / name) for name in ("userdomains", "localdomains", "remotedomains")}
    agent = agent_for(replication, SourceConfig("cpanel", "cpanel", paths=paths))
    async with trio.open_nursery() as nursery:
        await run_agent(nursery, agent)
        [source] = agent.sources
        assert published(replication) == {"shop.example", "blog.example", "host.example"}
        (tmp_path / "userdomains").write_text("")
        await trio.sleep(SETTINGS.poll_interval * 3 + SETTINGS.settle + PUBLISH_DELAY)
        assert source.status == "stale" and "userdomains lists no domain now (it had 2)" in source.detail
        assert published(replication) == {"shop.example", "blog.example", "host.example"}
        (tmp_path / "userdomains").write_text("shop.example: shop\n")
        await trio.sleep(SETTINGS.poll_interval * 3 + SETTINGS.settle + PUBLISH_DELAY)
        assert source.status == "ok" and published(replication) == {"shop.example", "host.example"}
        nursery.cancel_scope.cancel()


def route_of(domain: str, slave: str, ms: int) -> bytes:
    """A route written by `slave` at `ms`, as a batch from a peer."""
    return encode_entries([Entry(f"domain/{domain}", DomainRoute(slave, "slave"), Timestamp(ms, 0, slave))])


async def test_a_domain_an_admin_routes_is_left_alone_and_not_claimed(replication):
    state = replication.state
    replication.assign_domain("admin.example", "s9", source="admin")
    agent = agent_for(replication, SourceConfig("static", "static", domains=("admin.example",)))
    await agent.load()
    assert await agent.publish() == 0
    assert state.domain("admin.example") == DomainRoute("s9", "admin") and list(state.claims()) == []
    assert agent.document()["domains"][0]["status"] == "routed to s9 by an admin"


@pytest.mark.parametrize("holder", [State.ALIVE, State.SUSPECT, State.DEAD, "admitted"])
async def test_a_domain_another_slave_routes_stays_there_and_is_claimed(replication, holder):
    """The last writer does not route: s2 (alive, suspect, dead, or unknown here but admitted by
    a master) keeps theirs.example; s1's listing of it is a claim, shown as a conflict, written
    once, and dropped when s1 stops listing the domain."""
    state = replication.state
    members = {"s1": member("s1")}
    if holder == "admitted":
        replication.put("redeemed", "0123456789abcdef/" + "0" * 32 + "/m1", Redemption("s2", "slave", "m1", 1))
    else:
        members["s2"] = member("s2", holder)
    state.apply(route_of("theirs.example", "s2", wall_ms() - 1000))
    static = SourceConfig("static", "static", domains=("theirs.example", "own.example"))
    agent = agent_for(replication, static, members=members)
    await agent.load()
    assert await agent.publish() == 2  # own.example's route and theirs.example's claim
    assert state.domain("theirs.example") == DomainRoute("s2", "slave")
    assert state.domain("own.example") == DomainRoute("s1", "slave")
    assert state.conflicts() == [("theirs.example", "s2", ["s1"])]
    assert await agent.publish() == 0 and await agent.publish(rescan=True) == 0
    statuses = {d["domain"]: d["status"] for d in agent.document()["domains"]}
    assert statuses == {"own.example": "published", "theirs.example": "conflict: routed to s2"}
    agent.sources[0].domains = frozenset({"own.example"})
    assert await agent.publish() == 1
    assert state.conflicts() == [] and list(state.claims()) == []


@pytest.mark.parametrize("gone", ["left", "removed", "unknown"])
async def test_a_domain_of_a_slave_that_is_gone_is_taken_over(replication, gone):
    """s2 routes shared.example and s1 claims it; once s2 leaves, is removed (remove_node
    unpublishes its routes) or was never known at all, s1 routes it and drops its claim."""
    state = replication.state
    members = {"s1": member("s1"), "s2": member("s2")}
    state.apply(route_of("shared.example", "s2", wall_ms() - 1000))
    state.assign_domain("admin.example", "s2", source="admin")
    static = SourceConfig("static", "static", domains=("shared.example", "admin.example"))
    agent = agent_for(replication, static, members=members)
    await agent.load()
    assert await agent.publish() == 1 and state.conflicts() == [("shared.example", "s2", ["s1"])]
    if gone == "left":
        members["s2"] = member("s2", State.LEFT)
    elif gone == "removed":
        assert remove_node(replication, "s2", by="admin", now_ms=wall_ms())
        assert state.domain("shared.example") is None  # s2's own publication is gone
    else:
        del members["s2"]
    assert await agent.publish() == 2  # the route, and the claim dropped
    assert state.domain("shared.example") == DomainRoute("s1", "slave")
    assert state.domain("admin.example") == DomainRoute("s2", "admin")  # an admin's decision stays
    assert state.conflicts() == [] and list(state.claims()) == []


async def test_nothing_is_published_before_the_first_sync(tmp_path, clock):
    """Until the node has synced with a peer its map may lack the cluster's routes: an
    empty map must not make the agent take every listed domain."""
    with ClusterState.open(tmp_path / "state", "s1", wall_ms, fsync=False) as state:
        replication = Replication(state, wall_ms)
        agent = agent_for(replication, SourceConfig("static", "static", domains=("a.example",)))
        async with trio.open_nursery() as nursery:
            await agent.load()
            nursery.start_soon(agent.keep_published)
            agent.poke()
            await trio.sleep(3 * REPUBLISH_INTERVAL)
            assert state.domain("a.example") is None
            replication.synced.set()
            await trio.sleep(PUBLISH_DELAY + 0.1)
            assert state.domain("a.example") == DomainRoute("s1", "slave")
            nursery.cancel_scope.cancel()


async def serve_greeting(greeting: bytes, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(greeting)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_health_probes_mark_services_down_and_up(replication, clock):
    """Real sockets: a service that stops answering is marked down within two probe
    intervals (here at the next probe); one that greets wrongly is down."""
    changes = []
    async with trio.open_nursery() as nursery:
        imap_scope = trio.CancelScope()

        async def imap_server(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with imap_scope:
                await serve_greeting(b"* OK IMAP ready\r\n", task_status=task_status)

        imap_port = await nursery.start(imap_server)
        pop3_port = await nursery.start(serve_greeting, b"-ERR not today\r\n")
        endpoints = {
            "imap": EndpointConfig(f"127.0.0.1:{imap_port}"),
            "pop3": EndpointConfig(f"127.0.0.1:{pop3_port}"),
            "lmtp": EndpointConfig("127.0.0.1:1", probe=False),  # never probed, always up
        }
        settings = SlaveSection(probe_interval=5.0, probe_timeout=2.0)
        agent = SlaveAgent(
            "s1", settings, endpoints, replication, {}, Metrics(), lambda: changes.append(dict(agent.health))
        )
        nursery.start_soon(agent.probe_services)
        with trio.fail_after(10):
            while not changes:
                await trio.sleep(0.05)
        assert agent.up("imap") and not agent.up("pop3") and agent.up("lmtp")
        assert "not +OK" in agent.health["pop3"].detail
        imap_scope.cancel()
        stopped = trio.current_time()
        with trio.fail_after(60):
            while agent.up("imap"):
                await trio.sleep(0.05)
        assert trio.current_time() - stopped <= 2 * settings.probe_interval
        assert "cannot connect" in agent.health["imap"].detail
        nursery.cancel_scope.cancel()


def test_slave_config(tmp_path):
    text = f"""
[node]
name = "s1"
role = "slave"
data_dir = "{tmp_path}"
[gossip]
bind = "127.0.0.1:0"
cluster = "c"
keys = ["{"A" * 43}="]
[endpoints]
imap = {{ address = "127.0.0.1:143", transport = "starttls", client_address = "id" }}
lmtp = "127.0.0.1:24"
[slave]
settle = 0
[[slave.sources]]
type = "cpanel"
[[slave.sources]]
type = "postfix"
[[slave.sources]]
type = "static"
name = "extra"
domains = ["a.example"]
"""
    config = loads(text)
    cpanel, postfix, static = config.slave.sources
    assert cpanel.paths == {
        "userdomains": "/etc/userdomains", "localdomains": "/etc/localdomains", "remotedomains": "/etc/remotedomains"
    }  # fmt: skip
    assert postfix.command == ("postconf", "-xh", "virtual_mailbox_domains")
    assert (static.name, static.domains) == ("extra", ("a.example",))
    imap = config.node_meta.endpoints["imap"]
    assert (imap.address, imap.transport, imap.client_address, imap.up) == ("127.0.0.1:143", "starttls", "id", True)
    assert config.endpoints["lmtp"].probe is True


@given(service=st.sampled_from([*GREETINGS, "http"]), greeting=st.binary(max_size=300))
def test_judging_any_greeting_never_raises(service, greeting):
    health = judge(service, greeting)
    assert isinstance(health.up, bool) and "\n" not in health.detail and len(health.detail) < 200


@pytest.mark.parametrize(
    ("service", "greeting", "up"),
    [
        ("imap", b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n", True),
        ("imap", b"* PREAUTH ready\r\n", True),
        ("imap", b"* BYE too many connections\r\n", False),
        ("pop3", b"+OK Dovecot ready.\r\n", True),
        ("pop3", b"-ERR [SYS/TEMP] busy\r\n", False),
        ("lmtp", b"220 host Dovecot LMTP ready\r\n", True),
        ("smtp", b"421 4.3.2 shutting down\r\n", False),
        ("submission", b"", False),
        ("http", b"", True),
    ],
)
def test_judge(service, greeting, up):
    assert judge(service, greeting).up is up


async def test_the_publish_log_counts_every_domain_routed_here(replication, caplog):
    for domain in ("a.example", "b.example"):  # routed here before this start
        replication.assign_domain(domain, "s1", source="slave")
    names = ("a.example", "b.example", "c.example", "d.example", "e.example", "f.example")
    agent = agent_for(replication, SourceConfig("static", "static", domains=names))
    await agent.load()
    with caplog.at_level(logging.INFO, logger="meshmail.slave"):
        await agent.publish(rescan=True)
    [line] = [r.getMessage() for r in caplog.records if "route here" in r.getMessage()]
    assert line.startswith("6 domain(s) route here (4 written now, 0 unpublished)")


async def test_the_map_comparison_and_the_file_polls_run_off_the_loop(replication, tmp_path, monkeypatch, clock):
    """publish() looks the listed domains up in the map, and the poll stats the files, in
    worker threads; the routes written are the same."""
    path = tmp_path / "domains"
    path.write_text("a.example\nb.example\n")
    agent = agent_for(replication, file_source(path))
    await agent.load()
    threads: dict[str, set[int]] = {"domain": set(), "stat": set()}
    state, real_domain, real_stat = replication.state, replication.state.domain, os.stat

    def domain(name):
        threads["domain"].add(threading.get_ident())
        return real_domain(name)

    def stat_(path, *args, **kwargs):
        threads["stat"].add(threading.get_ident())
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(state, "domain", domain)
    assert await agent.publish(rescan=True) == 2
    assert published(replication) == {"a.example", "b.example"}
    monkeypatch.setattr(os, "stat", stat_)
    with trio.move_on_after(SETTINGS.poll_interval * 1.5):
        await agent.watch_files()
    monkeypatch.undo()
    assert threads["domain"] and threading.get_ident() not in threads["domain"]
    assert threads["stat"] and threading.get_ident() not in threads["stat"]
