"""The sections of meshmail.toml: one frozen attrs record per table, each field one key.

A field declares its parser, default, documentation and example once (see schema); the
loader, the error messages and the documented template all come from these records.
Adding a key is adding a field here. Gossip timings are meshmail.gossip.config's
GossipConfig: a named profile, and every field of it a key of [gossip] that overrides it.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from ..core.address import Address
from ..core.nodes import (
    DEFAULT_DATA_DIR,
    DEFAULT_GOSSIP_PORT,
    DEFAULT_HTTP_PORT,
    MX_PORT,
    ROLES,
    SHADOW_PORT,
)
from ..gossip.config import PROFILES, GossipConfig, profile
from ..gossip.messages import MAX_META
from ..nodemeta import CLIENT_ADDRESS, SERVICES, TRANSPORTS, Endpoint, NodeMeta
from ..security import files
from ..state.names import InvalidName, normalize_address
from .schema import (
    REQUIRED,
    BadValue,
    Setting,
    address,
    attribute_docs,
    boolean,
    choice,
    cluster_name,
    expect,
    gossip_key,
    group,
    integer,
    list_of,
    mapping_of,
    node_name,
    non_empty,
    number,
    read_table,
    seconds,
    section,
    setting,
    string,
)

# --- [node] ---------------------------------------------------------------------------------


@attrs.frozen
class NodeSection:
    name: str = setting(
        REQUIRED,
        node_name,
        doc="Unique name of this node in the cluster, and in its certificate (required). A restarted node"
        " rejoins under the same name; the same name from another address while the first is alive is refused.",
        example="mx1",
        commented=False,
    )
    role: str = setting(
        "master",
        choice(*ROLES),
        doc="master: takes client connections and routes them to the slaves; slave: holds the mailboxes.",
        commented=False,
    )
    data_dir: str = setting(
        DEFAULT_DATA_DIR,
        non_empty,
        doc="Where the node keeps its state, keys, certificates and mail spool.",
        commented=False,
    )


# --- [gossip] -------------------------------------------------------------------------------

DEFAULT_PROFILE = attrs.fields(GossipConfig).profile.default


def _gossip_settings() -> Iterator[Setting]:
    """The profile key, then one key per GossipConfig field, documented by its comment."""
    yield Setting(
        "profile",
        choice(*PROFILES),
        DEFAULT_PROFILE,
        doc=f"Timing profile, with hashicorp/memberlist's values: {', '.join(PROFILES)}. Any of its settings"
        " can be overridden with the keys below (shown with the profile's values); durations are in seconds.",
        commented=False,
    )
    docs = attribute_docs(GossipConfig)
    kinds = typing.get_type_hints(GossipConfig)
    for field in attrs.fields(GossipConfig):
        if field.name == "profile":
            continue
        values = {name: getattr(profile(name), field.name) for name in PROFILES}
        doc = docs.get(field.name, "")
        if len(set(values.values())) > 1:
            doc += "\nProfiles: " + ", ".join(f"{name} {value}" for name, value in values.items()) + "."
        yield Setting(
            field.name,
            _override(field.name, kinds[field.name]),
            values[DEFAULT_PROFILE],
            doc=doc,
            example=functools.partial(_profile_value, field.name),
        )


def _override(name: str, kind: type) -> typing.Callable[[object], Any]:
    """The parser of a GossipConfig field: its TOML type, then its own validator."""
    typed = {bool: boolean, int: integer, float: number}[kind]

    def parse(value: object) -> Any:
        checked = typed(value)
        try:
            GossipConfig(**{name: checked})
        except (TypeError, ValueError) as exc:
            raise BadValue(f"invalid value {value!r}: {exc}") from None
        return checked

    return parse


def _profile_value(name: str, given: Mapping[str, Any]) -> Any:
    return getattr(profile(given.get("profile", DEFAULT_PROFILE)), name)


def _gossip_config(values: dict[str, Any]) -> GossipConfig:
    name = values.pop("profile", DEFAULT_PROFILE)
    try:
        return profile(name, **values)
    except (TypeError, ValueError) as exc:
        raise BadValue(str(exc)) from None


@attrs.frozen
class GossipSection:
    cluster: str = setting(
        REQUIRED,
        cluster_name,
        doc="Cluster name: bound into every encrypted packet, so two clusters never mix (required).",
        example="example",
        commented=False,
    )
    #: Decoded, primary first. Left out of repr: key material is never logged.
    keys: tuple[bytes, ...] = setting(
        (),
        list_of(gossip_key, at_least_one="needs at least one key (generate one with: meshmail keygen)"),
        doc="Base64 AES-256 keys. The first encrypts; all of them decrypt. Generate with: meshmail keygen."
        f" Leave this out when data_dir/{files.KEYRING} exists (init and join write it): that file wins, and"
        " follows `meshmail keyring install|use|remove|rotate`. With keys here this file holds secrets:"
        " chmod 600, owner meshmail.",
        example=("<output of: meshmail keygen>",),
        commented=False,
        repr=False,
    )
    bind: Address = setting(
        Address("0.0.0.0", DEFAULT_GOSSIP_PORT),
        address(port_zero=True, ip=True),
        doc="UDP and TCP address for gossip (both on the same port).",
        commented=False,
    )
    advertise: Address | None = setting(
        None,
        address(ip=True),
        doc="Address the other nodes reach this one at. Required when bind is 0.0.0.0 or [::].",
        example="192.0.2.10:7946",
        commented=False,
    )
    seeds: tuple[Address, ...] = setting(
        (),
        list_of(address()),
        doc="Nodes to join through at start (any running members will do). The node keeps retrying in the"
        " background until one answers, so nodes can start in any order.",
        example=("192.0.2.10:7946", "192.0.2.11:7946", "192.0.2.12:7946"),
        commented=False,
    )
    settings: GossipConfig = group(_gossip_settings(), _gossip_config, factory=GossipConfig)

    def __attrs_post_init__(self) -> None:
        if self.advertise is None and self.bind.unspecified:
            raise BadValue(f"required when gossip.bind is {self.bind}", "advertise")


# --- [http] and [tls] ----------------------------------------------------------------------


@attrs.frozen
class HttpSection:
    bind: Address = setting(
        Address("127.0.0.1", DEFAULT_HTTP_PORT),
        address(port_zero=True),
        doc="Where it listens.",
        commented=False,
    )
    advertise: Address | None = setting(
        None,
        address(),
        doc="Where other nodes and joining servers reach it (put in join tokens); by default the bind"
        " address, or the gossip advertise host when bound to 0.0.0.0.",
        example="192.0.2.10:8443",
    )


@attrs.frozen
class TlsSection:
    """The node's certificate files (absolute paths; relative ones in the file are under
    node.data_dir). With this section the HTTP API speaks TLS only."""

    ca: str = setting(REQUIRED, non_empty, doc="The cluster CA's certificate.", example=files.CA_CERT)
    cert: str = setting(REQUIRED, non_empty, doc="This node's certificate.", example=files.NODE_CERT)
    key: str = setting(REQUIRED, non_empty, doc="Its private key.", example=files.NODE_KEY)
    ca_key: str | None = setting(
        None,
        non_empty,
        doc="The cluster CA's key: masters only, to sign the certificates of joining nodes.",
        example=files.CA_KEY,
        roles=("master",),
    )

    def under(self, data_dir: str) -> TlsSection:
        """These files with relative paths taken as under `data_dir`."""
        join = lambda path: path and os.path.join(data_dir, path)  # noqa: E731
        return TlsSection(join(self.ca), join(self.cert), join(self.key), join(self.ca_key))


# --- [endpoints] ----------------------------------------------------------------------------


def _service_address(value: object) -> str:
    return str(address()(value))


@attrs.frozen
class EndpointConfig:
    """A service this node offers ([endpoints]): `imap = "host:port"` or a table."""

    address: str = setting(REQUIRED, _service_address, doc='where it listens, "host:port"', example="192.0.2.10:143")
    transport: str = setting(
        "plain", choice(*TRANSPORTS), doc=f"{', '.join(TRANSPORTS)} (tls: TLS from the first byte)"
    )
    client_address: str = setting(
        "none",
        choice(*CLIENT_ADDRESS),
        doc="how the backend learns the client's IP: none, id (IMAP ID, as Dovecot takes it), xclient"
        " (Postfix) or proxy (PROXY protocol v2)",
    )
    probe: bool = setting(
        True,
        boolean,
        doc="whether a slave checks it every slave.probe_interval (connect, read the greeting) and publishes"
        " it down when it does not answer",
    )


def _endpoint(value: object) -> EndpointConfig:
    if isinstance(value, dict):
        return read_table(EndpointConfig, value)
    return EndpointConfig(_service_address(value))


# --- [slave] and [[slave.sources]] ----------------------------------------------------------


@attrs.frozen
class SourceConfig:
    """One domain source of a slave. Which fields apply depends on `type`."""

    type: str
    #: How `meshmail slave domains` names it; unique; the type by default.
    name: str
    domains: tuple[str, ...] = ()
    #: Files to read (cpanel: userdomains, localdomains, remotedomains; others: one path).
    paths: Mapping[str, str] = attrs.Factory(dict)
    #: A command whose output lists the domains (plesk; postfix without a path).
    command: tuple[str, ...] = ()


class SourceTable:
    """The keys of one type of [[slave.sources]] table: `domains` and `command` are those of
    SourceConfig, every other key names a file to read."""

    def source(self, kind: str, name: str) -> SourceConfig:
        values = attrs.asdict(self, recurse=False)
        domains, command = values.pop("domains", ()), values.pop("command", None) or ()
        paths = {key: path for key, path in values.items() if path is not None}
        return SourceConfig(kind, name, tuple(domains), paths, tuple(command))


@attrs.frozen
class StaticSource(SourceTable):
    """The domains listed here."""

    domains: tuple[str, ...] = setting(REQUIRED, list_of(non_empty), example=("example.com", "example.org"))


@attrs.frozen
class CpanelSource(SourceTable):
    """cPanel: the domains of its users and its local domains."""

    userdomains: str = setting("/etc/userdomains", non_empty)
    localdomains: str = setting("/etc/localdomains", non_empty)
    remotedomains: str = setting(
        "/etc/remotedomains", non_empty, doc="Domains with a remote MX: left out (the file may be absent)."
    )


@attrs.frozen
class DirectAdminSource(SourceTable):
    """DirectAdmin: its list of domains."""

    path: str = setting("/etc/virtual/domains", non_empty)


@attrs.frozen
class PleskSource(SourceTable):
    """Plesk: the domains its command lists."""

    command: tuple[str, ...] = setting(("plesk", "bin", "domain", "--list"), list_of(non_empty))


POSTCONF = ("postconf", "-xh", "virtual_mailbox_domains")


@attrs.frozen
class PostfixSource(SourceTable):
    """Postfix: a file of domains (path), or the output of a command (by default postconf's
    virtual_mailbox_domains); one or the other."""

    path: str | None = setting(None, non_empty, example="/etc/postfix/vmail_domains")
    command: tuple[str, ...] | None = setting(None, list_of(non_empty), example=POSTCONF)

    def __attrs_post_init__(self) -> None:
        if self.path is not None and self.command is not None:
            raise BadValue("a postfix source reads a path or runs a command, not both")

    def source(self, kind: str, name: str) -> SourceConfig:
        command = POSTCONF if self.path is None and self.command is None else self.command
        return SourceTable.source(attrs.evolve(self, command=command), kind, name)


@attrs.frozen
class DovecotSource(SourceTable):
    """Dovecot: the domains of the users of its passwd-file."""

    path: str = setting("/etc/dovecot/users", non_empty)


#: The records of each `type` of [[slave.sources]] table.
SOURCES: dict[str, type[SourceTable]] = {
    "static": StaticSource,
    "cpanel": CpanelSource,
    "directadmin": DirectAdminSource,
    "plesk": PleskSource,
    "postfix": PostfixSource,
    "dovecot": DovecotSource,
}
SOURCE_TYPES = tuple(SOURCES)


def _sources(value: object) -> tuple[SourceConfig, ...]:
    if not isinstance(value, list) or not all(isinstance(table, dict) for table in value):
        raise BadValue("expected [[slave.sources]] tables")
    sources: list[SourceConfig] = []
    for index, table in enumerate(value):
        try:
            sources.append(_source(dict(table), taken={source.name for source in sources}))
        except BadValue as exc:
            raise exc.under(f"[{index}]") from None
    return tuple(sources)


def _source(table: dict[str, Any], taken: set[str]) -> SourceConfig:
    kind, name = table.pop("type", None), table.pop("name", None)
    if kind not in SOURCE_TYPES:
        raise BadValue(f"{'missing' if kind is None else repr(kind)}: one of {', '.join(SOURCE_TYPES)}", "type")
    if name is None:
        name = kind
    if not isinstance(name, str) or not name or name in taken:
        raise BadValue(f"{name!r} must be a unique non-empty string (give each source a name)", "name")
    return read_table(SOURCES[kind], table).source(kind, name)


@attrs.frozen
class SlaveSection:
    """How a slave watches its domain sources and probes its services."""

    sources: tuple[SourceConfig, ...] = setting(
        (),
        _sources,
        doc="Where the domains hosted here are listed: one [[slave.sources]] table per source, and the union"
        ' of their domains is published; changes are picked up live. name = "..." tells two sources of one'
        " type apart (it is the type by default). The paths and commands shown are the defaults.",
        kind="tables",
        schema=SOURCES,
    )
    poll_interval: float = setting(1.0, seconds(0.05), doc="How often source files are checked for changes (seconds).")
    settle: float = setting(
        2.0,
        seconds(0),
        doc="A changed file is read once it has stayed unchanged this long, so that a file being rewritten"
        " is never published half.",
    )
    command_interval: float = setting(30.0, seconds(1), doc="How often command sources (plesk, postconf) run.")
    probe_interval: float = setting(5.0, seconds(0.1), doc="How often each of the [endpoints] is probed.")
    probe_timeout: float = setting(
        2.0, seconds(0.05), doc="The time a probe allows to connect and read the greeting (below probe_interval)."
    )

    def __attrs_post_init__(self) -> None:
        if self.probe_timeout >= self.probe_interval:
            raise BadValue("must be shorter than slave.probe_interval", "probe_timeout")


# --- [proxy] --------------------------------------------------------------------------------

#: The proxy's listeners: name -> (default port, whether TLS starts at the first byte).
PROXY_LISTENERS: dict[str, tuple[int, bool]] = {
    "imap": (143, False),
    "imaps": (993, True),
    "pop3": (110, False),
    "pop3s": (995, True),
    "submission": (587, False),
    "submissions": (465, True),
}


_PROTOCOL_NAMES = {name: "submission" if "sub" in name else name.rstrip("s").upper() for name in PROXY_LISTENERS}


def _ca_files(value: object) -> dict[str, str]:
    expect(value, dict, "a table of node name = CA file")
    return mapping_of(non_empty, what="node name")(value)


def _listener(value: object) -> Address | None:
    """A listen address, or off (false or "")."""
    if value is False or value == "":
        return None
    return address(port_zero=True)(value)


def _loopback(where: Address) -> bool:
    try:
        return ipaddress.ip_address(where.host).is_loopback
    except ValueError:
        return where.host == "localhost"


def _proxy_settings() -> Iterator[Setting]:
    for name, (port, tls) in PROXY_LISTENERS.items():
        how = "TLS from the first byte" if tls else "STARTTLS offered when proxy.cert is set"
        yield Setting(
            name,
            _listener,
            Address("0.0.0.0", port),
            doc=f"Where {_PROTOCOL_NAMES[name]} clients connect ({how}); false turns it off.",
        )


def _proxy_listeners(values: dict[str, Any]) -> Mapping[str, Address]:
    merged = {name: values.get(name, Address("0.0.0.0", port)) for name, (port, _) in PROXY_LISTENERS.items()}
    return {name: where for name, where in merged.items() if where is not None}


@attrs.frozen
class ProxySection:
    """The IMAP, POP3 and submission proxy of a master: each login goes to the slave that hosts
    the user's domain. Without proxy.cert and proxy.key nothing can be encrypted, so only the
    plain listeners on loopback addresses may be on (for a local webmail or a TLS terminator)."""

    listeners: Mapping[str, Address] = group(_proxy_settings(), _proxy_listeners, factory=dict)
    cert: str | None = setting(
        None,
        non_empty,
        doc="Certificate (PEM, with its chain) clients see, for STARTTLS and the TLS ports: one they trust, for"
        " the names they connect to (not the cluster CA's).",
        example="/etc/meshmail/mail.pem",
    )
    key: str | None = setting(None, non_empty, doc="Its private key (PEM).", example="/etc/meshmail/mail.key")
    require_tls: bool = setting(
        True,
        boolean,
        doc="Refuse a login before TLS from clients that are not on a loopback address.",
    )
    default_domain: str | None = setting(
        None,
        non_empty,
        doc="Domain of users who log in with a bare name (no @domain); without it they are refused.",
        example="example.com",
    )
    backend_ca: str | None = setting(
        None,
        non_empty,
        doc="CA file the slaves' certificates are checked against (STARTTLS and TLS endpoints); by default"
        " the cluster CA (tls.ca). proxy.backend_cas names one per slave.",
        example="/etc/ssl/certs/ca-certificates.crt",
    )
    backend_cas: Mapping[str, str] = setting(
        attrs.Factory(dict),
        _ca_files,
        doc="A CA file for the certificates of one slave, by node name (one whose mail server has its own"
        " certificate).",
        example={"s1": "/etc/meshmail/s1-dovecot.pem"},
    )
    tls_verify: bool = setting(
        True,
        boolean,
        doc="Check the slaves' certificates. false encrypts without checking who answers (logged at start).",
    )
    max_sessions: int = setting(5000, integer, doc="Sessions open at once on this master, all protocols.")
    max_sessions_per_client: int = setting(50, integer, doc="Sessions open at once from one client address.")
    login_timeout: float = setting(60.0, seconds(1), doc="Time a client has to log in (seconds).")
    imap_idle: float = setting(1860.0, seconds(1), doc="Silence after an IMAP login before the session ends.")
    pop3_idle: float = setting(600.0, seconds(1), doc="Silence after a POP3 login before the session ends.")
    smtp_idle: float = setting(300.0, seconds(1), doc="Silence after a submission login before the session ends.")
    failure_delay: float = setting(
        3.0,
        seconds(0),
        doc='Seconds from a client\'s credentials to a "wrong credentials" answer, whether the password or the'
        " domain was wrong; doubled for each recent failure from the client address or on the account (up to"
        " 15 s). Keep it above the slaves' own delay (Dovecot's auth_failure_delay, 2 s), so both take as long.",
    )
    failures_per_client: int = setting(
        20,
        integer,
        doc="Failed logins from one client address within failure_window; more are refused for a while.",
    )
    failures_per_account: int = setting(
        10,
        integer,
        doc="Failed logins on one account from addresses it never logged in from, within failure_window; more"
        " are refused for a while (an address it logged in from has a budget of its own).",
    )
    failure_window: float = setting(300.0, seconds(1), doc="The window failed logins are counted in (seconds).")
    drain_timeout: float = setting(
        30.0,
        seconds(0),
        doc="When the node leaves (SIGTERM, meshmail leave): how long open sessions may go on before they are"
        " ended (IMAP BYE, POP3 -ERR, SMTP 421) so that clients reconnect through another master.",
    )

    def __attrs_post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise BadValue("cert and key go together", "key" if self.key is None else "cert")
        for name, where in self.listeners.items():
            if self.cert is None and PROXY_LISTENERS[name][1]:
                raise BadValue("needs proxy.cert and proxy.key (or false to turn it off)", name)
            if self.cert is None and not _loopback(where):
                raise BadValue(
                    f"{where} is not a loopback address: without proxy.cert and proxy.key, passwords would cross"
                    " the network in clear (set them, or listen on 127.0.0.1, or false to turn it off)",
                    name,
                )
        for name in ("max_sessions", "max_sessions_per_client", "failures_per_client", "failures_per_account"):
            if getattr(self, name) < 1:
                raise BadValue("must be at least 1", name)

    @property
    def tls(self) -> bool:
        return self.cert is not None


# --- [mx] -----------------------------------------------------------------------------------


def _mx_listener(value: object) -> Address | None:
    if value is False:
        return None
    return address(port_zero=True)(value)


def _mailbox(value: object) -> str:
    """A mail address "local@domain", in its normal form."""
    try:
        return str(normalize_address(non_empty(value)))
    except InvalidName as exc:
        raise BadValue(f"not a mail address: {exc}") from None


def _optional_address(value: object) -> Address | None:
    if value is False or value == "":
        return None
    return address()(value)


@attrs.frozen
class MxSection:
    """The MX of a master: inbound mail for the cluster's domains. Mail for a slave that answers
    goes straight through (the 250 comes after the slave took it); mail for a slave that is down
    is kept on disk (fsync'd before the 250) and delivered when it is back. Mail for any other
    domain is refused: no master is an open relay. STARTTLS uses the [proxy] certificate."""

    listen: Address | None = setting(
        Address("0.0.0.0", MX_PORT),
        _mx_listener,
        doc="Where other mail servers connect (SMTP); false turns the MX off.",
    )
    hostname: str | None = setting(
        None,
        non_empty,
        doc="The name in the greeting and the Received header; by default the machine's fully qualified name.",
        example="mx1.example.net",
    )
    max_message_size: int = setting(
        25 * 1024 * 1024, integer, doc="Largest message accepted, in bytes (announced with SIZE)."
    )
    max_recipients: int = setting(100, integer, doc="Recipients accepted per message (452 past it).")
    max_sessions: int = setting(1000, integer, doc="SMTP sessions open at once on this master.")
    max_sessions_per_client: int = setting(20, integer, doc="SMTP sessions open at once from one client address.")
    connections_per_minute: int = setting(
        120, integer, doc="New connections one client address may open per minute; more get 421."
    )
    messages_per_minute: int = setting(
        240, integer, doc="Messages one client address may send per minute; more get 451 at MAIL."
    )
    greeting_delay: float = setting(
        0.0,
        seconds(0),
        doc="Seconds to wait before the greeting; a client that talks first is refused (spam software often"
        " does). 0 greets at once.",
    )
    command_timeout: float = setting(300.0, seconds(1), doc="Silence allowed between commands (RFC 5321: 5 min).")
    data_timeout: float = setting(600.0, seconds(1), doc="Silence allowed inside DATA (RFC 5321: 10 min).")
    memory: int = setting(
        256 * 1024 * 1024,
        integer,
        doc="Bytes of messages held in memory at once across sessions while they are received; a message past"
        " it gets 452 (try later).",
    )
    verify_recipients: bool = setting(
        True,
        boolean,
        doc="Ask the slave about each recipient at RCPT (answers kept for a minute), so unknown users are refused"
        " there and no bounce goes to forged senders. A slave that is down cannot be asked: its mail is accepted.",
    )
    delivery_timeout: float = setting(
        120.0, seconds(1), doc="Time a slave has to take one message, from connect to its last reply (seconds)."
    )
    retry_min: float = setting(60.0, seconds(1), doc="First wait before a queued message is tried again (seconds).")
    retry_max: float = setting(3600.0, seconds(1), doc="Longest wait between tries; the wait doubles up to it.")
    queue_lifetime: float = setting(
        5 * 86400.0,
        seconds(60, 30 * 86400),
        doc="Time a message may wait in the queue before it is bounced (seconds; up to 30 days).",
    )
    delay_warning: float = setting(
        4 * 3600.0,
        seconds(0),
        doc="After this long in the queue the sender is told the message is delayed (once); 0 never tells.",
    )
    shadow: bool = setting(
        True,
        boolean,
        doc="Before the 250 for a message it queues, store a copy on one other master (over the nodes' mutual"
        " TLS), which delivers it if this master stays dead for shadow_takeover. Needs [tls].",
    )
    shadow_listen: Address | None = setting(
        Address("0.0.0.0", SHADOW_PORT),
        _mx_listener,
        doc="Where other masters store their shadow copies here (TCP, mutual TLS with the cluster's node"
        " certificates); false keeps none here.",
    )
    shadow_takeover: float = setting(
        600.0,
        seconds(1),
        doc="How long the master that queued a message must stay dead before the master holding its shadow"
        " copy delivers it (seconds).",
    )
    smarthost: Address | None = setting(
        None,
        _optional_address,
        doc="Where bounces and delay notices to senders outside the cluster go (host:port, SMTP; STARTTLS when"
        " offered), queued and retried as other mail; without it they are not sent, only logged and counted"
        " (bounces_unsent).",
        example="192.0.2.25:25",
    )
    smarthost_tls_verify: bool = setting(
        True,
        boolean,
        doc="Check the smarthost's certificate (smarthost_ca, its host name) when it offers STARTTLS; false takes"
        " any certificate. A smarthost that offers no STARTTLS is spoken to in plain text either way.",
    )
    smarthost_ca: str | None = setting(
        None,
        non_empty,
        doc="CA file the smarthost's certificate is checked against; by default the system's CAs.",
        example="/etc/ssl/certs/ca-certificates.crt",
    )
    postmaster: str | None = setting(
        None,
        _mailbox,
        doc="Where mail to <postmaster> and <postmaster@HOSTNAME> goes (RFC 5321 wants it taken): an address in"
        " a domain of the cluster, which becomes the envelope recipient. Unset: such mail is refused (550 5.1.1).",
        example="hostmaster@example.com",
    )

    def __attrs_post_init__(self) -> None:
        for name in ("max_message_size", "max_recipients", "max_sessions", "max_sessions_per_client",
                     "connections_per_minute", "messages_per_minute", "memory"):  # fmt: skip
            if getattr(self, name) < 1:
                raise BadValue("must be at least 1", name)
        if self.retry_max < self.retry_min:
            raise BadValue("must be at least retry_min", "retry_max")


# --- the file -------------------------------------------------------------------------------


@attrs.frozen
class Config:
    """One node's configuration as loaded from `path`."""

    path: str
    node: NodeSection = section(NodeSection, doc="This node.")
    gossip: GossipSection = section(
        GossipSection,
        doc="Membership: nodes find each other and watch each other's health over UDP and TCP,"
        " encrypted with the cluster's keys.",
    )
    http: HttpSection = section(
        HttpSection,
        HttpSection(),
        doc="The HTTP API: status (GET /status, open), admin API (needs a login or an API token) and joins.",
    )
    tls: TlsSection | None = section(
        TlsSection,
        None,
        doc="The node's certificate from the cluster CA (init and join write these files). With this section"
        " the HTTP API speaks only TLS. Relative paths are under node.data_dir.",
    )
    endpoints: Mapping[str, EndpointConfig] = setting(
        attrs.Factory(dict),
        mapping_of(_endpoint, known=SERVICES, what="service"),
        doc="Services this node offers, told to the cluster with its metadata: on a slave, the mail services"
        f' masters route to. Known services: {", ".join(SERVICES)}. A bare "host:port" is plain TCP with'
        " no client address; a table says more:",
        example={
            "imap": {"address": "192.0.2.10:143", "transport": "starttls", "client_address": "id"},
            "pop3": {"address": "192.0.2.10:110", "transport": "starttls"},
            "lmtp": "192.0.2.10:24",
            "submission": {"address": "192.0.2.10:587", "transport": "starttls", "client_address": "xclient"},
        },
        roles=("slave",),
        kind="mapping",
        schema=EndpointConfig,
    )
    tags: Mapping[str, str] = setting(
        attrs.Factory(dict),
        mapping_of(string),
        doc=f"Free-form labels gossiped with the node (all of its metadata must fit in {MAX_META} bytes).",
        example={"datacenter": "fra1"},
        kind="mapping",
    )
    slave: SlaveSection = section(
        SlaveSection,
        SlaveSection(),
        doc='What a slave (node.role = "slave") publishes, and how it watches it.',
        roles=("slave",),
    )
    proxy: ProxySection | None = section(
        ProxySection,
        None,
        doc="The IMAP, POP3 and submission proxy of a master (without this table a master proxies nothing)."
        " Relative paths are under node.data_dir.",
        roles=("master",),
    )

    mx: MxSection = section(
        MxSection,
        MxSection(),
        doc="The MX of a master: inbound mail for the cluster's domains, straight to the slave or kept on disk"
        " until it is back. On by default on masters (port 25).",
        roles=("master",),
    )

    def __attrs_post_init__(self) -> None:
        try:
            self.node_meta.encode()
        except ValueError as exc:
            raise BadValue(str(exc), "tags") from None

    @property
    def node_meta(self) -> NodeMeta:
        """The metadata this config describes (every endpoint up until a probe says otherwise)."""
        endpoints = {
            service: Endpoint(e.address, e.transport, e.client_address) for service, e in self.endpoints.items()
        }
        return NodeMeta(role=self.node.role, endpoints=endpoints, tags=dict(self.tags))
