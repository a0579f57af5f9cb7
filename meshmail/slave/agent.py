"""The slave agent: keeps the cluster told which domains live here and whether this server's
mail services answer.

Sources. Each configured source (config.SourceConfig) yields a set of domains: files are
polled for changes (inode, size, mtime) and read only once they have stayed unchanged for
`settle` seconds, so a file being rewritten is never read half-written, and a changed file
whose last line has no newline is taken for one left half-written; commands (Plesk,
postconf) run every `command_interval`. A source that cannot be read at start is an error
(SourceError). One that breaks later (unreadable, failing, or empty where it had domains)
keeps its last good list and says why in `meshmail slave domains` and the log: a slave
never unpublishes its domains because a file was being rewritten.

Publishing. The union of the sources is published as routes to this slave with source
"slave", by these rules (the README's "Who routes a domain"). A domain routed by an admin is
left alone. One another slave routes stays with that slave while it is alive, suspect or
dead (it may be back): this slave writes a claim record instead, listed as a conflict until
an admin decides. A domain with no route, or routed to a slave that left, was removed or is
unknown (neither a member nor ever admitted), is taken over. A domain that left every
source is unpublished if it still routes here, and its claim is dropped.

Health. Every endpoint with `probe = true` is probed each `probe_interval` (health.probe);
a change of up/down goes out in the node's metadata at once.
"""

from __future__ import annotations

import logging
import operator
import os
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import trio

from ..config import EndpointConfig, SlaveSection, SourceConfig
from ..core.address import Address
from ..core.errors import MeshmailError
from ..gossip.member import MemberInfo
from ..gossip.messages import State
from ..metrics import Metrics
from ..replication import Replication
from ..security import admission
from ..state.journal import JournalError
from ..state.names import InvalidName, normalize_domain
from ..state.records import DomainRoute
from . import sources
from .health import Health, probe

log = logging.getLogger("meshmail.slave")

#: Largest source file or command output read (a cPanel server with 100,000 domains has a
#: userdomains of a few MB).
MAX_INPUT = 64 * 1024 * 1024
#: How long a command source may run.
COMMAND_TIMEOUT = 60.0
#: How often the published routes are checked against the sources even without a change
#: (an admin deleted one, a sync brought an older map...).
REPUBLISH_INTERVAL = 60.0
#: How long after a change the routes are checked, so that a burst makes one pass.
PUBLISH_DELAY = 1.0
#: How often publish() scans the whole map for the routes to this slave.
RESCAN_INTERVAL = 600.0
#: Problems kept per source for `meshmail slave domains`.
SHOWN_PROBLEMS = 20
#: Member states whose domains stay theirs: a dead slave may be back (a reboot, a partition).
_HOLDS = frozenset((State.ALIVE, State.SUSPECT, State.DEAD))


class SourceError(MeshmailError):
    """A source that cannot be used at start; str() is one line naming it."""


Signature = tuple[int, int, int] | None


class Reading(NamedTuple):
    """What reading a source gave: its domains, the problems of its lines, and how many
    domains each of its files listed (by path; a file emptied is judged on its own)."""

    domains: frozenset[str]
    problems: tuple[str, ...]
    listed: Mapping[str, int] = {}


@attrs.define(eq=False)
class Source:
    """One source and what the agent knows of it."""

    config: SourceConfig
    #: The last good list: what this source publishes.
    domains: frozenset[str] = frozenset()
    problems: tuple[str, ...] = ()
    #: "ok", or "stale" when the last good list is kept because the source broke.
    status: str = "ok"
    detail: str = ""
    read_at: float | None = None
    #: Domains each file listed in the last good reading.
    listed: Mapping[str, int] = attrs.Factory(dict)
    #: Files: the signatures last read, the ones seen last, and since when (trio time).
    applied: dict[str, Signature] = attrs.Factory(dict)
    seen: dict[str, Signature] = attrs.Factory(dict)
    changed_at: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def files(self) -> dict[str, str]:
        return dict(self.config.paths)

    @property
    def runs_command(self) -> bool:
        return bool(self.config.command)

    def document(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.config.type,
            "paths": self.files,
            "command": list(self.config.command),
            "status": self.status,
            "detail": self.detail,
            "domains": len(self.domains),
            "problems": list(self.problems[:SHOWN_PROBLEMS]),
            "read_at": self.read_at,
        }


class SlaveAgent:
    """Runs beside a slave node; see the module docstring.

    Args:
        name: this node's name (the slave routes point to).
        settings: the [slave] section.
        endpoints: the [endpoints] section (those with probe = true are probed).
        replication: the node's Replication (routes are written through it).
        members: node name -> MemberInfo as this node sees it (None when unknown), as the
            Router takes it: a mapping or a function.
        metrics: the node's Metrics (reads, failures and writes are counted there).
        on_health: called with no argument after any endpoint changed between up and down.
    """

    def __init__(
        self,
        name: str,
        settings: SlaveSection,
        endpoints: Mapping[str, EndpointConfig],
        replication: Replication,
        members: Callable[[str], MemberInfo | None] | Mapping[str, MemberInfo],
        metrics: Metrics,
        on_health: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.replication = replication
        self.sources = [Source(config) for config in settings.sources]
        self.health: dict[str, Health] = {}
        self._endpoints = endpoints
        self._on_health = on_health
        self._publish_now = trio.Event()
        self._member: Callable[[str], MemberInfo | None] = members.get if isinstance(members, Mapping) else members
        #: Domains routed to this slave by its own claim, and domains it claims, as far as it
        #: knows (see publish).
        self._routed_here: set[str] | None = None
        self._claimed_here: set[str] = set()
        #: One publish at a time: its plan, made in a worker thread, reads the sets above.
        self._publishing = trio.Lock()
        self.metrics = metrics

    # --- reading sources --------------------------------------------------------------

    async def load(self) -> None:
        """Read every source once; raises SourceError for one that cannot be read."""
        for source in self.sources:
            for path in source.files.values():
                source.seen[path] = source.applied[path] = _signature(path)
            try:
                reading = await read_source(source, strict=False)
            except SourceError as exc:
                raise SourceError(f"slave source {source.name}: {exc}") from None
            source.domains, source.problems, source.listed = reading
            source.read_at = time.time()
            self._log_problems(source)
            log.info("source %s: %d domain(s)", source.name, len(reading.domains))

    async def watch_files(self) -> None:
        """Poll the file sources; read one once its files have settled after a change."""
        watched = [source for source in self.sources if source.files and not source.runs_command]
        paths = sorted({path for source in watched for path in source.files.values()})
        while True:
            await trio.sleep(self.settings.poll_interval)
            found = await trio.to_thread.run_sync(_signatures, paths)
            now = trio.current_time()
            for source in watched:
                signatures = {path: found[path] for path in source.files.values()}
                if signatures != source.seen:
                    source.seen, source.changed_at = signatures, now
                    continue
                if signatures == source.applied or now - source.changed_at < self.settings.settle:
                    continue
                source.applied = signatures
                await self._refresh(source)

    async def run_commands(self) -> None:
        """Run the command sources every command_interval."""
        commands = [source for source in self.sources if source.runs_command]
        if not commands:
            return
        while True:
            await trio.sleep(self.settings.command_interval)
            for source in commands:
                await self._refresh(source)

    async def _refresh(self, source: Source) -> None:
        """Read a source again and keep the result, or keep the last good list."""
        try:
            domains, problems, listed = await read_source(source)
        except SourceError as exc:
            self._stale(source, str(exc))
            return
        emptied = [path for path, count in listed.items() if not count and source.listed.get(path)]
        if emptied:
            had = source.listed[emptied[0]]
            self._stale(source, f"{emptied[0]} lists no domain now (it had {had}): half-written? keeping the last list")
            return
        if not domains and source.domains:
            self._stale(source, f"it lists no domain now (it had {len(source.domains)}); keeping them")
            return
        changed = await trio.to_thread.run_sync(operator.ne, domains, source.domains)  # O(domains)
        if source.status != "ok":
            log.info("source %s reads again", source.name)
        source.domains, source.problems, source.listed = domains, problems, listed
        source.status, source.detail = "ok", ""
        source.read_at = time.time()
        self.metrics.source_reads.labels(source=source.name).inc()
        self._log_problems(source)
        if changed:
            log.info("source %s changed: %d domain(s)", source.name, len(domains))
            self._publish_now.set()

    def _stale(self, source: Source, why: str) -> None:
        if source.detail != why:
            log.warning("source %s: %s; its last good list (%d domains) stays published", source.name, why,
                        len(source.domains))  # fmt: skip
        source.status, source.detail = "stale", why
        self.metrics.source_failures.labels(source=source.name).inc()

    def _log_problems(self, source: Source) -> None:
        self.metrics.skipped_lines.labels(source=source.name).inc(len(source.problems))
        for problem in source.problems[:5]:
            log.warning("source %s: skipped %s", source.name, problem)
        if len(source.problems) > 5:
            log.warning("source %s: %d more lines skipped (meshmail slave domains)", source.name,
                        len(source.problems) - 5)  # fmt: skip

    # --- publishing ---------------------------------------------------------------------

    def wanted(self) -> dict[str, list[str]]:
        """domain -> the names of the sources that list it."""
        wanted: dict[str, list[str]] = {}
        for source in self.sources:
            for domain in source.domains:
                wanted.setdefault(domain, []).append(source.name)
        return wanted

    async def publish(self, *, rescan: bool = False) -> int:
        """Bring the routes and claims in line with the sources (see the module docstring);
        the number of routes and claims written.

        The domains routed here and claimed by this slave are found by a scan of the whole map
        on the first call and with `rescan` (keep_published does one every RESCAN_INTERVAL);
        in between, from what this agent wrote. Per listed domain it costs two dict lookups;
        members are looked up once per slave that routes something. That work, O(domains),
        runs in a worker thread (see _plan), the writes through Replication.publish_domains:
        the event loop never waits for either."""
        async with self._publishing:
            writes, claims, routed, claimed = await trio.to_thread.run_sync(self._plan, rescan)
            self._routed_here, self._claimed_here = routed, claimed
            if writes or claims:
                await self._write(writes, claims)
            return len(writes) + len(claims)

    def _plan(
        self, rescan: bool
    ) -> tuple[list[tuple[str, DomainRoute | None]], list[tuple[str, str, bool]], set[str], set[str]]:
        """The routes and claims to write, and the domains routed here and claimed before they
        are written (scanned anew on the first call and with `rescan`).

        Runs in a worker thread while the loop merges into the map: it reads the map only by
        key lookups and by entries_in(), which copies a bucket at a time, so a merge meanwhile
        is seen or not, never half; the sets of this agent are only changed under _publishing."""
        state = self.replication.state
        mine = DomainRoute(self.name, "slave")
        routed, claimed = self._routed_here, self._claimed_here
        if rescan or routed is None:
            prefix = "domain/"
            entries = state.map.entries_in()
            routed = {e.key[len(prefix) :] for e in entries if e.key.startswith(prefix) and e.value == mine}
            claimed = {domain for domain, _ in state.claims(self.name)}
        holds: dict[str, bool] = {}
        writes: list[tuple[str, DomainRoute | None]] = []
        claims: list[tuple[str, str, bool]] = []
        wanted = self.wanted()
        for domain in wanted:
            route = state.domain(domain)
            claim = False
            if route is None:
                writes.append((domain, mine))
            elif route != mine and route.source == "slave":
                held = holds.get(route.slave)
                if held is None:
                    held = holds[route.slave] = self._holds(route.slave)
                if held:
                    claim = True
                else:
                    writes.append((domain, mine))
            if claim != (domain in claimed):
                claims.append((domain, self.name, claim))
        for domain in routed:
            if domain not in wanted and state.domain(domain) == mine:
                writes.append((domain, None))
        claims += [(domain, self.name, False) for domain in claimed if domain not in wanted]
        return writes, claims, routed, claimed

    async def _write(self, writes: list[tuple[str, DomainRoute | None]], claims: list[tuple[str, str, bool]]) -> None:
        assert self._routed_here is not None
        await self.replication.publish_domains(writes, claims)
        for domain, route in writes:
            (self._routed_here.add if route is not None else self._routed_here.discard)(domain)
        for domain, _, claim in claims:
            (self._claimed_here.add if claim else self._claimed_here.discard)(domain)
        added = sum(1 for _, route in writes if route is not None)
        claimed = sum(1 for *_, claim in claims if claim)
        log.info("%d domain(s) route here (%d written now, %d unpublished); %d claim(s) on domains routed to other"
                 " slaves (%d new, %d dropped)", len(self._routed_here), added, len(writes) - added,
                 len(self._claimed_here), claimed, len(claims) - claimed)  # fmt: skip
        self.metrics.routes_written.inc(len(writes))

    def _holds(self, slave: str) -> bool:
        """Whether `slave` keeps the domains routed to it: it was not removed, and it is a
        member that did not leave, or a node some master admitted (this node may not have
        heard of it yet, or has forgotten it since it died)."""
        state = self.replication.state
        if state.get("removed", slave) is not None:
            return False
        member = self._member(slave)
        if member is not None:
            return member.state in _HOLDS
        return admission.admitted_role(state, slave) is not None

    def poke(self) -> None:
        """Publish soon: the routes, the removed nodes or the members changed (a domain
        unassigned, a slave that held a domain left or was removed...)."""
        self._publish_now.set()

    async def keep_published(self) -> None:
        """Publish once the node has synced with a peer (Replication.synced), then after every
        poke and every REPUBLISH_INTERVAL. Before that sync this node's map may lack routes
        the cluster holds, and a domain that looks unrouted would be taken from its slave."""
        await self.replication.synced.wait()
        last_scan = trio.current_time()
        rescan = False
        while True:
            try:
                await self.publish(rescan=rescan)
            except (OSError, JournalError) as exc:
                # The journal cannot be written (a full disk...): nothing was applied; the
                # next round tries again. The node stays up and keeps routing.
                self.metrics.publish_failures.inc()
                log.error("cannot publish the domains: %s; trying again in %g s", exc, REPUBLISH_INTERVAL)
            with trio.move_on_after(REPUBLISH_INTERVAL):
                await self._publish_now.wait()
                await trio.sleep(PUBLISH_DELAY)  # let a burst of changes settle into one pass
            self._publish_now = trio.Event()
            rescan = trio.current_time() - last_scan >= RESCAN_INTERVAL
            if rescan:
                last_scan = trio.current_time()

    # --- health ---------------------------------------------------------------------------

    async def probe_services(self) -> None:
        probed = {service: endpoint for service, endpoint in self._endpoints.items() if endpoint.probe}
        if not probed:
            return
        timeout = self.settings.probe_timeout

        async def one(results: dict[str, Health], service: str, address: str, transport: str) -> None:
            results[service] = await probe(service, Address.parse(address), transport, timeout)

        while True:
            results: dict[str, Health] = {}
            async with trio.open_nursery() as nursery:
                for service, endpoint in probed.items():
                    nursery.start_soon(one, results, service, endpoint.address, endpoint.transport)
            changed = [s for s, h in results.items() if s not in self.health or self.health[s].up != h.up]
            self.health.update(results)
            for service in changed:
                health = results[service]
                log.log(logging.INFO if health.up else logging.WARNING, "%s is %s: %s", service,
                        "up" if health.up else "down", health.detail)  # fmt: skip
            if changed:
                self._on_health()
            await trio.sleep(self.settings.probe_interval)

    def up(self, service: str) -> bool:
        health = self.health.get(service)
        return health is None or health.up

    @property
    def loops(self) -> tuple[Callable, ...]:
        """The tasks to run, after load(), until cancelled."""
        return (self.watch_files, self.run_commands, self.keep_published, self.probe_services)

    def summary(self) -> dict[str, Any]:
        """Sources and service health in short, for /status (`document` has it all)."""
        return {
            "sources": [
                {
                    "name": s.name,
                    "type": s.config.type,
                    "status": s.status,
                    "domains": len(s.domains),
                    "detail": s.detail,
                }
                for s in self.sources
            ],  # fmt: skip
            "health": {service: attrs.asdict(health) for service, health in sorted(self.health.items())},
        }

    def document(self) -> dict[str, Any]:
        """What `meshmail slave domains` shows."""
        state = self.replication.state
        domains = []
        for domain, names in sorted(self.wanted().items()):
            route = state.domain(domain)
            if route == DomainRoute(self.name, "slave"):
                status = "published"
            elif route is None:
                status = "pending"
            elif route.source == "admin":
                status = f"routed to {route.slave} by an admin"
            else:
                status = f"conflict: routed to {route.slave}"
            domains.append({"domain": domain, "sources": names, "status": status})
        return {
            "slave": self.name,
            "sources": [source.document() for source in self.sources],
            "domains": domains,
            "health": {service: attrs.asdict(health) for service, health in sorted(self.health.items())},
        }


# --- reading, in worker threads or pure ------------------------------------------------------


async def read_source(source: Source, *, strict: bool = True) -> Reading:
    """Read and parse a source now; raises SourceError when it cannot be read, or with
    `strict` when a file's last line has no newline (at start such a line is read)."""
    config = source.config
    kind = config.type
    if kind == "static":
        return _static(config.domains)
    if source.runs_command:
        output = await _run(config.command)
        if kind == "plesk":
            return await trio.to_thread.run_sync(lambda: _result(sources.parse_domain_list(output)))
        return await trio.to_thread.run_sync(_postconf, output, strict)
    return await trio.to_thread.run_sync(_read_files, kind, source.files, strict)


async def check_sources(settings: SlaveSection) -> None:
    """Read every source once, as a slave does at start; raises SourceError (one line naming
    the source) for one that cannot be read. `meshmail run --check` runs it."""
    for source in (Source(config) for config in settings.sources):
        try:
            await read_source(source, strict=False)
        except SourceError as exc:
            raise SourceError(f"slave source {source.name}: {exc}") from None


def _signatures(paths: Sequence[str]) -> dict[str, Signature]:
    return {path: _signature(path) for path in paths}


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _text(path: str, strict: bool, *, required: bool = True) -> str | None:
    """A source file as text; None for a missing optional file. Raises SourceError, and with
    `strict` for a last line without newline (without, that line is read like the others)."""
    try:
        # O_NONBLOCK: opening a FIFO put in the file's place must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise SourceError(f"{path} is not a regular file")
            data = file.read(MAX_INPUT + 1)
    except FileNotFoundError:
        if required:
            raise SourceError(f"{path} does not exist") from None
        return None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT:
        raise SourceError(f"{path} is larger than {MAX_INPUT} bytes")
    text = data.decode("utf-8", "replace")
    if not text or text.endswith("\n"):
        return text
    if strict:
        raise SourceError(f"the last line of {path} has no newline: half-written? (add one if it is complete)")
    return text + "\n"


def _result(*parsed: sources.Parsed, files: Sequence[str] = ()) -> Reading:
    """The union of `parsed`; the first len(files) of them are the files named."""
    domains: frozenset[str] = frozenset().union(*(p.domains for p in parsed))
    listed = {path: len(p.domains) for path, p in zip(files, parsed, strict=False)}
    return Reading(domains, tuple(problem for p in parsed for problem in p.problems), listed)


def _read_files(kind: str, paths: dict[str, str], strict: bool) -> Reading:
    if kind == "cpanel":
        users = sources.parse_cpanel_userdomains(_text(paths["userdomains"], strict))
        local = sources.parse_domain_list(_text(paths["localdomains"], strict))
        remote_text = _text(paths["remotedomains"], strict, required=False)
        reading = _result(users, local, files=(paths["userdomains"], paths["localdomains"]))
        if remote_text is None:
            return reading
        # Remote-MX domains get their mail elsewhere: this server does not host it.
        remote = sources.parse_domain_list(remote_text)
        return reading._replace(domains=reading.domains - remote.domains, problems=reading.problems + remote.problems)
    (path,) = paths.values()
    parse = {
        "directadmin": sources.parse_domain_list,
        "dovecot": sources.parse_dovecot_passwd,
        "postfix": sources.parse_postfix_map,
    }[kind]
    return _result(parse(_text(path, strict)), files=(path,))


def _postconf(output: str, strict: bool) -> Reading:
    """The domains of `postconf -xh virtual_mailbox_domains`, reading the files it names."""
    top = sources.parse_postconf(output if output.endswith("\n") else output + "\n")
    files = (*top.map_files, *top.list_files)
    parsed = [sources.parse_postfix_map(_text(path, strict)) for path in top.map_files]
    parsed += [sources.parse_postconf(_text(path, strict)) for path in top.list_files]
    return _result(*parsed, top, files=files)


def _static(names: tuple[str, ...]) -> Reading:
    domains, problems = set(), []
    for index, name in enumerate(names):
        try:
            domains.add(normalize_domain(name))
        except InvalidName as exc:
            problems.append(f"domains[{index}]: {exc}")
    return Reading(frozenset(domains), tuple(problems))


async def _run(argv: tuple[str, ...]) -> str:
    """The standard output of a command (at most MAX_INPUT bytes are ever held); raises
    SourceError when it cannot run, fails, runs too long or prints too much."""
    shown = " ".join(argv)
    output, errors = bytearray(), bytearray()

    async def drain(stream: trio.abc.ReceiveStream, into: bytearray, limit: int) -> None:
        async for chunk in stream:
            if len(into) + len(chunk) > limit:
                if into is output:
                    raise SourceError(f"`{shown}` printed more than {MAX_INPUT} bytes")
                continue  # stderr: keep the start only
            into += chunk

    try:
        process = await trio.lowlevel.open_process(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise SourceError(f"cannot run `{shown}`: {exc.strerror or exc}") from None
    try:
        with trio.fail_after(COMMAND_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, process.stdout, output, MAX_INPUT)
                nursery.start_soon(drain, process.stderr, errors, 4096)
            await process.wait()
    except trio.TooSlowError:
        raise SourceError(f"`{shown}` ran longer than {COMMAND_TIMEOUT:g} s") from None
    except BaseExceptionGroup as group:
        too_much = group.subgroup(SourceError)
        if too_much is None:
            raise
        raise too_much.exceptions[0] from None
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    if process.returncode != 0:
        why = errors.decode("utf-8", "replace").strip().splitlines()[:1]
        raise SourceError(f"`{shown}` exited with status {process.returncode}: {why[0] if why else 'no message'}")
    return output.decode("utf-8", "replace")
