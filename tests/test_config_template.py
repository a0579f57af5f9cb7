"""The documented config: deploy/meshmail.toml is the generated template, and every
template (the example, what init and join write) loads back with the values it was given."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest
from helpers.config import new_key_b64

from meshmail.config import (
    Config,
    HttpSection,
    NodeSection,
    SlaveSection,
    TlsSection,
    loads,
    template,
)
from meshmail.config.schema import Setting, settings_of
from meshmail.config.sections import SOURCES
from meshmail.core.address import Address
from meshmail.gossip.config import GossipConfig, profile
from meshmail.security.bootstrap import Placement, render_config

EXAMPLE = Path(__file__).parent.parent / "deploy" / "meshmail.toml"
REGENERATE = "python -m meshmail.config --template > deploy/meshmail.toml"


def test_the_example_config_is_the_generated_template():
    assert EXAMPLE.read_text() == template.example(), f"deploy/meshmail.toml is out of date; run: {REGENERATE}"


def test_the_template_command_prints_it():
    command = [sys.executable, "-m", "meshmail.config", "--template"]
    printed = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    assert printed.stdout == template.example()


def test_the_example_loads_with_its_example_values():
    key = new_key_b64()
    config = loads(template.example().replace("<output of: meshmail keygen>", key), str(EXAMPLE))
    assert config.node == NodeSection("mx1", "master", "/var/lib/meshmail")
    assert (config.gossip.cluster, config.gossip.advertise) == ("example", ("192.0.2.10", 7946))
    assert len(config.gossip.seeds) == 3 and config.gossip.settings == profile("lan")
    assert config.http == HttpSection() and config.tls is None and config.slave == SlaveSection()


@pytest.mark.parametrize("role", ["master", "slave"])
def test_what_init_and_join_write_loads_back(role, tmp_path):
    data = tmp_path / "data"
    where = Placement("n1", role, data, "0.0.0.0", "10.0.0.5", gossip_port=7000, http_port=7001)
    text = render_config(where, "prod", ["10.0.0.1:7000", "[fd00::1]:7000"], profile="wan", how="meshmail join")
    assert text.startswith("# meshmail node configuration, written by `meshmail join` on ")
    config = loads(text, "n1.toml")
    assert config.node == NodeSection("n1", role, str(data))
    gossip = config.gossip
    assert (gossip.cluster, gossip.bind, gossip.advertise) == ("prod", ("0.0.0.0", 7000), ("10.0.0.5", 7000))
    assert gossip.seeds == (("10.0.0.1", 7000), ("fd00::1", 7000))
    assert gossip.keys == ()  # they are in the data dir's keyring.json
    assert gossip.settings == profile("wan")
    assert config.http == HttpSection(Address("0.0.0.0", 7001), Address("10.0.0.5", 7001))
    ca_key = str(data / "ca-key.pem") if role == "master" else None
    assert config.tls == TlsSection(str(data / "ca.pem"), str(data / "node.pem"), str(data / "node-key.pem"), ca_key)
    assert (config.endpoints, config.tags, config.slave) == ({}, {}, SlaveSection())


def test_a_generated_config_shows_what_its_role_uses():
    def text(role: str) -> str:
        where = Placement("n1", role, Path("/srv/mm"), "127.0.0.1", "127.0.0.1")
        return render_config(where, "c", [], profile="lan", how="meshmail init")

    master, slave = text("master"), text("slave")
    assert '\nca_key = "ca-key.pem"\n' in master and "ca_key" not in slave
    assert "# [endpoints]" not in master and "[[slave.sources]]" not in master
    assert "\n# [endpoints]\n" in slave and '\n# type = "cpanel"\n' in slave


def test_values_with_odd_characters_load_back_unchanged():
    odd = 'C:\\meshmail "data" é 💌\t\x7f'
    values = {
        "node": {"name": "n1", "data_dir": odd},
        "gossip": {"cluster": "c1", "bind": Address("::1", 7946), "seeds": []},
        "tags": {"rack 1": odd, "dc": "fra1"},
    }
    config = loads(template.render(values, title="A config\nwith a title of two lines"))
    assert config.node.data_dir == odd
    assert config.gossip.bind == ("::1", 7946)
    assert config.tags == {"rack 1": odd, "dc": "fra1"}


def every_setting() -> list[tuple[str, Setting]]:
    """Each key of the file, sub-tables and each type of [[slave.sources]] included."""
    found = []
    for table in settings_of(Config):
        found.append((table.name, table))
        for setting in settings_of(table.schema) if table.schema is not None else ():
            found.append((f"{table.name}.{setting.name}", setting))
            for kind, source in setting.schema.items() if setting.kind == "tables" else ():
                found += [(f"{table.name}.{kind}.{s.name}", s) for s in settings_of(source)]
    return found


@pytest.mark.parametrize(("key", "setting"), every_setting(), ids=[key for key, _ in every_setting()])
def test_the_value_each_key_shows_is_valid(key, setting):
    if setting.kind in ("table", "tables") or key == "gossip.keys":
        return  # tables are checked key by key; the key shown is a placeholder to replace
    shown = setting.shown({})
    value = tomllib.loads(f"v = {template.toml_value(shown)}")["v"]
    setting.parse(value)  # raises BadValue if the shown value would not load


def test_every_key_but_the_gossip_timings_is_documented():
    timings = set(attrs.fields_dict(GossipConfig)) - {"profile"}
    sources = {f"slave.{kind}." for kind in SOURCES}  # their record's docstring says it
    undocumented = [
        key
        for key, setting in every_setting()
        if not setting.doc and key.removeprefix("gossip.") not in timings and not key.startswith(tuple(sources))
    ]
    assert undocumented == []


def test_every_gossip_setting_is_in_the_template_with_its_documentation():
    text = template.example()
    for field in attrs.fields(GossipConfig):
        if field.name != "profile":
            assert f"\n# {field.name} = " in text
    assert "# Lifeguard local health: probe timeouts are scaled by up to this factor.\n" in text
    assert "# Profiles: lan 1.0, wan 5.0, local 1.0.\n# probe_interval = 1.0\n" in text
