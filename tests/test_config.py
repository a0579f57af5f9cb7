"""The TOML config: what loads, and the one-line error for everything that must not."""

from __future__ import annotations

import base64
from pathlib import Path

import attrs
import pytest
from helpers.config import new_key_b64

from meshmail.config import ConfigError, load, loads
from meshmail.gossip.config import GossipConfig, profile
from meshmail.nodemeta import NodeMeta

KEY = new_key_b64()
NODE = {"name": '"m1"'}
GOSSIP = {"bind": '"127.0.0.1:7946"', "cluster": '"test"', "keys": f'["{KEY}"]'}
EXAMPLE = Path(__file__).parent.parent / "deploy" / "meshmail.toml"


def document(*, top: str = "", node: dict | None = None, gossip: dict | None = None, rest: str = "") -> str:
    """A config from the valid NODE and GOSSIP tables changed by `node` and `gossip`
    (a value of None removes the key), with `top` before the tables and `rest` after."""

    def table(name: str, base: dict, changes: dict | None) -> str:
        lines = [f"{key} = {value}" for key, value in {**base, **(changes or {})}.items() if value is not None]
        return "\n".join([f"[{name}]", *lines])

    return "\n".join([top, table("node", NODE, node), table("gossip", GOSSIP, gossip), rest, ""])


SOURCE = "[[slave.sources]]\n"


def b64_of(size: int) -> str:
    return base64.b64encode(b"k" * size).decode()


REJECTED = [
    # (case, document arguments, dotted key in the message, words in the message)
    (
        "unknown key",
        dict(gossip={"probe_intervall": "2"}),
        "gossip.probe_intervall",
        "did you mean gossip.probe_interval",
    ),
    ("unknown node key", dict(node={"nmae": '"x"'}), "node.nmae", "unknown key"),
    ("unknown section", dict(rest="[nodes]\nname = 'x'"), "nodes", "unknown key (did you mean node?)"),
    ("section not a table", dict(top="http = 3"), "http", "expected a table [http], got an integer"),
    ("name not a string", dict(node={"name": "3"}), "node.name", "expected a string, got an integer"),
    ("empty name", dict(node={"name": '""'}), "node.name", "a node name is 1 to 63"),
    ("long name", dict(node={"name": '"' + "n" * 64 + '"'}), "node.name", "a node name is 1 to 63"),
    ("name with a space", dict(node={"name": '"mail node"'}), "node.name", "'mail node': a node name is"),
    ("duration as text", dict(gossip={"probe_interval": '"1s"'}), "gossip.probe_interval", "expected a number"),
    ("bool as int", dict(gossip={"tcp_fallback_probe": "1"}), "gossip.tcp_fallback_probe", "expected a boolean"),
    ("count as float", dict(gossip={"indirect_checks": "1.5"}), "gossip.indirect_checks", "expected an integer"),
    ("count as bool", dict(gossip={"gossip_nodes": "true"}), "gossip.gossip_nodes", "got a boolean"),
    ("override out of range", dict(gossip={"probe_interval": "0"}), "gossip.probe_interval", "must be > 0"),
    ("packet too small", dict(gossip={"packet_size": "100"}), "gossip.packet_size", "invalid value 100"),
    ("seeds not a list", dict(gossip={"seeds": '"10.0.0.1:7946"'}), "gossip.seeds", "expected an array"),
    ("tag not a string", dict(rest="[tags]\nrack = 3"), "tags.rack", "expected a string"),
    ("missing name", dict(node={"name": None}), "node.name", "missing (required)"),
    ("missing cluster", dict(gossip={"cluster": None}), "gossip.cluster", "missing (required)"),
    ("cluster with a space", dict(gossip={"cluster": '"my mail"'}), "gossip.cluster", "a cluster name is 1 to 63"),
    ("tls without cert", dict(rest='[tls]\nca = "ca.pem"\nkey = "k.pem"'), "tls.cert", "missing (required)"),
    ("tls unknown key", dict(rest='[tls]\nca = "a"\ncert = "b"\nkey = "c"\ncrl = "d"'), "tls.crl", "unknown key"),
    ("tls empty path", dict(rest='[tls]\nca = ""\ncert = "b"\nkey = "c"'), "tls.ca", "must not be empty"),
    ("http advertise port 0", dict(rest='[http]\nadvertise = "10.0.0.1:0"'), "http.advertise", "port must be"),
    ("no keys", dict(gossip={"keys": "[]"}), "gossip.keys", "at least one key"),
    ("short key", dict(gossip={"keys": f'["{KEY}", "{b64_of(16)}"]'}), "gossip.keys[1]", "16 bytes"),
    ("long key", dict(gossip={"keys": f'["{b64_of(33)}"]'}), "gossip.keys[0]", "33 bytes"),
    ("key not base64", dict(gossip={"keys": '["not base64!"]'}), "gossip.keys[0]", "not valid base64"),
    ("key not a string", dict(gossip={"keys": "[32]"}), "gossip.keys[0]", "expected a base64 string"),
    ("bind without port", dict(gossip={"bind": '"127.0.0.1"'}), "gossip.bind", "is not host:port"),
    ("bind port not a number", dict(gossip={"bind": '"127.0.0.1:http"'}), "gossip.bind", "is not host:port"),
    ("bind to a host name", dict(gossip={"bind": '"localhost:7946"'}), "gossip.bind", "not an IP address"),
    ("seed with port 0", dict(gossip={"seeds": '["10.0.0.1:0"]'}), "gossip.seeds[0]", "port must be 1..65535"),
    ("seed not host:port", dict(gossip={"seeds": '["10.0.0.1:1", "b"]'}), "gossip.seeds[1]", "is not host:port"),
    ("http port too big", dict(rest='[http]\nbind = "127.0.0.1:70000"'), "http.bind", "port must be 0..65535"),
    ("v6 without brackets", dict(gossip={"advertise": '"::1:7946"'}), "gossip.advertise", "in brackets"),
    ("bad v6", dict(gossip={"advertise": '"[fe80::zz]:7946"'}), "gossip.advertise", "not an IP address"),
    ("any-address bind", dict(gossip={"bind": '"0.0.0.0:7946"'}), "gossip.advertise", "required when gossip.bind"),
    ("unknown role", dict(node={"role": '"boss"'}), "node.role", "not one of master, slave"),
    ("unknown profile", dict(gossip={"profile": '"fast"'}), "gossip.profile", "not one of lan, wan, local"),
    ("unknown service", dict(rest='[endpoints]\nimaps = "127.0.0.1:993"'), "endpoints.imaps", "unknown service"),
    ("endpoint without port", dict(rest='[endpoints]\nimap = "mail.example.com"'), "endpoints.imap", "host:port"),
    (
        "endpoint key misspelt",
        dict(rest='[endpoints]\nimap = { adress = "10.0.0.1:143" }'),
        "endpoints.imap.adress",
        "unknown key (did you mean endpoints.imap.address?)",
    ),
    (
        "endpoint transport",
        dict(rest='[endpoints]\nimap = { address = "10.0.0.1:143", transport = "ssl" }'),
        "endpoints.imap.transport",
        "'ssl' is not one of plain, starttls, tls",
    ),
    ("tls not a table", dict(top='tls = "on"'), "tls", "expected a table [tls], got a string"),
    (
        "source without type",
        dict(rest=SOURCE + 'path = "/x"'),
        "slave.sources[0].type",
        "missing: one of static, cpanel",
    ),
    ("unknown source type", dict(rest=SOURCE + 'type = "exim"'), "slave.sources[0].type", "'exim': one of static"),
    (
        "two sources, one name",
        dict(rest=f'{SOURCE}type = "plesk"\n{SOURCE}type = "plesk"'),
        "slave.sources[1].name",
        "'plesk' must be a unique non-empty string (give each source a name)",
    ),
    (
        "source key misspelt",
        dict(rest=SOURCE + 'type = "directadmin"\npth = "/x"'),
        "slave.sources[0].pth",
        "unknown key (did you mean slave.sources[0].path?)",
    ),
    (
        "postfix path and command",
        dict(rest=SOURCE + 'type = "postfix"\npath = "/x"\ncommand = ["y"]'),
        "slave.sources[0]",
        "a postfix source reads a path or runs a command, not both",
    ),
    ("static without domains", dict(rest=SOURCE + 'type = "static"'), "slave.sources[0].domains", "missing (required)"),
    (
        "static empty domain",
        dict(rest=SOURCE + 'type = "static"\ndomains = ["a.example", ""]'),
        "slave.sources[0].domains[1]",
        "must not be empty",
    ),
    ("sources not tables", dict(rest='[slave]\nsources = ["x"]'), "slave.sources", "expected [[slave.sources]] tables"),
    (
        "probe timeout too long",
        dict(rest="[slave]\nprobe_timeout = 5.0"),
        "slave.probe_timeout",
        "must be shorter than slave.probe_interval",
    ),
    ("settle below 0", dict(rest="[slave]\nsettle = -1"), "slave.settle", "must be 0 to 86400 seconds"),
    (
        "metadata over 1 KiB",
        dict(rest="[tags]\n" + "\n".join(f't{i} = "{"x" * 40}"' for i in range(30))),
        "tags",
        "the limit is 1024",
    ),
]


@pytest.mark.parametrize(("arguments", "key", "words"), [case[1:] for case in REJECTED], ids=[c[0] for c in REJECTED])
def test_rejected_with_one_line_naming_file_and_key(write_config, arguments, key, words):
    path = write_config(document(**arguments))
    with pytest.raises(ConfigError) as info:
        load(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message
    assert KEY not in message


def test_invalid_toml_is_one_line(write_config):
    path = write_config('[node]\nname = "m1\n')
    with pytest.raises(ConfigError, match=rf"^{path}: invalid TOML: .*line 2") as info:
        load(str(path))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read: No such file or directory$"):
        load(str(path))


def test_defaults():
    config = loads(document(), "x.toml")
    assert config.path == "x.toml"
    assert config.node.name == "m1"
    assert config.node.role == "master"
    assert config.gossip.bind == ("127.0.0.1", 7946)
    assert config.gossip.advertise is None
    assert config.gossip.seeds == ()
    assert config.gossip.keys == (base64.b64decode(KEY),)
    assert config.gossip.settings == profile("lan")
    assert config.http.bind == ("127.0.0.1", 8443)
    assert config.node_meta == NodeMeta(role="master")


def test_profile_with_overrides():
    config = loads(document(gossip={"profile": '"wan"', "probe_interval": "2", "tcp_fallback_probe": "false"}))
    settings = config.gossip.settings
    assert settings.profile == "wan"
    assert settings.probe_interval == 2.0 and isinstance(settings.probe_interval, float)
    assert settings.tcp_fallback_probe is False
    assert settings.suspicion_mult == profile("wan").suspicion_mult  # from the profile


def test_every_gossip_setting_can_be_overridden():
    defaults = GossipConfig()
    overrides = {
        field.name: str(getattr(defaults, field.name)).lower()
        for field in attrs.fields(GossipConfig)
        if field.name != "profile"
    }
    assert loads(document(gossip=overrides)).gossip.settings == defaults


def test_full_config():
    second = new_key_b64()
    config = loads(
        document(
            node={"role": '"slave"', "data_dir": '"/srv/meshmail"'},
            gossip={
                "bind": '"0.0.0.0:7946"',
                "advertise": '"10.0.0.5:7946"',
                "keys": f'["{KEY}", "{second}"]',
                "seeds": '["10.0.0.1:7946", "[fd00::1]:7946", "mx1.example.com:7946"]',
            },
            rest='[endpoints]\nimap = "10.0.0.5:143"\nlmtp = "[fd00::5]:24"\n[tags]\nrack = "r1"\n'
            '[http]\nbind = "[::1]:0"',
        )
    )
    assert config.node.role == "slave" and config.node.data_dir == "/srv/meshmail"
    assert config.gossip.advertise == ("10.0.0.5", 7946)
    assert config.gossip.keys == (base64.b64decode(KEY), base64.b64decode(second))
    assert config.gossip.seeds == (("10.0.0.1", 7946), ("fd00::1", 7946), ("mx1.example.com", 7946))
    assert config.http.bind == ("::1", 0)
    meta = NodeMeta.decode(config.node_meta.encode())
    assert meta == NodeMeta(
        role="slave", endpoints={"imap": "10.0.0.5:143", "lmtp": "[fd00::5]:24"}, tags={"rack": "r1"}
    )


def test_keys_stay_out_of_repr():
    config = loads(document())
    assert KEY not in repr(config)
    assert repr(base64.b64decode(KEY)) not in repr(config)


def test_example_config_loads_once_given_a_key():
    text = EXAMPLE.read_text()
    placeholder = "<output of: meshmail keygen>"
    assert placeholder in text
    with pytest.raises(ConfigError, match="gossip.keys.0.: not valid base64"):
        loads(text, str(EXAMPLE))
    config = loads(text.replace(placeholder, KEY), str(EXAMPLE))
    assert config.gossip.cluster


def test_tls_paths_are_under_the_data_dir_unless_absolute():
    text = document(
        node={"data_dir": '"/var/lib/mm"'},
        gossip={"keys": None},
        rest='[tls]\nca = "ca.pem"\ncert = "/etc/mm/node.pem"\nkey = "node-key.pem"\n'
        '[http]\nbind = "0.0.0.0:8443"\nadvertise = "10.0.0.1:8443"',
    )
    config = loads(text)
    assert config.gossip.keys == ()  # they live in the data dir's keyring.json
    assert (config.tls.ca, config.tls.cert, config.tls.key, config.tls.ca_key) == (
        "/var/lib/mm/ca.pem",
        "/etc/mm/node.pem",
        "/var/lib/mm/node-key.pem",
        None,
    )
    assert config.http.advertise == ("10.0.0.1", 8443)
