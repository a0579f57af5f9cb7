"""meshmail's TOML configuration, loaded strictly into frozen attrs records.

An unknown key, a value of the wrong type or a missing required key is a ConfigError whose
message is one line naming the file and the dotted key. Gossip timings start from a named
profile (meshmail.gossip.config) and every field of it can be overridden in [gossip].
This module reads files and checks values; it starts nothing.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .core.address import Address, AddressError
from .core.errors import MeshmailError
from .core.nodes import DEFAULT_DATA_DIR, DEFAULT_GOSSIP_PORT, DEFAULT_HTTP_PORT, ROLES, check_node_name
from .gossip.config import PROFILES, GossipConfig, profile
from .gossip.keyring import KeyringError, decode_key
from .nodemeta import CLIENT_ADDRESS, SERVICES, TRANSPORTS, Endpoint, NodeMeta

DEFAULT_PATH = "/etc/meshmail/meshmail.toml"


class ConfigError(MeshmailError):
    """A configuration that cannot be used. str() is one line: ``FILE: KEY: problem``."""


class _Bad(ValueError):
    """A value a field parser refuses; `where` extends the key (``[2]`` for a list item)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


# --- field parsers: value from TOML -> checked value, or _Bad ---------------------------


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def _expect(value: object, kind: type | tuple[type, ...], what: str) -> None:
    # bool is an int subclass, but `probe_interval = true` is surely a mistake.
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise _Bad(f"expected {what}, got {_kind(value)}")


def _string(value: object) -> str:
    _expect(value, str, "a string")
    return value


def _non_empty(value: object) -> str:
    if not _string(value):
        raise _Bad("must not be empty")
    return value


def _node_name(value: object) -> str:
    try:
        return check_node_name(_string(value))
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _integer(value: object) -> int:
    _expect(value, int, "an integer")
    return value


def _number(value: object) -> float:
    _expect(value, (int, float), "a number")
    return float(value)


def _boolean(value: object) -> bool:
    _expect(value, bool, "a boolean (true or false)")
    return value


def _seconds(low: float) -> Callable[[object], float]:
    """A duration of `low` seconds (a floor that keeps a loop from spinning) to a day."""

    def parse(value: object) -> float:
        number = _number(value)
        if not low <= number <= 86400:
            raise _Bad(f"must be {low:g} to 86400 seconds")
        return number

    return parse


def _choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if _string(value) not in options:
            raise _Bad(f"{value!r} is not one of {', '.join(options)}")
        return value

    return parse


def _address(*, port_zero: bool = False, ip: bool = False) -> Callable[[object], Address]:
    def parse(value: object) -> Address:
        try:
            return Address.parse(value, port_zero=port_zero, ip=ip)
        except AddressError as exc:
            raise _Bad(str(exc)) from None

    return parse


def _list_of(item: Callable[[object], Any]) -> Callable[[object], tuple]:
    def parse(value: object) -> tuple:
        _expect(value, list, "an array")
        items = []
        for index, element in enumerate(value):
            try:
                items.append(item(element))
            except _Bad as exc:
                raise _Bad(str(exc), f"[{index}]{exc.where}") from None
        return tuple(items)

    return parse


def _key(value: object) -> bytes:
    _expect(value, str, "a base64 string")
    try:
        return decode_key(value)
    except KeyringError as exc:
        raise _Bad(str(exc)) from None


def _gossip_override(kind: type) -> Callable[[object], Any]:
    return {bool: _boolean, int: _integer, float: _number}[kind]


# --- records ----------------------------------------------------------------------------


@attrs.frozen
class NodeSection:
    name: str
    role: str = "master"
    data_dir: str = DEFAULT_DATA_DIR


@attrs.frozen
class GossipSection:
    cluster: str
    #: Decoded keys, primary first; empty when they live in DATA_DIR/keyring.json (which wins
    #: when both exist: it follows rotations). Left out of repr: key material is never logged.
    keys: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    bind: Address = Address("0.0.0.0", DEFAULT_GOSSIP_PORT)
    #: The address other members reach us at, when it differs from `bind`.
    advertise: Address | None = None
    seeds: tuple[Address, ...] = ()
    settings: GossipConfig = attrs.Factory(GossipConfig)


@attrs.frozen
class HttpSection:
    bind: Address = Address("127.0.0.1", DEFAULT_HTTP_PORT)
    #: The address other nodes and joining servers reach this node's HTTP API at, when it
    #: differs from `bind` (the default is the bind address, or the gossip advertise host).
    advertise: Address | None = None


@attrs.frozen
class TlsSection:
    """The node's certificate files (absolute paths; relative ones in the file are under
    node.data_dir). With this section the HTTP API speaks TLS only."""

    ca: str
    cert: str
    key: str
    #: The cluster CA's key: masters only, to sign the certificates of joining nodes.
    ca_key: str | None = None


@attrs.frozen
class EndpointConfig:
    """A service this node offers ([endpoints]): `imap = "host:port"` or a table."""

    address: str
    transport: str = "plain"
    client_address: str = "none"
    #: Whether a slave probes it (connect, read the greeting) and publishes it down when it fails.
    probe: bool = True


#: Domain source types ([[slave.sources]] type = ...) and their defaults.
SOURCE_TYPES = ("static", "cpanel", "directadmin", "plesk", "postfix", "dovecot")


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


@attrs.frozen
class SlaveSection:
    """How a slave watches its domain sources and probes its services."""

    sources: tuple[SourceConfig, ...] = ()
    #: How often source files are checked for changes, and how long a changed file must stay
    #: unchanged before it is read as final (a file being rewritten is never published half).
    poll_interval: float = 1.0
    settle: float = 2.0
    #: How often command sources (plesk, postconf) are run.
    command_interval: float = 30.0
    #: Health probes of the [endpoints]: interval and the time allowed for the greeting.
    probe_interval: float = 5.0
    probe_timeout: float = 2.0


@attrs.frozen
class Config:
    """One node's configuration as loaded from `path`."""

    path: str
    node: NodeSection
    gossip: GossipSection
    http: HttpSection = HttpSection()
    tls: TlsSection | None = None
    endpoints: Mapping[str, EndpointConfig] = attrs.Factory(dict)
    tags: Mapping[str, str] = attrs.Factory(dict)
    slave: SlaveSection = SlaveSection()

    @property
    def node_meta(self) -> NodeMeta:
        """The metadata this config describes (every endpoint up until a probe says otherwise)."""
        endpoints = {
            service: Endpoint(e.address, e.transport, e.client_address) for service, e in self.endpoints.items()
        }
        return NodeMeta(role=self.node.role, endpoints=endpoints, tags=dict(self.tags))


# --- loading ----------------------------------------------------------------------------

_REQUIRED = object()
_ABSENT = object()

_Fields = dict[str, tuple[Callable[[object], Any], Any]]

_NODE: _Fields = {
    "name": (_node_name, _REQUIRED),
    "role": (_choice(*ROLES), "master"),
    "data_dir": (_non_empty, DEFAULT_DATA_DIR),
}
_GOSSIP_TUNABLES: _Fields = {
    name: (_gossip_override(kind), _ABSENT)
    for name, kind in typing.get_type_hints(GossipConfig).items()
    if name != "profile"
}
_GOSSIP: _Fields = {
    "bind": (_address(port_zero=True, ip=True), Address("0.0.0.0", DEFAULT_GOSSIP_PORT)),
    "advertise": (_address(ip=True), None),
    "cluster": (_non_empty, _REQUIRED),
    "keys": (_list_of(_key), ()),
    "seeds": (_list_of(_address()), ()),
    "profile": (_choice(*PROFILES), "lan"),
    **_GOSSIP_TUNABLES,
}
_HTTP: _Fields = {
    "bind": (_address(port_zero=True), Address("127.0.0.1", DEFAULT_HTTP_PORT)),
    "advertise": (_address(), None),
}
_TLS: _Fields = {
    "ca": (_non_empty, _REQUIRED),
    "cert": (_non_empty, _REQUIRED),
    "key": (_non_empty, _REQUIRED),
    "ca_key": (_non_empty, None),
}
_ENDPOINT: _Fields = {
    "address": (lambda value: str(_address()(value)), _REQUIRED),
    "transport": (_choice(*TRANSPORTS), "plain"),
    "client_address": (_choice(*CLIENT_ADDRESS), "none"),
    "probe": (_boolean, True),
}
_SLAVE: _Fields = {
    "sources": (lambda value: value, ()),  # checked by _Reader.slave
    "poll_interval": (_seconds(0.05), 1.0),
    "settle": (_seconds(0), 2.0),
    "command_interval": (_seconds(1), 30.0),
    "probe_interval": (_seconds(0.1), 5.0),
    "probe_timeout": (_seconds(0.05), 2.0),
}
#: The fields of each source type: (field, parse, default).
_SOURCE_FIELDS: dict[str, _Fields] = {
    "static": {"domains": (_list_of(_non_empty), _REQUIRED)},
    "cpanel": {
        "userdomains": (_non_empty, "/etc/userdomains"),
        "localdomains": (_non_empty, "/etc/localdomains"),
        "remotedomains": (_non_empty, "/etc/remotedomains"),
    },
    "directadmin": {"path": (_non_empty, "/etc/virtual/domains")},
    "plesk": {"command": (_list_of(_non_empty), ("plesk", "bin", "domain", "--list"))},
    "postfix": {"path": (_non_empty, None), "command": (_list_of(_non_empty), None)},
    "dovecot": {"path": (_non_empty, "/etc/dovecot/users")},
}
_SECTIONS = ("node", "gossip", "http", "tls", "endpoints", "tags", "slave")


def load(path: str) -> Config:
    """Read and check the TOML file at `path`. Raises ConfigError."""
    try:
        with open(path, "rb") as file:
            text = file.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return loads(text, path)


def loads(text: str, path: str = "<config>") -> Config:
    """Check the TOML document `text`; `path` names it in errors. Raises ConfigError."""
    return _Reader(path).config(text)


@attrs.define
class _Reader:
    path: str

    def fail(self, key: str, problem: str) -> typing.NoReturn:
        raise ConfigError(f"{self.path}: {key}: {problem}")

    def unknown(self, key: str, known: typing.Iterable[str]) -> typing.NoReturn:
        section, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f" (did you mean {'.'.join(filter(None, [section, close[0]]))}?)" if close else ""
        self.fail(key, f"unknown key{hint}")

    def table(self, document: dict, name: str) -> dict:
        value = document.get(name, {})
        if not isinstance(value, dict):
            self.fail(name, f"expected a table [{name}], got {_kind(value)}")
        return value

    def section(self, document: dict, name: str, fields: _Fields) -> dict[str, Any]:
        return self.fields(self.table(document, name), name, fields)

    def fields(self, table: dict, name: str, fields: _Fields) -> dict[str, Any]:
        """The values of `fields` in `table` (named `name` in errors), checked and defaulted."""
        for key in table:
            if key not in fields:
                self.unknown(f"{name}.{key}", fields)
        values = {}
        for key, (parse, default) in fields.items():
            if key not in table:
                if default is _REQUIRED:
                    self.fail(f"{name}.{key}", "missing (required)")
                if default is not _ABSENT:
                    values[key] = default
                continue
            try:
                values[key] = parse(table[key])
            except _Bad as exc:
                self.fail(f"{name}.{key}{exc.where}", str(exc))
        return values

    def mapping(self, document: dict, name: str, known: tuple[str, ...] | None, parse: Callable) -> dict[str, Any]:
        values = {}
        for key, value in self.table(document, name).items():
            if known is not None and key not in known:
                self.fail(f"{name}.{key}", f"unknown service (known: {', '.join(known)})")
            try:
                values[key] = parse(value)
            except _Bad as exc:
                self.fail(f"{name}.{key}", str(exc))
        return values

    def config(self, text: str) -> Config:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self.path}: invalid TOML: {exc}") from None
        for key in document:
            if key not in _SECTIONS:
                self.unknown(key, _SECTIONS)
        node = self.section(document, "node", _NODE)
        gossip = self.section(document, "gossip", _GOSSIP)
        if "keys" in self.table(document, "gossip") and not gossip["keys"]:
            self.fail("gossip.keys", "needs at least one key (generate one with: meshmail keygen)")
        if gossip["advertise"] is None and gossip["bind"].unspecified:
            self.fail("gossip.advertise", f"required when gossip.bind is {gossip['bind']}")
        endpoints = self.endpoints(document)
        tags = self.mapping(document, "tags", None, _string)
        config = Config(
            path=self.path,
            node=NodeSection(**node),
            gossip=GossipSection(settings=self.gossip_settings(gossip), **gossip),
            http=HttpSection(**self.section(document, "http", _HTTP)),
            tls=self.tls(document, node["data_dir"]),
            endpoints=endpoints,
            tags=tags,
            slave=self.slave(document),
        )
        try:
            config.node_meta.encode()
        except ValueError as exc:
            self.fail("tags", str(exc))
        return config

    def endpoints(self, document: dict) -> dict[str, EndpointConfig]:
        endpoints = {}
        for service, value in self.table(document, "endpoints").items():
            where = f"endpoints.{service}"
            if service not in SERVICES:
                self.fail(where, f"unknown service (known: {', '.join(SERVICES)})")
            if isinstance(value, dict):
                endpoints[service] = EndpointConfig(**self.fields(value, where, _ENDPOINT))
                continue
            try:
                endpoints[service] = EndpointConfig(_ENDPOINT["address"][0](value))
            except _Bad as exc:
                self.fail(where, str(exc))
        return endpoints

    def slave(self, document: dict) -> SlaveSection:
        values = self.section(document, "slave", _SLAVE)
        sources = values.pop("sources")
        if not isinstance(sources, list | tuple) or not all(isinstance(s, dict) for s in sources):
            self.fail("slave.sources", "expected [[slave.sources]] tables")
        parsed: list[SourceConfig] = []
        for index, table in enumerate(sources):
            where = f"slave.sources[{index}]"
            table = dict(table)
            kind, name = table.pop("type", None), table.pop("name", None)
            if kind not in SOURCE_TYPES:
                problem = "missing" if kind is None else repr(kind)
                self.fail(f"{where}.type", f"{problem}: one of {', '.join(SOURCE_TYPES)}")
            if name is None:
                name = kind
            if not isinstance(name, str) or not name or any(s.name == name for s in parsed):
                self.fail(f"{where}.name", f"{name!r} must be a unique non-empty string (give each source a name)")
            fields = self.fields(table, where, _SOURCE_FIELDS[kind])
            command = tuple(fields.pop("command", None) or ())
            domains = tuple(fields.pop("domains", ()))
            if kind == "postfix" and bool(fields.get("path")) == bool(command):
                if not command and not fields.get("path"):
                    command = ("postconf", "-xh", "virtual_mailbox_domains")
                else:
                    self.fail(where, "a postfix source reads a path or runs a command, not both")
            paths = {key: path for key, path in fields.items() if path is not None}
            parsed.append(SourceConfig(kind, name, domains, paths, command))
        if values["probe_timeout"] >= values["probe_interval"]:
            self.fail("slave.probe_timeout", "must be shorter than slave.probe_interval")
        return SlaveSection(sources=tuple(parsed), **values)

    def tls(self, document: dict, data_dir: str) -> TlsSection | None:
        if "tls" not in document:
            return None
        files = self.section(document, "tls", _TLS)
        return TlsSection(**{name: path and os.path.join(data_dir, path) for name, path in files.items()})

    def gossip_settings(self, gossip: dict[str, Any]) -> GossipConfig:
        """Pop the profile and its overrides from `gossip`; check each override alone so
        that an error names its key."""
        name = gossip.pop("profile")
        overrides = {key: gossip.pop(key) for key in _GOSSIP_TUNABLES if key in gossip}
        for key, value in overrides.items():
            try:
                profile(name, **{key: value})
            except (TypeError, ValueError) as exc:
                self.fail(f"gossip.{key}", f"invalid value {value!r}: {exc}")
        try:
            return profile(name, **overrides)
        except (TypeError, ValueError) as exc:
            self.fail("gossip", str(exc))
