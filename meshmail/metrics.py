"""The node's metrics: every meshmail_* series declared once, with its HELP text, and one
CollectorRegistry per node (tests run several nodes in one process).

The gossip and state layers count in plain collections.Counter objects and know nothing of
Prometheus; a collector here reads those counters and maps each name to a series. The
services above them count on the prometheus Counters of their node's `Metrics`. GET /metrics
exposes the registry; /status shows the same numbers under each series' dotted `status`
name, a stable interface that the CLI and operators' scripts read.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

__all__ = [
    "ALL", "GOSSIP", "MX", "PROXY", "SERVICES", "STATE", "STATUS_GOSSIP", "STATUS_STATE", "Metrics", "Series",
    "exposition",
]  # fmt: skip


@attrs.frozen
class Series:
    """One documented series.

    Attributes:
        name: the exposed name; a counter's ends in _total.
        help: the HELP text.
        status: its key among the /status counters, a template of its labels
            ("dropped.{reason}"); labels missing from it are summed there.
        labels: the label names.
        kind: "counter", "gauge" or "histogram" (whose /status figures its owner computes).
    """

    name: str
    help: str
    status: str
    labels: tuple[str, ...] = ()
    kind: str = attrs.field(default="counter", validator=attrs.validators.in_(("counter", "gauge", "histogram")))


# --- read from Memberlist.counters ----------------------------------------------------------

GOSSIP: tuple[Series, ...] = (
    Series("meshmail_gossip_packets_received_total", "Gossip UDP packets received, before any check.", "packets_in"),
    Series("meshmail_gossip_packets_sent_total", "Gossip UDP packets sent.", "packets_out"),
    Series("meshmail_gossip_received_bytes_total", "Bytes of gossip UDP packets and stream frames read.", "bytes_in"),
    Series("meshmail_gossip_sent_bytes_total", "Bytes of gossip UDP packets and stream frames sent.", "bytes_out"),
    Series("meshmail_gossip_send_errors_total", "Gossip UDP packets the operating system did not send.", "send_errors"),
    Series(
        "meshmail_gossip_dropped_total",
        "Gossip packets, frames and streams dropped, by reason (auth_failed: no installed key opens it; "
        "replay, stale, truncated, malformed, oversize, wrong_node, removed_member, busy...).",
        "dropped.{reason}",
        ("reason",),
    ),
    Series(
        "meshmail_gossip_ignored_messages_total",
        "Gossip messages ignored by design, by reason (unknown_type: a type from a newer version).",
        "ignored.{reason}",
        ("reason",),
    ),
    Series(
        "meshmail_gossip_broadcast_packets_total",
        "Packets of queued broadcasts (membership news, state deltas) sent to random members.",
        "gossip_packets",
    ),
    Series(
        "meshmail_gossip_refusal_notices_total",
        "Notices sent to a removed node that the cluster refuses it.",
        "refusal_notices",
    ),
    Series("meshmail_gossip_streams_accepted_total", "Gossip TCP streams accepted from peers.", "streams_in"),
    Series("meshmail_gossip_streams_broken_total", "Gossip TCP streams that broke mid-exchange.", "streams_broken"),
    Series(
        "meshmail_gossip_streams_timed_out_total",
        "Gossip TCP streams cut for taking longer than tcp_timeout.",
        "streams_timed_out",
    ),
    Series(
        "meshmail_gossip_push_pulls_total",
        "Push-pull exchanges (full membership and state sync) this node started that completed.",
        "push_pulls",
    ),
    Series(
        "meshmail_gossip_push_pull_failures_total",
        "Push-pull exchanges this node started that failed (peer unreachable, stream broken or too slow).",
        "push_pull_failures",
    ),
    Series(
        "meshmail_gossip_reconnect_attempts_total",
        "Push-pulls tried with a dead member, to heal a partition.",
        "reconnect_attempts",
    ),
    Series("meshmail_gossip_probes_total", "Direct probes (pings) of members.", "probes"),
    Series(
        "meshmail_gossip_probe_failures_total",
        "Probes that got no ack, direct or indirect, within the probe interval.",
        "probe_failures",
    ),
    Series(
        "meshmail_gossip_indirect_probes_total",
        "Requests to other members to ping a member that did not answer a direct probe.",
        "indirect_probes",
    ),
    Series(
        "meshmail_gossip_tcp_fallback_acks_total",
        "Probe acks that came only over the TCP fallback (UDP to the member is losing packets).",
        "tcp_fallback_acks",
    ),
    Series("meshmail_gossip_suspicions_total", "Members this node started to suspect of failure.", "suspicions"),
    Series(
        "meshmail_gossip_suspicion_confirmations_total",
        "Independent confirmations of a suspicion this node holds (they shorten its timeout).",
        "suspicion_confirmations",
    ),
    Series(
        "meshmail_gossip_refutations_total",
        "Times this node refuted a claim that it is suspect or dead.",
        "refutations",
    ),
    Series(
        "meshmail_gossip_conflicts_total",
        "Alive messages naming a live member at another address (two nodes with one name).",
        "conflicts",
    ),
    Series("meshmail_gossip_members_left_total", "Members that left the cluster gracefully.", "left"),
    Series("meshmail_gossip_members_failed_total", "Members declared dead.", "failed"),
    Series(
        "meshmail_gossip_members_reaped_total",
        "Dead or departed members forgotten after gossip_to_the_dead_time.",
        "reaped",
    ),
    Series(
        "meshmail_gossip_events_dropped_total",
        "Membership events not delivered to a subscriber that fell behind.",
        "events_dropped",
    ),
    Series(
        "meshmail_gossip_recovery_push_pulls_total",
        "Push-pulls run at once with a member that came back (new, back from dead, refuted), so maps agree soon.",
        "recovery_push_pulls",
    ),
    Series(
        "meshmail_gossip_accept_shortages_total",
        "Gossip streams not accepted for lack of file descriptors or memory (EMFILE, ENFILE, ENOMEM, ENOBUFS).",
        "gossip.accept_shortage",
    ),
    Series(
        "meshmail_gossip_removed",
        "1 once a member told this node that it was removed from the cluster.",
        "removed_from_cluster",
        kind="gauge",
    ),
)

GOSSIP_UNLISTED = Series(
    "meshmail_gossip_unlisted_total",
    "Gossip counts under a name that has no series of its own (label counter: that name).",
    "{counter}",
    ("counter",),
)

# --- read from Replication.counters ---------------------------------------------------------

STATE: tuple[Series, ...] = (
    Series(
        "meshmail_state_syncs_total",
        "Anti-entropy exchanges of the cluster state with a peer that completed, on either side.",
        "state.syncs",
    ),
    Series(
        "meshmail_state_applied_entries_total",
        "Entries from peers that changed the local cluster state, by how they came "
        "(delta: gossiped write; sync: anti-entropy).",
        "state.{via}_applied",
        ("via",),
    ),
    Series(
        "meshmail_state_rejected_total",
        "State entries or exchanges from peers refused, by reason "
        "(invalid_name, future_timestamp, removed_writer, bad_batch, bad_sync).",
        "state.rejected.{reason}",
        ("reason",),
    ),
    Series(
        "meshmail_state_duplicate_deltas_total",
        "Gossiped state deltas received again and skipped without decoding.",
        "state.delta_duplicates",
    ),
    Series(
        "meshmail_state_unknown_namespace_entries_total",
        "State entries of a namespace this version does not know (from a newer node), kept out of the map.",
        "state.skipped_unknown_namespace",
    ),
    Series(
        "meshmail_state_bulk_writes_total",
        "Batches of local writes too large to gossip as deltas; they spread by anti-entropy.",
        "state.bulk_writes",
    ),
    Series(
        "meshmail_state_tombstones_dropped_total",
        "Tombstones (deleted entries) dropped once older than gc_grace.",
        "state.tombstones_dropped",
    ),
    Series(
        "meshmail_state_turned_stale",
        "1 once this node's cluster state turned stale (no peer synced with it for longer than gc_grace); "
        'the "stale" field of /status says whether it still is.',
        "state.stale",
        kind="gauge",
    ),
)

STATE_UNLISTED = Series(
    "meshmail_state_unlisted_total",
    "Cluster state counts under a name that has no series of its own (label counter: that name).",
    "{counter}",
    ("counter",),
)

# --- counted by the services on Metrics -------------------------------------------------------

LOGINS = Series("meshmail_http_logins_total", "Admin logins (POST /login) that succeeded.", "auth.login")
LOGIN_FAILURES = Series(
    "meshmail_http_login_failures_total",
    "Admin logins refused for a wrong account or password.",
    "auth.login_failed",
)
LOGINS_LIMITED = Series(
    "meshmail_http_logins_limited_total",
    "Admin logins refused unchecked: the client address or the account failed too often lately.",
    "auth.login_limited",
)
BAD_API_TOKENS = Series(
    "meshmail_http_bad_api_tokens_total",
    "Requests carrying a Bearer API token that is not valid (unknown, revoked, expired or malformed).",
    "auth.bad_token",
)
UNAUTHENTICATED = Series(
    "meshmail_http_unauthenticated_total",
    "Requests to an admin route refused for lack of valid credentials (HTTP 401).",
    "auth.refused",
)
CSRF_REFUSED = Series(
    "meshmail_http_csrf_refused_total",
    "Session requests that change something refused for a missing or wrong CSRF token (HTTP 403).",
    "auth.csrf_refused",
)
SERVICE_RESTARTS = Series(
    "meshmail_service_restarts_total",
    "Times a service (http, slave...) failed after its start and was started again on the same sockets.",
    "{service}.server_restarts",
    ("service",),
)
JOINS_ADMITTED = Series(
    "meshmail_join_admitted_total",
    "Servers this master admitted into the cluster (POST /cluster/join).",
    "join.admitted",
)
JOINS_REFUSED = Series(
    "meshmail_join_refused_total",
    "Join requests refused, by reason (bad_token, expired, used_up, revoked, replayed, name_taken...).",
    "join.refused.{reason}",
    ("reason",),
)
JOINS_LIMITED = Series(
    "meshmail_join_limited_total",
    "Join requests refused unchecked: their client address had too many refused joins lately.",
    "join.limited",
)
SOURCE_READS = Series(
    "meshmail_slave_source_reads_total",
    "Times a slave's domain source was read again (after a change, or on the command interval) and read well.",
    "slave.source_reads",
    ("source",),
)
SOURCE_FAILURES = Series(
    "meshmail_slave_source_failures_total",
    "Times a slave's domain source could not be read again or came back empty; its last good list stays published.",
    "slave.source_failures",
    ("source",),
)
SKIPPED_LINES = Series(
    "meshmail_slave_skipped_lines_total",
    "Lines of a slave's domain source skipped as unreadable, counted at each read (meshmail slave domains lists them).",
    "slave.skipped_lines",
    ("source",),
)
ROUTES_WRITTEN = Series(
    "meshmail_slave_routes_written_total",
    "Domain routes this slave wrote or withdrew to match its sources.",
    "slave.routes_written",
)
PUBLISH_FAILURES = Series(
    "meshmail_slave_publish_failures_total",
    "Rounds of publishing a slave's domains that failed because the state journal could not be written; retried.",
    "slave.publish_failures",
)

PROXY_SESSIONS = Series(
    "meshmail_proxy_sessions",
    "Client sessions open on this master's proxy, by protocol (imap, pop3, submission).",
    "proxy.sessions.{protocol}",
    ("protocol",),
    kind="gauge",
)
PROXY_LOGINS = Series(
    "meshmail_proxy_logins_total",
    "Logins through the proxy, by protocol and result (ok; refused: wrong credentials or no such domain; "
    "unavailable: the slave could not be reached or could not judge them).",
    "proxy.logins.{result}",
    ("protocol", "result"),
)
PROXY_TURNED_AWAY = Series(
    "meshmail_proxy_turned_away_total",
    "Connections the proxy turned away at once: too many sessions on this master or from one client address.",
    "proxy.turned_away",
    ("protocol",),
)
PROXY_BYTES = Series(
    "meshmail_proxy_bytes_total",
    "Bytes spliced between logged-in clients and their slaves, by direction (from_clients, to_clients).",
    "proxy.bytes.{direction}",
    ("direction",),
)
PROXY_BACKEND_CONNECT = Series(
    "meshmail_proxy_backend_connect_seconds",
    "Time from a client's credentials to a connected backend (TCP, and TLS where the endpoint asks), seconds.",
    "proxy.backend_connect",
    kind="histogram",
)
#: The proxy's series: its /status block, not the state counters.
PROXY: tuple[Series, ...] = (PROXY_SESSIONS, PROXY_LOGINS, PROXY_TURNED_AWAY, PROXY_BYTES, PROXY_BACKEND_CONNECT)

MX_SESSIONS = Series("meshmail_mx_sessions", "SMTP sessions open on this master's MX.", "mx.sessions", kind="gauge")
MX_REJECTIONS = Series(
    "meshmail_mx_rejections_total",
    "SMTP connections, commands and messages the MX refused, by reason (relay_denied, unknown_recipient, "
    "no_route, connection_rate, message_rate, too_many_sessions, protocol, timeout, memory, early_talker...).",
    "mx.rejections.{reason}",
    ("reason",),
)
MX_RECIPIENTS = Series(
    "meshmail_mx_recipients_total",
    "Recipients of inbound mail by result (delivered, queued, deferred: tried again later, refused: the slave "
    "refused them all at once), and notices sent to senders (bounces, delay_warnings; bounces_unsent: the "
    "sender is outside the cluster; taken_over: shadow copies of a dead master delivered here; unshadowed: "
    "queued here only, no other master took a copy).",
    "mx.recipients.{result}",
    ("result",),
)
MX_QUEUED = Series(
    "meshmail_mx_queued_messages",
    "Messages in this master's queue waiting for their slave (shadow copies held for other masters not counted).",
    "mx.queued",
    kind="gauge",
)
#: The MX's series: its /status block.
MX: tuple[Series, ...] = (MX_SESSIONS, MX_REJECTIONS, MX_RECIPIENTS, MX_QUEUED)

#: Buckets of PROXY_BACKEND_CONNECT: a LAN connect takes well under a millisecond, a TLS one a
#: few, a retried one seconds.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SERVICES: tuple[Series, ...] = (
    LOGINS,
    LOGIN_FAILURES,
    LOGINS_LIMITED,
    BAD_API_TOKENS,
    UNAUTHENTICATED,
    CSRF_REFUSED,
    SERVICE_RESTARTS,
    JOINS_ADMITTED,
    JOINS_REFUSED,
    JOINS_LIMITED,
    SOURCE_READS,
    SOURCE_FAILURES,
    SKIPPED_LINES,
    ROUTES_WRITTEN,
    PUBLISH_FAILURES,
)

#: Every series a node exposes.
ALL: tuple[Series, ...] = (*GOSSIP, GOSSIP_UNLISTED, *STATE, STATE_UNLISTED, *SERVICES, *PROXY, *MX)
#: The series of the /status "counters" (the gossip layer's) and of its "state" "counters".
STATUS_GOSSIP: tuple[Series, ...] = (*GOSSIP, GOSSIP_UNLISTED)
STATUS_STATE: tuple[Series, ...] = (*STATE, STATE_UNLISTED, *SERVICES)


_C = TypeVar("_C")


class Metrics:
    """The metrics of one node: its registry and the counters its services count on.

    Args:
        gossip: the node's Memberlist.counters, exposed as the GOSSIP series.
        state: the node's Replication.counters, exposed as the STATE series.
    """

    def __init__(self, *, gossip: Mapping[str, int] | None = None, state: Mapping[str, int] | None = None) -> None:
        self.registry = CollectorRegistry()
        #: Series name -> the collector that gives it, so that status_counters collects only
        #: what it shows (a /status has several blocks; a gauge may compute its value).
        self._collectors: dict[str, Any] = {}
        for listed, unlisted, counts in ((GOSSIP, GOSSIP_UNLISTED, gossip), (STATE, STATE_UNLISTED, state)):
            if counts is not None:
                collector = _CountersCollector(listed, unlisted, counts)
                self.registry.register(collector)
                self._note(collector, (*listed, unlisted))

        def counter(series: Series) -> Counter:
            return self._note(_counter(self.registry, series), [series])

        # web/auth.py and web/app.py
        self.logins = counter(LOGINS)
        self.login_failures = counter(LOGIN_FAILURES)
        self.logins_limited = counter(LOGINS_LIMITED)
        self.bad_api_tokens = counter(BAD_API_TOKENS)
        self.unauthenticated = counter(UNAUTHENTICATED)
        self.csrf_refused = counter(CSRF_REFUSED)
        # services.supervise, through node.py
        self.service_restarts = counter(SERVICE_RESTARTS)
        # web/cluster_api.py
        self.joins_admitted = counter(JOINS_ADMITTED)
        self.joins_refused = counter(JOINS_REFUSED)
        self.joins_limited = counter(JOINS_LIMITED)
        # slave/agent.py
        self.source_reads = counter(SOURCE_READS)
        self.source_failures = counter(SOURCE_FAILURES)
        self.skipped_lines = counter(SKIPPED_LINES)
        self.routes_written = counter(ROUTES_WRITTEN)
        self.publish_failures = counter(PUBLISH_FAILURES)
        # proxy/
        self.proxy_sessions = self._note(_gauge(self.registry, PROXY_SESSIONS), [PROXY_SESSIONS])
        self.proxy_logins = counter(PROXY_LOGINS)
        self.proxy_turned_away = counter(PROXY_TURNED_AWAY)
        self.proxy_bytes = counter(PROXY_BYTES)
        self.proxy_backend_connect = Histogram(
            PROXY_BACKEND_CONNECT.name, PROXY_BACKEND_CONNECT.help, registry=self.registry, buckets=CONNECT_BUCKETS
        )
        # mta/
        self.mx_sessions = self._note(_gauge(self.registry, MX_SESSIONS), [MX_SESSIONS])
        self.mx_rejections = counter(MX_REJECTIONS)
        self.mx_recipients = counter(MX_RECIPIENTS)
        self.mx_queued = self._note(_gauge(self.registry, MX_QUEUED), [MX_QUEUED])

    def _note(self, collector: _C, series: Iterable[Series]) -> _C:
        """Note `collector` (in the registry) as the one that gives `series`; returns it."""
        for one in series:
            self._collectors[one.name] = collector
        return collector

    def status_counters(self, series: Iterable[Series]) -> dict[str, int]:
        """The values of `series` keyed by their status names, sorted by name.

        A name shows once something was counted under it: a labelled series' once it has
        that label set (even at 0), an unlabelled series' once above 0. (Prometheus gets every
        unlabelled series from the start, at 0, so that rates and alerts see it.)
        """
        wanted = {s.name: s for s in series}
        collectors = {id(c): c for name in wanted if (c := self._collectors.get(name)) is not None}
        counts: collections.Counter[str] = collections.Counter()
        for family in (family for collector in collectors.values() for family in collector.collect()):
            for sample in family.samples:
                found = wanted.get(sample.name)
                if found is None or not (sample.labels or sample.value):
                    continue
                counts[found.status.format(**sample.labels)] += int(sample.value)
        return dict(sorted(counts.items()))


def exposition(metrics: Metrics, accept: str) -> tuple[bytes, str]:
    """The registry of `metrics` as (body, content type) in the format `accept` asks for:
    OpenMetrics when the scraper prefers it, else the Prometheus text format."""
    encode, content_type = choose_encoder(accept)
    return encode(metrics.registry), content_type


def _counter(registry: CollectorRegistry, series: Series) -> Counter:
    return Counter(series.name, series.help, series.labels, registry=registry)


def _gauge(registry: CollectorRegistry, series: Series) -> Gauge:
    return Gauge(series.name, series.help, series.labels, registry=registry)


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    """The names `template` gives, capturing its labels: "dropped.{reason}" -> dropped\\.(?P<reason>[^.]+)."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^.]+)" for i, p in enumerate(parts)))


def _family(series: Series) -> Metric:
    if series.kind == "gauge":
        return GaugeMetricFamily(series.name, series.help, labels=series.labels)
    return CounterMetricFamily(series.name, series.help, labels=series.labels)


@attrs.define(eq=False)
class _CountersCollector:
    """Exposes a lower layer's plain Counter: each name as the first series whose status
    template gives it, else as `unlisted` (so a new name is never lost, only undocumented)."""

    series: tuple[Series, ...]
    unlisted: Series
    counters: Mapping[str, int]

    def describe(self) -> Iterator[Metric]:
        for series in (*self.series, self.unlisted):
            yield _family(series)

    def collect(self) -> Iterator[Metric]:
        families = {series: _family(series) for series in (*self.series, self.unlisted)}
        for name, value in list(self.counters.items()):
            series, labels = self._series_of(name)
            families[series].add_metric([labels[label] for label in series.labels], value)
        for series, family in families.items():
            if not series.labels and not family.samples:
                family.add_metric([], 0)
        yield from families.values()  # labelled ones with no sample yet too: their HELP documents them

    def _series_of(self, name: str) -> tuple[Series, dict[str, str]]:
        for series in self.series:
            match = _pattern(series.status).fullmatch(name)
            if match:
                return series, match.groupdict()
        return self.unlisted, {"counter": name}
