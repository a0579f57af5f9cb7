"""Node config text for the tests: minimal configs, gossip keys, and edits of a config's
ports, advertise addresses and seeds (configs written by hand or by `meshmail init`/`join`)."""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile

#: The `meshmail` command as a subprocess argv prefix, for tests of the real CLI.
MESHMAIL = [sys.executable, "-m", "meshmail"]

#: Data folders minimal_config made; a session fixture in conftest.py removes them.
DATA_DIRS: list[str] = []


#: The MX of a test master: on loopback, a port from the kernel (the default, 0.0.0.0:25, is
#: one per machine).
MX_LOOPBACK = '[mx]\nlisten = "127.0.0.1:0"\nshadow_listen = "127.0.0.1:0"\n'
#: A slave of a test cluster that publishes and probes quickly (a [slave] table, sources apart).
QUICK_SLAVE = """
[slave]
poll_interval = 0.2
settle = 0.5
probe_interval = 0.5
probe_timeout = 0.4
"""


def new_key_b64() -> str:
    return base64.b64encode(os.urandom(32)).decode("ascii")


def minimal_config(name: str = "m1", *, key: str | None = None, extra: str = "", data_dir: str | None = None) -> str:
    """A valid config for one node on 127.0.0.1 with ports chosen by the kernel, its data
    in `data_dir` (a fresh temporary folder by default)."""
    if data_dir is None:
        data_dir = tempfile.mkdtemp(prefix="meshmail-test-")
        DATA_DIRS.append(data_dir)
    return f"""
[node]
name = "{name}"
data_dir = "{data_dir}"

[gossip]
bind = "127.0.0.1:0"
cluster = "test"
keys = ["{key or new_key_b64()}"]
profile = "local"

[http]
bind = "127.0.0.1:0"
{extra}
{"" if "[mx]" in extra else MX_LOOPBACK}"""


def set_key(text: str, section: str, key: str, value: str | None) -> str:
    """`text` with `key = value` in [section]: the line replaced, added at the section's end
    when absent, or removed when `value` is None. Comment lines are left alone."""
    lines = text.splitlines()
    start = lines.index(f"[{section}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    found = [i for i in range(start + 1, end) if lines[i].split("=", 1)[0].strip() == key]
    new = [] if value is None else [f"{key} = {value}"]
    if found:
        [at] = found
        lines[at : at + 1] = new
    else:
        last = max((i for i in range(start, end) if lines[i].strip()), default=start)
        lines[last + 1 : last + 1] = new
    return "\n".join(lines) + "\n"


def bound_to(text: str, gossip: int, http: int) -> str:
    """`text` with [gossip] and [http] bound to these ports (on their bind hosts) and without
    advertise addresses: a node the tests start advertises what it bound. Its MX and shadow
    store listen at ports from the kernel too (on loopback unless the config places them)."""
    for section, port in (("gossip", gossip), ("http", http)):
        host = _value(text, section, "bind").rsplit(":", 1)[0]
        text = set_key(text, section, "bind", json.dumps(f"{host}:{port}"))
        text = set_key(text, section, "advertise", None)
    if "\n[mx]" not in text:
        return text.rstrip("\n") + "\n\n" + MX_LOOPBACK
    for key in ("listen", "shadow_listen"):
        host = _value(text, "mx", key).rsplit(":", 1)[0]
        text = set_key(text, "mx", key, json.dumps(f"{host}:0"))
    return text


def with_seeds(text: str, seeds: list[str]) -> str:
    """`text` joining through `seeds` ("host:port" gossip addresses) at start."""
    return set_key(text, "gossip", "seeds", json.dumps(seeds))


def _value(text: str, section: str, key: str) -> str:
    lines = text.splitlines()
    for line in lines[lines.index(f"[{section}]") + 1 :]:
        if line.startswith("["):
            break
        name, _, value = line.partition("=")
        if name.strip() == key:
            return json.loads(value.split("#", 1)[0].strip())
    raise AssertionError(f"no {key} in [{section}] of:\n{text}")
