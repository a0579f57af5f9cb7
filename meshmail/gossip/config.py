"""Tunables of the gossip layer and the three named profiles.

The profile values are hashicorp/memberlist's DefaultLANConfig, DefaultWANConfig and
DefaultLocalConfig, so a meshmail cluster and a Serf cluster with the same profile probe
and suspect on the same schedule. Durations are seconds (floats).
"""

from __future__ import annotations

import attrs
from attrs import validators as v

_positive = v.gt(0)


def _count(default: int, minimum: int = 1):
    return attrs.field(default=default, validator=[v.instance_of(int), v.ge(minimum)])


@attrs.frozen(kw_only=True)
class GossipConfig:
    """Timing and size settings of one gossip node; every value is configurable."""

    profile: str = attrs.field(default="lan", validator=v.in_(("lan", "wan", "local")))
    #: Timeout of a TCP connection, used for push-pull and the fallback probe.
    tcp_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Members asked to probe a target that did not answer us directly.
    indirect_checks: int = _count(3, minimum=0)
    #: Retransmits of a broadcast = retransmit_mult * ceil(log10(n + 1)).
    retransmit_mult: int = _count(4)
    #: Minimum suspicion = suspicion_mult * max(1, log10(n)) * probe_interval.
    suspicion_mult: int = _count(4)
    #: Maximum suspicion = suspicion_max_timeout_mult * minimum.
    suspicion_max_timeout_mult: int = _count(6)
    #: A full state exchange with one random member over TCP this often (longer above 32 members).
    push_pull_interval: float = attrs.field(default=30.0, validator=_positive)
    #: One member is probed this often, round robin over a shuffled list.
    probe_interval: float = attrs.field(default=1.0, validator=_positive)
    #: How long a direct probe waits for its ack before asking others to probe.
    probe_timeout: float = attrs.field(default=0.5, validator=_positive)
    #: Try a TCP ping when a direct and the indirect UDP probes all failed.
    tcp_fallback_probe: bool = attrs.field(default=True, validator=v.instance_of(bool))
    #: Lifeguard local health: probe timeouts are scaled by up to this factor.
    awareness_max_multiplier: int = _count(8)
    #: Members each gossip round sends its queued news to.
    gossip_nodes: int = _count(3)
    #: How often a gossip round runs.
    gossip_interval: float = attrs.field(default=0.2, validator=_positive)
    #: Keep gossiping to a dead member for this long, so it can learn and refute.
    gossip_to_the_dead_time: float = attrs.field(default=30.0, validator=v.ge(0))
    #: Dead and left members are forgotten after this long.
    reap_after: float = attrs.field(default=24 * 3600.0, validator=_positive)
    #: Largest UDP packet we send; compound packets are filled up to it.
    packet_size: int = attrs.field(default=1400, validator=[v.instance_of(int), v.ge(512), v.le(65000)])
    #: Packets whose authenticated send time is further than this from ours are dropped,
    #: and packet nonces are remembered this long to drop replays.
    replay_window: float = attrs.field(default=60.0, validator=_positive)
    #: Largest TCP frame accepted (push-pull state); bigger frames drop the stream.
    max_stream_frame: int = attrs.field(default=8 << 20, validator=[v.instance_of(int), v.ge(4096)])


#: The values each profile changes from the LAN defaults (memberlist's own choices).
PROFILES: dict[str, dict[str, object]] = {
    "lan": {},
    "wan": {
        "tcp_timeout": 30.0,
        "suspicion_mult": 6,
        "push_pull_interval": 60.0,
        "probe_timeout": 3.0,
        "probe_interval": 5.0,
        "gossip_nodes": 4,
        "gossip_interval": 0.5,
        "gossip_to_the_dead_time": 60.0,
    },
    "local": {
        "tcp_timeout": 1.0,
        "indirect_checks": 1,
        "retransmit_mult": 2,
        "suspicion_mult": 3,
        "push_pull_interval": 15.0,
        "probe_timeout": 0.2,
        "probe_interval": 1.0,
        "gossip_interval": 0.1,
        "gossip_to_the_dead_time": 15.0,
    },
}


def profile(name: str = "lan", **overrides: object) -> GossipConfig:
    """Return the settings of profile `name` with `overrides` applied on top.

    Raises ValueError for an unknown profile and TypeError/ValueError (from the attrs
    validators) for a bad override.
    """
    if name not in PROFILES:
        raise ValueError(f"unknown gossip profile {name!r} (choose lan, wan or local)")
    return GossipConfig(profile=name, **{**PROFILES[name], **overrides})
