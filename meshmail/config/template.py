"""The documented meshmail.toml: every key of every section with its documentation, the
given values written out and the others commented out with their default or an example.

`meshmail init` and `meshmail join` write it with the new node's values; deploy/meshmail.toml
is it with the example values (python -m meshmail.config --template). Both load back.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.address import Address
from ..core.nodes import DEFAULT_DATA_DIR
from ..security import files
from .loader import DEFAULT_PATH
from .schema import Setting, settings_of
from .sections import Config

#: Longest comment line written.
WIDTH = 92

PREAMBLE = (
    "Every key is checked: a misspelled or unknown key stops the node with an error that names it, so"
    " nothing here is silently ignored. Keys shown commented out are optional; the value shown is the"
    ' default or an example. Addresses are "host:port"; write IPv6 hosts in brackets: "[2001:db8::5]:7946".'
)

EXAMPLE_TITLE = (
    "meshmail node configuration (TOML), every key described. `meshmail init` and `meshmail join` write"
    f" one like it into the data dir ({DEFAULT_DATA_DIR}/{files.CONFIG}); for a config written by hand,"
    f" copy this file to {DEFAULT_PATH} and edit it.\n"
    "Made by: python -m meshmail.config --template > deploy/meshmail.toml"
)

#: {section: {key: value}}; a mapping section ([tags]) holds its entries.
Values = Mapping[str, Mapping[str, Any]]


def render(values: Values, *, title: str, role: str | None = None) -> str:
    """The documented TOML config holding `values`, headed by the comment `title`. A table
    with no values given is commented out whole. `role` leaves out what only the other role
    uses (None: nothing is left out)."""
    lines = [*comment(title), *comment(PREAMBLE)]
    for table in _for(role, settings_of(Config)):
        lines += ["", *_table(table, values.get(table.name) or {}, role)]
    return "\n".join(lines) + "\n"


def example_values() -> dict[str, dict[str, Any]]:
    """The values the example config writes out: those of the keys not commented out in it."""
    values = {}
    for table in settings_of(Config):
        if table.kind == "table":
            written = {s.name: s.shown({}) for s in settings_of(table.schema) if not s.commented}
            values.update({table.name: written} if written else {})
    return values


def example() -> str:
    """deploy/meshmail.toml."""
    return render(example_values(), title=EXAMPLE_TITLE)


def _for(role: str | None, settings: Iterable[Setting]) -> list[Setting]:
    return [s for s in settings if role is None or not s.roles or role in s.roles]


def _table(table: Setting, given: Mapping[str, Any], role: str | None) -> list[str]:
    lines = comment(table.doc)
    if table.kind == "mapping" and table.schema is not None:
        lines += comment("\n".join(f"    {s.name}: {s.doc}" for s in settings_of(table.schema)))
    lines.append(f"[{table.name}]" if given else f"# [{table.name}]")
    if table.kind == "mapping":
        entries, mark = (given, "") if given else (table.shown({}), "# ")
        return lines + [f"{mark}{toml_key(name)} = {toml_value(value)}" for name, value in entries.items()]
    keys = _for(role, settings_of(table.schema))
    for key in keys:
        if key.kind == "value":
            lines += comment(key.doc)
            if key.name in given:
                lines.append(f"{key.name} = {toml_value(given[key.name])}")
            else:
                lines.append(f"# {key.name} = {toml_value(key.shown(given))}")
    for key in keys:
        if key.kind == "tables":
            lines += _array(f"{table.name}.{key.name}", key, given.get(key.name, ()))
    return lines


def _array(name: str, key: Setting, given: Iterable[Mapping[str, Any]]) -> list[str]:
    """An array of tables: the given ones, then each type of table documented."""
    lines = comment(key.doc)
    for table in given:
        lines += [f"[[{name}]]", *(f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items())]
    for kind, record in key.schema.items():
        lines += [
            "#",
            *comment(" ".join(inspect.getdoc(record).split())),
            f"# [[{name}]]",
            f"# type = {toml_value(kind)}",
        ]
        for s in settings_of(record):
            lines += [*comment(s.doc), f"# {s.name} = {toml_value(s.shown({}))}"]
    return lines


def comment(text: str) -> list[str]:
    """`text` as comment lines; each of its lines is wrapped, keeping its indent."""
    lines = []
    for line in text.splitlines():
        words = line.lstrip()
        indent = "# " + line[: len(line) - len(words)]
        more = indent + "  " if words != line else indent
        lines += textwrap.wrap(words, WIDTH, initial_indent=indent, subsequent_indent=more, break_on_hyphens=False)
    return lines


def toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else toml_value(name)


def toml_value(value: Any) -> str:
    """`value` (a str, bool, number, Address, or a list or mapping of them) in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Address):
        return toml_value(str(value))
    if isinstance(value, str):
        # JSON's escapes are TOML's, but for DEL, which TOML wants escaped too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML for {type(value).__name__}")
