"""Micro-benchmark of routing.Router.resolve: microseconds per call, one process, no network.

1,000,000 domains in a plain dict-backed state and 100 members; prints the time per call
for an address hit, an override hit, an unknown domain and an invalid address, with the
normalization cache warm (the steady state) and cold (every address new to the router).
A script, not a test: pytest does not collect it. Run: .venv/bin/python tests/bench/bench_resolve.py
"""

from __future__ import annotations

import argparse
import time
import timeit

from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.nodemeta import NodeMeta
from meshmail.routing import NoRoute, Route, Router, _normalize
from meshmail.state.records import AddressOverride, DomainRoute


class DictState:
    """A StateView over two dicts, as cheap as a lookup can be."""

    def __init__(self, domains: dict[str, DomainRoute], overrides: dict[str, AddressOverride]):
        self.domains = domains
        self.overrides = overrides

    def domain(self, name: str) -> DomainRoute | None:
        return self.domains.get(name)

    def override(self, address: str) -> AddressOverride | None:
        return self.overrides.get(address)


def build(n_domains: int, n_members: int) -> Router:
    routes = [DomainRoute(slave=f"slave-{i}", source="slave") for i in range(n_members)]
    domains = {f"domain{i}.example": routes[i % n_members] for i in range(n_domains)}
    domains["xn--bcher-kva.example"] = routes[0]
    overrides = {"moved@domain7.example": AddressOverride(slave="slave-42")}
    members = {}
    for i in range(n_members):
        meta = NodeMeta(role="slave", endpoints={"imap": f"10.0.{i // 256}.{i % 256}:143", "lmtp": "[::1]:24"})
        members[f"slave-{i}"] = MemberInfo(f"slave-{i}", "10.0.0.1", 7946, meta.encode(), 1, State.ALIVE, 0.0)
    return Router(DictState(domains, overrides), members)


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=1_000_000)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--number", type=int, default=200_000, help="calls per timing")
    args = parser.parse_args()

    start = time.perf_counter()
    router = build(args.domains, args.members)
    print(f"built {args.domains:,} domains, {args.members} members in {time.perf_counter() - start:.1f} s")

    cases = [
        ("address hit (normalized ASCII)", "alice@domain123456.example", Route),
        ("override hit", "moved@domain7.example", Route),
        ("address hit (upper case, full path)", "alice@DOMAIN123456.example", Route),
        ("address hit (Unicode domain, IDNA)", "alice@bücher.example", Route),
        ("unknown domain", "bob@nowhere.example", NoRoute),
        ("invalid address", "no at sign here", NoRoute),
    ]
    print(f"{'case':36} {'warm µs':>8} {'cold µs':>8}")
    for label, address, kind in cases:
        assert type(router.resolve(address, "imap")) is kind, (label, router.resolve(address, "imap"))
        warm = per_call_us(lambda a=address: router.resolve(a, "imap"), args.number)

        def cold(a=address):
            _normalize.cache_clear()
            router.resolve(a, "imap")

        clear = per_call_us(_normalize.cache_clear, args.number)
        cold_us = per_call_us(cold, args.number // 10) - clear
        print(f"{label:36} {warm:8.2f} {cold_us:8.2f}")


if __name__ == "__main__":
    main()
