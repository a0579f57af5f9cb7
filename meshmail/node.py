"""One meshmail node: a loaded Config wired to the gossip layer and the HTTP server.

`serve` runs what a `meshmail run` process runs, under one nursery, until the node leaves
(SIGTERM, SIGINT or POST /leave) or is cancelled. Role services (proxy, MX, store) join
this wiring in later steps; the protocol logic itself lives in their own packages.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .config import Config
from .core.address import Address, format_address
from .core.clock import wall_ms
from .core.errors import MeshmailError
from .gossip.keyring import Keyring
from .gossip.member import MemberEvent
from .gossip.memberlist import Memberlist
from .gossip.messages import State
from .gossip.transport import NetTransport
from .metrics import Metrics
from .replication import Replication
from .security import accounts, admission, ca, files, keyring_sync
from .slave.agent import SlaveAgent, SourceError
from .state.journal import JournalError
from .state.replica import ClusterState
from .web import create_app

log = logging.getLogger("meshmail.node")

#: How long a graceful leave waits for the "left" broadcast to go out.
LEAVE_TIMEOUT = 5.0
#: How long in-flight HTTP requests may take to finish once the node is leaving.
HTTP_GRACE = 2.0
#: Pause before the HTTP server starts again after it failed.
HTTP_RESTART_DELAY = 0.5
#: Seeds are retried with a delay doubling from the first to the second value (seconds).
JOIN_RETRY = (0.5, 5.0)


class NodeError(MeshmailError):
    """A node that cannot start (an address in use...); str() is one line for people."""


@attrs.frozen
class Bound:
    """Where a started node listens."""

    gossip: Address
    http: Address


@attrs.define(eq=False)
class Node:
    """What the HTTP app sees of a running node."""

    config: Config
    memberlist: Memberlist
    replication: Replication
    metrics: Metrics
    #: The cluster CA (with its key on masters that hold it); None without a [tls] section.
    authority: ca.Authority | None = None
    #: Where other nodes reach this node's HTTP API (set once it listens).
    api_address: Address | None = None
    #: The slave agent (domain sources, health probes) of a slave; None on a master.
    agent: SlaveAgent | None = None
    _leave: trio.Event = attrs.field(factory=trio.Event)

    @property
    def data_dir(self) -> Path:
        return Path(self.config.node.data_dir)

    @property
    def keyring(self) -> Keyring:
        return self.memberlist.keyring

    @property
    def removed(self) -> bool:
        """Whether this node was removed from the cluster (a member told it, or it read so)."""
        return self.memberlist.removed or self.replication.state.get("removed", self.config.node.name) is not None

    @property
    def cluster_id(self) -> str | None:
        """The first 16 hex digits of the CA's fingerprint: unique to a cluster made by init."""
        return None if self.authority is None else self.authority.fingerprint.hex()[:16]

    def meta(self) -> bytes:
        """This node's gossiped metadata: the config's, its key ids and its API address."""
        api = "" if self.api_address is None else format_address(self.api_address)
        meta = self.config.node_meta
        if self.agent is not None:
            endpoints = {s: attrs.evolve(e, up=self.agent.up(s)) for s, e in meta.endpoints.items()}
            meta = attrs.evolve(meta, endpoints=endpoints)
        return attrs.evolve(meta, api=api, keys=keyring_sync.ids(self.keyring)).encode()

    def health_changed(self) -> None:
        """Tell the cluster at once that a probed service went up or down."""
        self.memberlist.update_meta(self.meta())

    def follow_state(self) -> None:
        """Apply the replicated records that steer this node now and whenever they change:
        removed members are refused, the keyring follows rotations (saved to the data dir)."""
        self.replication.watch(["removed"], self._refuse_removed)
        self.replication.watch(["gossipkey"], self._sync_keyring)
        self._refuse_removed()
        self._sync_keyring()

    def _refuse_removed(self) -> None:
        for name in admission.removed(self.replication.state):
            if name == self.config.node.name:
                log.error("this node was removed from the cluster (meshmail remove); its gossip is refused")
            elif name not in self.memberlist.refused:
                log.info("refusing removed node %s", name)
                self.memberlist.refuse(name)

    def _sync_keyring(self) -> None:
        if keyring_sync.reconcile(self.keyring, self.replication.state):
            files.save_keyring(self.data_dir, self.keyring.keys)
            log.info("gossip keyring is now %s (primary first)", ", ".join(keyring_sync.ids(self.keyring)))
            if self.memberlist.running:
                self.memberlist.update_meta(self.meta())

    def ensure_api_token(self) -> None:
        """Make sure DATA_DIR/api-token holds a valid API token for this node's CLI."""
        state = self.replication.state
        current = files.read_api_token(self.data_dir)
        if current and accounts.api_token_account(state, current) is not None:
            return
        token = accounts.create_api_token(
            self.replication, f"node:{self.config.node.name}", "the meshmail CLI on this node", wall_ms()
        )
        files.write_file(self.data_dir / files.API_TOKEN, (token.encode() + "\n").encode())

    def request_leave(self) -> None:
        """Ask `serve` to leave the cluster gracefully and stop; returns at once."""
        self._leave.set()

    @property
    def leaving(self) -> bool:
        return self._leave.is_set()

    async def wait_until_leaving(self) -> None:
        await self._leave.wait()

    async def join(self, seeds: Iterable[Address]) -> int:
        """Push-pull with each seed; the number that answered."""
        return await self.memberlist.join(list(seeds))


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
    """Run a node: gossip, then HTTP, then join the seeds in the background.

    Reports a `Bound` through task_status once both listen. Returns after a graceful
    leave, asked for by POST /leave or, with `leave_on_signals`, by SIGTERM or SIGINT (a
    second signal stops at once). Raises NodeError when an address cannot be bound.
    """
    state = await trio.to_thread.run_sync(open_state, config)
    with contextlib.closing(state):
        await _serve(config, state, leave_on_signals, task_status)


async def _serve(config: Config, state: ClusterState, leave_on_signals: bool, task_status) -> None:
    replication = Replication(state, wall_ms)
    memberlist = new_memberlist(config, replication)
    replication.attach(memberlist)
    metrics = Metrics(gossip=memberlist.counters, state=replication.counters)
    node = Node(config, memberlist, replication, metrics, authority=load_authority(config))
    try:
        node.follow_state()
        node.ensure_api_token()
    except files.FilesError as exc:
        raise NodeError(str(exc)) from None
    if config.node.role == "slave":
        node.agent = SlaveAgent(
            config.node.name, config.slave, config.endpoints, replication, metrics, node.health_changed
        )
        replication.watch(["domain", "removed"], node.agent.poke)
        try:
            await node.agent.load()
        except SourceError as exc:
            raise NodeError(str(exc)) from None
    memberlist.update_meta(node.meta())
    events = memberlist.subscribe()
    async with trio.open_nursery() as nursery:
        with _bind_errors("gossip", config.gossip.bind):
            await nursery.start(memberlist.run)
        nursery.start_soon(_log_events, events)
        http_stop, http_done = trio.Event(), trio.Event()
        with _bind_errors("http", config.http.bind):
            http = await nursery.start(_serve_http, create_app(node), config, http_stop, http_done, metrics)
        node.api_address = api_address(config, http, memberlist.address)
        memberlist.update_meta(node.meta())
        if leave_on_signals:
            await nursery.start(_leave_on_signals, node, nursery.cancel_scope)
        nursery.start_soon(join_seeds, memberlist, config.gossip.seeds)
        nursery.start_soon(replication.maintain)
        if node.agent is not None:
            node.agent.publish()
            for loop in node.agent.loops:
                nursery.start_soon(loop)
        bound = Bound(gossip=memberlist.address, http=http)
        log.info(
            "node %s (%s) in cluster %s: gossip on %s, http on %s",
            config.node.name,
            config.node.role,
            config.gossip.cluster,
            format_address(bound.gossip),
            format_address(bound.http),
        )
        task_status.started(bound)

        await node.wait_until_leaving()
        log.info("leaving the cluster")
        await memberlist.leave(timeout=LEAVE_TIMEOUT)
        http_stop.set()
        with trio.move_on_after(HTTP_GRACE + 1):
            await http_done.wait()
        nursery.cancel_scope.cancel()
    log.info("node %s stopped", config.node.name)


@contextlib.contextmanager
def _bind_errors(what: str, address: Address) -> Iterator[None]:
    """Turn an OSError while binding `what` (bare or in exception groups) into NodeError."""
    try:
        yield
    except (OSError, BaseExceptionGroup) as exc:
        leaf = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if not isinstance(leaf, OSError):
            raise
        reason = leaf.strerror or str(leaf)
        raise NodeError(f"cannot listen for {what} on {format_address(address)}: {reason}") from None


def api_address(config: Config, bound: Address, gossip: Address) -> Address:
    """Where other nodes reach the HTTP API: [http] advertise, else the bound address, with
    the gossip address's host when bound to all interfaces."""
    if config.http.advertise is not None:
        return config.http.advertise
    host, port = bound
    try:
        if ipaddress.ip_address(host).is_unspecified:
            host = gossip[0]
    except ValueError:
        pass
    return host, port


async def _serve_http(
    app, config: Config, stop: trio.Event, done: trio.Event, metrics: Metrics, *, task_status: trio.TaskStatus[Address]
) -> None:
    """Serve the HTTP API until `stop`. If the server fails (a bug in a connection's
    handling escaping it), that is logged and counted and the server starts again on the
    same address: the HTTP side of a node never takes its gossip down with it."""
    settings = HypercornConfig()
    settings.bind = [format_address(config.http.bind)]
    if config.tls is not None:
        # Client certificates are optional: joining servers have none yet; nodes present theirs.
        settings.certfile, settings.keyfile, settings.ca_certs = config.tls.cert, config.tls.key, config.tls.ca
        settings.verify_mode = ssl.CERT_OPTIONAL
    # HTTP/1.1 only: an admin API needs nothing more, and hypercorn 0.18's HTTP/2 lets a
    # request body sent after an early answer raise out of the server (KeyError in h2.py).
    settings.alpn_protocols = ["http/1.1"]
    settings.accesslog = None
    settings.errorlog = logging.getLogger("meshmail.http")
    settings.graceful_timeout = HTTP_GRACE
    started = False
    try:
        while not stop.is_set():
            try:
                async with trio.open_nursery() as nursery:
                    urls = await nursery.start(partial(hypercorn_serve, app, settings, shutdown_trigger=stop.wait))
                    if not started:
                        url = urlsplit(urls[0])
                        settings.bind = [format_address((url.hostname, url.port))]  # the same port on a restart
                        task_status.started((url.hostname, url.port))
                        started = True
            except Exception:
                if not started:
                    raise
                metrics.http_server_restarts.inc()
                log.exception("the HTTP server failed; starting it again")
                await trio.sleep(HTTP_RESTART_DELAY)
    finally:
        done.set()


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


async def join_seeds(memberlist: Memberlist, seeds: Iterable[Address]) -> None:
    """Join through the seeds, retrying until one answers or someone joins through us,
    so that the nodes of a cluster can start in any order."""
    seeds = [seed for seed in seeds if seed != memberlist.address]
    delay, longest = JOIN_RETRY
    while seeds:
        joined = await memberlist.join(seeds)
        if joined:
            log.info("joined the cluster through %d of %d seed(s)", joined, len(seeds))
            return
        if any(m.state == State.ALIVE and m.name != memberlist.name for m in memberlist.members()):
            log.info("joined the cluster (a member reached us first)")
            return
        if delay == JOIN_RETRY[0]:
            shown = ", ".join(format_address(seed) for seed in seeds)
            log.warning("no seed answered (%s); retrying in the background", shown)
        await trio.sleep(delay)
        delay = min(delay * 2, longest)


async def _leave_on_signals(node: Node, scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    if threading.current_thread() is not threading.main_thread():
        task_status.started()
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if node.leaving:
                log.warning("%s again: stopping without waiting for the leave", name)
                scope.cancel()
                return
            log.info("%s: leaving gracefully (send it again to stop at once)", name)
            node.request_leave()
