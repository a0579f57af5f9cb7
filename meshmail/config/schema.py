"""How a config table is declared and read: attrs records whose fields carry their TOML key.

A field made by `setting()` is one key; `section()` is a table of keys ([node]);
`group()` reads several keys of a table into one attribute (a gossip profile and its
overrides). Each carries its parser, documentation and example as attrs metadata, so the
loader (read_table) and the template (meshmail.config.template) are derived from the
records. This module knows no particular section; the value parsers are shared by all.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from ..core.address import Address, AddressError
from ..core.nodes import check_cluster_name, check_node_name
from ..gossip.keyring import KeyringError, decode_key

Parser = Callable[[object], Any]
REQUIRED = attrs.NOTHING

_SETTING = "meshmail.config.setting"
_GROUP = "meshmail.config.group"


class BadValue(ValueError):
    """A value a parser refuses. `where` is the key it is about, relative to the table being
    read: "" for the value itself, "[2]" for a list item, "probe_timeout" for a key."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where

    def under(self, key: str) -> BadValue:
        """This error as seen from the table that holds `key`."""
        self.where = join_key(key, self.where)
        return self

    def describe(self) -> str:
        """``KEY: problem``, once `where` is the full dotted key."""
        return f"{self.where}: {self}"


class UnknownKey(BadValue):
    """A key that its table does not have."""

    def __init__(self, key: str, known: Iterable[str]) -> None:
        super().__init__("unknown key", key)
        close = difflib.get_close_matches(key, list(known), n=1)
        self.suggestion = close[0] if close else None

    def describe(self) -> str:
        if self.suggestion is None:
            return super().describe()
        parent = self.where.rpartition(".")[0]
        return f"{self.where}: unknown key (did you mean {join_key(parent, self.suggestion)}?)"


def join_key(outer: str, inner: str) -> str:
    """The dotted key of `inner` inside `outer` ("slave" + "sources[0]" + "type")."""
    if not outer or not inner:
        return outer or inner
    return outer + inner if inner.startswith("[") else f"{outer}.{inner}"


# --- declaring ------------------------------------------------------------------------------


@attrs.frozen
class Setting:
    """One key of a table, as the loader and the template see it."""

    name: str
    parse: Parser
    #: The record's default when the key is absent (REQUIRED: the key must be there).
    default: Any
    doc: str = ""
    #: What the example config and commented-out lines show (None: the default). A
    #: callable gets the values given for the table (a profile's own timings).
    example: Any = None
    #: Whether the example config (deploy/meshmail.toml) shows it commented out.
    commented: bool = True
    #: The roles whose generated config (init, join) shows it; empty for every role.
    roles: tuple[str, ...] = ()
    #: "value"; "table" ([node]: `schema` is its record); "mapping" ([tags]: names of the
    #: operator's choosing, `schema` the record of a table entry if any); "tables" (an array
    #: of tables, `schema` maps the `type` key of each to its record).
    kind: str = "value"
    schema: Any = None

    def shown(self, given: Mapping[str, Any]) -> Any:
        """The value a template shows when none is given."""
        value = self.default if self.example is None else self.example
        return value(given) if callable(value) else value


def setting(
    default: Any,
    parse: Parser,
    *,
    doc: str = "",
    example: Any = None,
    commented: bool = True,
    roles: tuple[str, ...] = (),
    kind: str = "value",
    schema: Any = None,
    repr: bool = True,  # the name attrs.field gives it
) -> Any:
    """An attrs field that is one TOML key of its table; `default` as in attrs.field
    (an attrs.Factory for a mutable one), REQUIRED when it has none."""
    meta = dict(parse=parse, doc=doc, example=example, commented=commented, roles=roles, kind=kind, schema=schema)
    return attrs.field(default=default, repr=repr, metadata={_SETTING: meta})


def section(schema: type, default: Any = REQUIRED, *, doc: str, roles: tuple[str, ...] = ()) -> Any:
    """An attrs field that is a table ([name]) read into the record `schema`. An absent
    table is read as an empty one, unless it has a default."""
    parse = functools.partial(read_table, schema)
    return setting(default, parse, doc=doc, roles=roles, kind="table", schema=schema)


@attrs.frozen
class Group:
    """Several keys of one table read into one attribute."""

    settings: tuple[Setting, ...]
    #: Builds the attribute from the values of the keys present; raises BadValue.
    combine: Callable[[dict[str, Any]], Any]


def group(settings: Iterable[Setting], combine: Callable[[dict[str, Any]], Any], *, factory: Callable) -> Any:
    """An attrs field read from the keys `settings` by `combine`."""
    return attrs.field(factory=factory, metadata={_GROUP: Group(tuple(settings), combine)})


@functools.cache
def settings_of(record: type) -> tuple[Setting, ...]:
    """The keys of the table that `record` is read from, in declaration order."""
    found: list[Setting] = []
    for field in attrs.fields(record):
        if _GROUP in field.metadata:
            found.extend(field.metadata[_GROUP].settings)
        elif _SETTING in field.metadata:
            default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
            found.append(Setting(field.name, default=default, **field.metadata[_SETTING]))
    return tuple(found)


def attribute_docs(record: type) -> dict[str, str]:
    """The ``#:`` comments above the attributes of `record` (the Sphinx convention), by
    name: how a record that carries no metadata documents its fields. Empty without source."""
    try:
        lines = inspect.getsource(record).splitlines()
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#:"):
            comment.append(text[2:].strip())
            continue
        attribute = re.match(r"(\w+)\s*:", text)
        if attribute and comment:
            docs[attribute.group(1)] = " ".join(comment)
        comment = []
    return docs


# --- reading --------------------------------------------------------------------------------


def read_table(record: type, table: Mapping[str, Any], **extra: Any) -> Any:
    """The `record` whose keys are in `table` (`extra` goes to the constructor as is).
    Unknown and missing keys, bad values and broken invariants raise BadValue."""
    settings = {s.name: s for s in settings_of(record)}
    for key in table:
        if key not in settings:
            raise UnknownKey(key, settings)
    values = {}
    for name, s in settings.items():
        if name in table:
            values[name] = _read(s, table[name])
        elif s.default is REQUIRED and s.kind == "table":
            values[name] = _read(s, {})  # so that the error names the first key it needs
        elif s.default is REQUIRED:
            raise BadValue("missing (required)", name)
    kwargs = dict(extra)
    for field in attrs.fields(record):
        if _GROUP in field.metadata:
            keys = field.metadata[_GROUP]
            kwargs[field.name] = keys.combine({s.name: values[s.name] for s in keys.settings if s.name in values})
        elif field.name in values:
            kwargs[field.name] = values[field.name]
    return record(**kwargs)


def _read(s: Setting, value: object) -> Any:
    try:
        if s.kind in ("table", "mapping") and not isinstance(value, dict):
            raise BadValue(f"expected a table [{s.name}], got {kind_of(value)}")
        return s.parse(value)
    except BadValue as exc:
        raise exc.under(s.name) from None


# --- value parsers: a value from TOML -> the checked value, or BadValue ---------------------


def kind_of(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def expect(value: object, kind: type | tuple[type, ...], what: str) -> None:
    # bool is an int subclass, but `probe_interval = true` is surely a mistake.
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise BadValue(f"expected {what}, got {kind_of(value)}")


def string(value: object) -> str:
    expect(value, str, "a string")
    return value


def non_empty(value: object) -> str:
    if not string(value):
        raise BadValue("must not be empty")
    return value


def node_name(value: object) -> str:
    try:
        return check_node_name(string(value))
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def cluster_name(value: object) -> str:
    try:
        return check_cluster_name(string(value))
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def integer(value: object) -> int:
    expect(value, int, "an integer")
    return value


def number(value: object) -> float:
    expect(value, (int, float), "a number")
    return float(value)


def boolean(value: object) -> bool:
    expect(value, bool, "a boolean (true or false)")
    return value


def seconds(low: float, high: float = 86400) -> Parser:
    """A duration of `low` seconds (a floor that keeps a loop from spinning) to `high` (a day)."""

    def parse(value: object) -> float:
        duration = number(value)
        if not low <= duration <= high:
            raise BadValue(f"must be {low:g} to {high:g} seconds")
        return duration

    return parse


def choice(*options: str) -> Parser:
    def parse(value: object) -> str:
        if string(value) not in options:
            raise BadValue(f"{value!r} is not one of {', '.join(options)}")
        return value

    return parse


def address(*, port_zero: bool = False, ip: bool = False) -> Parser:
    def parse(value: object) -> Address:
        try:
            return Address.parse(value, port_zero=port_zero, ip=ip)
        except AddressError as exc:
            raise BadValue(str(exc)) from None

    return parse


def list_of(item: Parser, *, at_least_one: str = "") -> Parser:
    """An array of `item`s; `at_least_one` is the complaint about an empty one, if refused."""

    def parse(value: object) -> tuple:
        expect(value, list, "an array")
        if at_least_one and not value:
            raise BadValue(at_least_one)
        items = []
        for index, element in enumerate(value):
            try:
                items.append(item(element))
            except BadValue as exc:
                raise exc.under(f"[{index}]") from None
        return tuple(items)

    return parse


def mapping_of(entry: Parser, *, known: tuple[str, ...] | None = None, what: str = "key") -> Parser:
    """A table of names of the operator's choosing (or of `known` ones) to `entry`s."""

    def parse(table: dict) -> dict[str, Any]:
        values = {}
        for name, value in table.items():
            if known is not None and name not in known:
                raise BadValue(f"unknown {what} (known: {', '.join(known)})", name)
            try:
                values[name] = entry(value)
            except BadValue as exc:
                raise exc.under(name) from None
        return values

    return parse


def gossip_key(value: object) -> bytes:
    expect(value, str, "a base64 string")
    try:
        return decode_key(value)
    except KeyringError as exc:
        raise BadValue(str(exc)) from None
