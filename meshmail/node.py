"""One meshmail node: a loaded Config wired to gossip, the replicated state and the services
of its role.

`serve` runs what a `meshmail run` process runs, under one nursery, until the node leaves
(SIGTERM, SIGINT or POST /leave) or is cancelled. The services themselves live in their
own packages (web, slave, and the proxies and MX to come); ROLE_SERVICES lists them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import trio

from .config import Config
from .core.address import Address, AddressError, format_address
from .core.clock import wall_ms
from .core.errors import MeshmailError
from .gossip.keyring import Keyring
from .gossip.member import MemberEvent
from .gossip.memberlist import Memberlist
from .gossip.messages import State
from .gossip.transport import NetTransport
from .metrics import Metrics
from .mta import service as mta_service
from .proxy import service as proxy_service
from .replication import Replication
from .routing import Router
from .security import accounts, admission, ca, files, keyring_sync
from .services import Bound, Context, Service, supervise
from .slave import service as slave_service
from .slave.agent import check_sources
from .state.journal import JournalError
from .state.replica import ClusterState
from .web import server as web_server
from .web.server import HTTP_GRACE

log = logging.getLogger("meshmail.node")

#: How long a graceful leave waits for the "left" broadcast to go out.
LEAVE_TIMEOUT = 5.0
#: How long services may take to finish once the node has left, before they are cancelled.
STOP_GRACE = HTTP_GRACE + 1.0
#: Seeds are retried with a delay doubling from the first to the second value (seconds).
JOIN_RETRY = (0.5, 5.0)
#: How often a running node checks whether it was removed from the cluster.
REMOVAL_POLL = 1.0
#: In the data dir: written when this node learns it was removed; `run` then refuses it.
REMOVED_MARKER = "removed"


class NodeError(MeshmailError):
    """A node that cannot start (an address in use...); str() is one line for people."""


#: The services each role runs, in start order, after gossip. A new service is a package
#: with a `serve(ctx, *, task_status)` and one entry here.
ROLE_SERVICES: dict[str, tuple[Service, ...]] = {
    "master": (
        Service("http", web_server.serve),
        Service("proxy", proxy_service.serve),
        Service("mx", mta_service.serve),
    ),
    "slave": (Service("slave", slave_service.serve), Service("http", web_server.serve)),
}


def node_meta(ctx: Context) -> bytes:
    """This node's gossiped metadata: the config's, its endpoints' health, its key ids, its
    API and shadow store addresses and whether it is draining (leaving, sessions still ending)."""
    meta = ctx.config.node_meta
    endpoints = {s: attrs.evolve(e, up=ctx.endpoint_health.get(s, True)) for s, e in meta.endpoints.items()}
    api = "" if ctx.api_address is None else format_address(ctx.api_address)
    keys = keyring_sync.ids(ctx.keyring)
    shadow = "" if ctx.shadow_address is None else format_address(ctx.shadow_address)
    return attrs.evolve(
        meta, endpoints=endpoints, api=api, keys=keys, shadow=shadow, draining=bool(ctx.drains) and ctx.leaving
    ).encode()


def follow_state(ctx: Context) -> None:
    """Apply the replicated records that steer this node now and whenever they change:
    removed members are refused, the keyring follows rotations (saved to the data dir)."""

    def refuse_removed() -> None:
        for name in admission.removed(ctx.state):
            if name == ctx.name:
                log.error("this node was removed from the cluster (meshmail remove); its gossip is refused")
            elif name not in ctx.members.refused:
                log.info("refusing removed node %s", name)
                ctx.members.refuse(name)

    def sync_keyring() -> None:
        if keyring_sync.reconcile(ctx.keyring, ctx.state):
            files.save_keyring(Path(ctx.config.node.data_dir), ctx.keyring.keys)
            log.info("gossip keyring is now %s (primary first)", ", ".join(keyring_sync.ids(ctx.keyring)))
            if ctx.members.running:
                ctx.meta_changed()

    ctx.replication.watch(["removed"], refuse_removed)
    ctx.replication.watch(["gossipkey"], sync_keyring)
    refuse_removed()
    sync_keyring()


def ensure_api_token(ctx: Context) -> None:
    """Make sure DATA_DIR/api-token holds a valid API token for this node's CLI."""
    data_dir = Path(ctx.config.node.data_dir)
    current = files.read_api_token(data_dir)
    if current and accounts.api_token_account(ctx.state, current) is not None:
        return
    token = accounts.create_api_token(ctx.replication, f"node:{ctx.name}", "the meshmail CLI on this node", wall_ms())
    files.write_file(data_dir / files.API_TOKEN, (token.encode() + "\n").encode())


def open_state(config: Config) -> ClusterState:
    """The node's replicated state from `data_dir/state`; raises NodeError if it cannot be used."""
    directory = Path(config.node.data_dir) / files.STATE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return ClusterState.open(directory, config.node.name, wall_ms)
    except (JournalError, OSError) as exc:
        raise NodeError(f"cannot open the cluster state in {directory}: {exc}") from None


def load_keys(config: Config) -> list[bytes]:
    """The gossip keys: DATA_DIR/keyring.json (kept current as keys rotate) or the config's."""
    try:
        keys = files.load_keyring(Path(config.node.data_dir))
    except files.FilesError as exc:
        raise NodeError(str(exc)) from None
    keys = keys or list(config.gossip.keys)
    if not keys:
        raise NodeError(
            f"no gossip keys: {config.path} has no [gossip] keys and {config.node.data_dir} no {files.KEYRING}"
            " (meshmail init or join make one)"
        )
    return keys


def load_authority(config: Config) -> ca.Authority | None:
    """The cluster CA of the [tls] section (with its key if the section names one)."""
    tls = config.tls
    if tls is None:
        return None
    try:
        cert = ca.load_cert(files.read_file(Path(tls.ca)))
        key = ca.load_key(files.read_file(Path(tls.ca_key))) if tls.ca_key else None
        for path in (tls.cert, tls.key):
            files.read_file(Path(path))
    except (files.FilesError, ca.CertificateError) as exc:
        raise NodeError(f"[tls]: {exc}") from None
    return ca.Authority(cert, key)


def new_memberlist(config: Config, delegate: Replication | None = None) -> Memberlist:
    """The gossip node described by `config` (not started)."""
    gossip = config.gossip
    return Memberlist(
        delegate=delegate,
        name=config.node.name,
        transport=NetTransport(*gossip.bind),
        keyring=Keyring(load_keys(config)),
        cluster=gossip.cluster,
        config=gossip.settings,
        meta=config.node_meta.encode(),
        advertise=gossip.advertise,
        wall_clock=time.time,
    )


async def serve(
    config: Config, *, leave_on_signals: bool = False, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a node: gossip, then the services of its role, then join the seeds in the background.

    Reports where it listens through task_status ({"gossip": ..., "http": ..., and each
    service's listeners}). Returns after a graceful leave, asked for by POST /leave or, with
    `leave_on_signals`, by SIGTERM or SIGINT (a second signal stops at once). Raises
    NodeError when an address cannot be bound or a service cannot start.
    """
    state = await trio.to_thread.run_sync(open_state, config)
    with contextlib.closing(state):
        await _serve(config, state, leave_on_signals, task_status)


def new_context(config: Config, state: ClusterState) -> Context:
    """The node's Context: replication over `state`, its memberlist and router (not started)."""
    replication = Replication(state, wall_ms)
    memberlist = new_memberlist(config, replication)
    replication.attach(memberlist)
    router = Router(state, memberlist.member)
    metrics = Metrics(gossip=memberlist.counters, state=replication.counters)
    ctx = Context(config, replication, memberlist, router, load_authority(config), metrics=metrics)
    ctx.meta_changed = lambda: memberlist.update_meta(node_meta(ctx))
    return ctx


async def _serve(config: Config, state: ClusterState, leave_on_signals: bool, task_status) -> None:
    ctx = new_context(config, state)
    refuse_if_removed(ctx)
    try:
        follow_state(ctx)
        ensure_api_token(ctx)
    except files.FilesError as exc:
        raise NodeError(str(exc)) from None
    ctx.meta_changed()
    events = ctx.members.subscribe()
    with contextlib.closing(ctx):
        async with trio.open_nursery() as nursery:
            with _start_errors("gossip", config.gossip.bind):
                bound = {"gossip": Address(*await nursery.start(ctx.members.run))}
            nursery.start_soon(_log_events, events)
            nursery.start_soon(ctx.replication.maintain)
            nursery.start_soon(ctx.stall.run)
            async with trio.open_nursery() as services:
                for service in ROLE_SERVICES[config.node.role]:
                    with _start_errors(service.name):
                        bound.update(await services.start(supervise, service, ctx, _count_restart(ctx)))
                if "http" in bound:
                    ctx.api_address = api_address(config, bound["http"], ctx.members.address)
                if "shadow" in bound:
                    ctx.shadow_address = reachable(bound["shadow"], ctx.members.address)
                ctx.meta_changed()
                if leave_on_signals:
                    await nursery.start(_leave_on_signals, ctx, nursery.cancel_scope)
                joined = trio.Event()
                peers = Path(config.node.data_dir) / PEERS_FILE
                seeds = [*config.gossip.seeds, *remembered_peers(peers)]
                nursery.start_soon(join_seeds, ctx.members, list(dict.fromkeys(seeds)), joined)
                nursery.start_soon(remember_peers, ctx.members, peers)
                nursery.start_soon(watch_removal, ctx, joined)
                shown = ", ".join(f"{name} on {format_address(address)}" for name, address in bound.items())
                log.info("node %s (%s) in cluster %s: %s", ctx.name, ctx.role, config.gossip.cluster, shown)
                task_status.started(bound)
                await ctx.stopping.wait()
                await drain(ctx)
                log.info("leaving the cluster")
                await ctx.members.leave(timeout=LEAVE_TIMEOUT)
                services.cancel_scope.deadline = trio.current_time() + STOP_GRACE
            nursery.cancel_scope.cancel()
    log.info("node %s stopped", config.node.name)


async def drain(ctx: Context) -> None:
    """Tell the cluster this node is draining (its metadata) and wait until every service
    that ends client sessions gracefully has done so."""
    if not ctx.drains:
        return
    ctx.meta_changed()
    log.info("draining before leaving the cluster")
    for drained in ctx.drains:
        await drained.wait()


def removed_message(name: str) -> str:
    return (
        f"node {name} was removed from the cluster (meshmail remove): it cannot run again; to bring this"
        " server back, join it with a new token, a new name and a new data dir"
    )


def preflight(config: Config) -> None:
    """Refuse what `run` refuses, before anything starts (`run --check` too): a node that was
    removed from the cluster, a slave source that cannot be read. Raises MeshmailError."""
    if (Path(config.node.data_dir) / REMOVED_MARKER).exists():
        raise NodeError(removed_message(config.node.name))
    if config.node.role == "slave":
        trio.run(check_sources, config.slave)


def refuse_if_removed(ctx: Context) -> None:
    """Raise NodeError when this node's data dir or state says it was removed."""
    if (Path(ctx.config.node.data_dir) / REMOVED_MARKER).exists() or ctx.removed:
        raise NodeError(removed_message(ctx.name))


async def watch_removal(ctx: Context, joined: trio.Event) -> None:
    """Wait until this node learns it was removed, and remember it in the data dir. Told so
    while still joining (its seeds refuse it), it stops with NodeError; told later, it stays
    up to say so (/status "removed": true) and refuses every write."""
    while not ctx.removed:
        await trio.sleep(REMOVAL_POLL)
    try:
        files.write_file(Path(ctx.config.node.data_dir) / REMOVED_MARKER, b"removed from the cluster\n", 0o644)
    except files.FilesError as exc:
        log.error("%s", exc)
    if not joined.is_set():
        raise NodeError(removed_message(ctx.name))
    log.error("%s; it refuses writes until it is stopped", removed_message(ctx.name))


def _count_restart(ctx: Context):
    def count(name: str) -> None:
        ctx.metrics.service_restarts.labels(service=name).inc()

    return count


@contextlib.contextmanager
def _start_errors(what: str, address: Address | None = None) -> Iterator[None]:
    """Turn a failure to start `what` (bare or in exception groups) into NodeError: an
    OSError while binding, or an expected failure such as an unreadable slave source."""
    try:
        yield
    except (OSError, MeshmailError, BaseExceptionGroup) as exc:
        leaf = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, MeshmailError):
            raise NodeError(str(leaf)) from None
        if not isinstance(leaf, OSError) or address is None:
            raise
        reason = leaf.strerror or str(leaf)
        raise NodeError(f"cannot listen for {what} on {format_address(address)}: {reason}") from None


def api_address(config: Config, bound: Address, gossip: Address) -> Address:
    """Where other nodes reach the HTTP API: [http] advertise, else where it is bound."""
    if config.http.advertise is not None:
        return config.http.advertise
    return reachable(bound, gossip)


def reachable(bound: Address, gossip: Address) -> Address:
    """Where other nodes reach a listener bound at `bound`: that address, with the gossip
    address's host when bound to all interfaces."""
    bound = Address(*bound)
    return Address(gossip[0], bound.port) if bound.unspecified else bound


async def _log_events(events: trio.MemoryReceiveChannel[MemberEvent]) -> None:
    async with events:
        async for event in events:
            member = event.member
            log.info(
                "member %s %s (incarnation %d) at %s",
                member.name,
                event.kind.value,
                member.incarnation,
                format_address((member.host, member.port)),
            )


#: The gossip addresses of the members a node last saw alive, in its data dir: on a restart it
#: joins through them besides its seeds, so a master whose config names no seed (the first of
#: a cluster) is not left alone after a crash until some other node happens to reach it.
PEERS_FILE = "peers"
#: How often the file is brought up to date (only written when it changed), and how many
#: addresses it keeps.
PEERS_INTERVAL = 5.0
PEERS_KEPT = 16


def remembered_peers(path: Path) -> list[Address]:
    """The addresses in `path` (none when it is missing or unreadable: it is only a hint)."""
    try:
        text = files.read_file(path, 64 * 1024).decode("utf-8", "replace")
    except files.FilesError:
        return []
    found = []
    for line in text.splitlines()[:PEERS_KEPT]:
        try:
            found.append(Address.parse(line.strip()))
        except AddressError:
            log.warning("%s: skipped %r, not an address", path, line[:80])
    return found


async def remember_peers(memberlist: Memberlist, path: Path) -> None:
    """Keep `path` listing the alive members other than this node (see PEERS_FILE)."""
    written: list[str] | None = None
    while True:
        alive = sorted(
            format_address((m.host, m.port))
            for m in memberlist.members()
            if m.state == State.ALIVE and m.name != memberlist.name
        )[:PEERS_KEPT]
        if alive and alive != written:
            text = "".join(f"{address}\n" for address in alive).encode()
            try:
                await trio.to_thread.run_sync(files.write_file, path, text)
                written = alive
            except files.FilesError as exc:
                log.warning("%s", exc)
        await trio.sleep(PEERS_INTERVAL)


async def join_seeds(memberlist: Memberlist, seeds: Iterable[Address], joined: trio.Event | None = None) -> None:
    """Join through the seeds, retrying until one answers or someone joins through us,
    so that the nodes of a cluster can start in any order; then set `joined`."""
    seeds = [seed for seed in seeds if seed != memberlist.address]
    delay, longest = JOIN_RETRY
    while seeds:
        answered = await memberlist.join(seeds)
        if answered:
            log.info("joined the cluster through %d of %d seed(s)", answered, len(seeds))
            break
        if any(m.state == State.ALIVE and m.name != memberlist.name for m in memberlist.members()):
            log.info("joined the cluster (a member reached us first)")
            break
        if delay == JOIN_RETRY[0]:
            shown = ", ".join(format_address(seed) for seed in seeds)
            log.warning("no seed answered (%s); retrying in the background", shown)
        await trio.sleep(delay)
        delay = min(delay * 2, longest)
    if joined is not None:
        joined.set()


async def _leave_on_signals(ctx: Context, scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    if threading.current_thread() is not threading.main_thread():
        task_status.started()
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if ctx.leaving:
                log.warning("%s again: stopping without waiting for the leave", name)
                scope.cancel()
                return
            log.info("%s: leaving gracefully (send it again to stop at once)", name)
            ctx.request_leave()
