"""The metrics registry: every series documented, the lower layers' counters mapped to series
and back to their /status names unchanged, and GET /metrics of real nodes over real HTTP."""

from __future__ import annotations

import collections
import json
import random
import re
import smtplib
import string
from pathlib import Path

import attrs
import pytest
import trio
from helpers.config import minimal_config, new_key_b64
from helpers.http import fetch, login_json
from helpers.routes import DomainMap, slave
from helpers.served import request, start
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import meshmail
from meshmail.config import loads
from meshmail.gossip.messages import State
from meshmail.metrics import (
    ALL,
    MX,
    PROXY,
    SERVICES,
    STATUS_GOSSIP,
    STATUS_STATE,
    Metrics,
    exposition,
)
from meshmail.mta.deliver import Deliverer
from meshmail.mta.queue import Queue, RetryPolicy
from meshmail.mta.runner import Runner
from meshmail.mta.service import MxReport
from meshmail.mta.session import Mx
from meshmail.mta.spool import Spool
from meshmail.nodemeta import Endpoint
from meshmail.proxy.backend import Connector, backend_contexts
from meshmail.routing import Router

SOURCES = Path(meshmail.__file__).parent


def test_every_series_is_named_and_documented():
    names = [series.name for series in ALL]
    assert len(set(names)) == len(names), "a series is declared twice"
    for series in ALL:
        assert re.fullmatch(r"meshmail_[a-z0-9_]+", series.name), series.name
        assert series.kind in ("counter", "gauge", "histogram"), series.name
        assert series.name.endswith("_total") == (series.kind == "counter"), series.name
        assert series.name.endswith("_seconds") or series.kind != "histogram", series.name
        assert len(series.help) > 20 and series.help.endswith("."), series.name
        fields = {field for _, field, _, _ in string.Formatter().parse(series.status) if field}
        assert fields <= set(series.labels), series.name
    statuses = [series.status for series in ALL if "{" not in series.status]
    assert len(set(statuses)) == len(statuses), "two series show under one /status name"


def test_the_exposition_has_help_and_type_for_every_series():
    metrics = Metrics(gossip=collections.Counter(), state=collections.Counter())
    families = {f.name: f for f in text_string_to_metric_families(exposition(metrics, "")[0].decode())}
    for series in ALL:
        family = families[series.name.removesuffix("_total")]
        assert (family.documentation, family.type) == (series.help, series.kind), series.name


def lower_layer_names(layer: str) -> list[str]:
    """The counter names written in the source of the gossip layer or of the replication,
    with one example of each name made at run time."""
    files = sorted((SOURCES / "gossip").glob("*.py")) if layer == "gossip" else [SOURCES / "replication.py"]
    found = set()
    for path in files:
        found |= set(re.findall(r"counters\[\"([a-z_.]+)\"\]", path.read_text()))
    if layer == "gossip":
        made = ["dropped.auth_failed", "dropped.malformed", "left", "failed"]
        return sorted(found - {"sent", "delivered", "lost", "cut"}) + made  # the in-memory network's
    return sorted(found) + ["state.delta_applied", "state.sync_applied", "state.rejected.invalid_name"]


@pytest.mark.parametrize("layer", ["gossip", "state"])
def test_every_counter_of_the_lower_layers_has_a_series_of_its_own(layer):
    names = lower_layer_names(layer)
    assert len(names) > (20 if layer == "gossip" else 8), "the scan of the sources found too few names"
    metrics = Metrics(**{layer: collections.Counter(names)})
    unlisted = f"meshmail_{layer}_unlisted_total"
    assert not [s for f in metrics.registry.collect() for s in f.samples if s.name == unlisted]


def test_status_names_and_values_are_those_the_layers_count():
    gossip = collections.Counter({"packets_in": 10, "dropped.auth_failed": 2, "dropped.busy": 0, "brand_new": 3})
    state = collections.Counter({"state.syncs": 4, "state.sync_applied": 0, "state.rejected.bad_sync": 1,
                                 "state.stale": 1})  # fmt: skip
    metrics = Metrics(gossip=gossip, state=state)
    assert metrics.status_counters(STATUS_GOSSIP) == dict(sorted(gossip.items()))
    assert metrics.status_counters(STATUS_STATE) == dict(sorted(state.items()))
    value = metrics.registry.get_sample_value
    assert value("meshmail_gossip_dropped_total", {"reason": "auth_failed"}) == 2
    assert value("meshmail_gossip_unlisted_total", {"counter": "brand_new"}) == 3  # not lost, only undocumented
    assert value("meshmail_state_rejected_total", {"reason": "bad_sync"}) == 1
    assert value("meshmail_state_applied_entries_total", {"via": "sync"}) == 0
    assert value("meshmail_state_turned_stale") == 1
    # Unlabelled series are exposed from the start, at 0, and shown in /status once above 0.
    assert value("meshmail_gossip_probes_total") == 0 and value("meshmail_gossip_removed") == 0
    assert "probes" not in metrics.status_counters(STATUS_GOSSIP)
    gossip["packets_in"] += 1  # read at each collection, not copied
    assert metrics.status_counters(STATUS_GOSSIP)["packets_in"] == 11


def test_a_service_counter_shows_in_status_once_it_counted():
    metrics = Metrics()
    assert metrics.status_counters(SERVICES) == {}
    metrics.skipped_lines.labels(source="a").inc(0)  # a read with no bad line
    metrics.joins_refused.labels(reason="expired").inc()
    metrics.logins.inc()
    assert metrics.status_counters(SERVICES) == {"auth.login": 1, "join.refused.expired": 1, "slave.skipped_lines": 0}
    metrics.skipped_lines.labels(source="b").inc(3)
    metrics.source_reads.labels(source="a").inc()
    metrics.source_reads.labels(source="b").inc()
    counters = metrics.status_counters(SERVICES)
    assert counters["slave.skipped_lines"] == 3 and counters["slave.source_reads"] == 2  # summed over sources


def test_status_counters_collect_only_the_series_they_show():
    """A /status builds several blocks: each collects its own series, not the whole registry
    (the queued-messages gauge computes its value from the queue at each collection)."""
    gossip = collections.Counter({"packets_in": 4})
    metrics = Metrics(gossip=gossip, state=collections.Counter())
    reads: list[int] = []
    metrics.mx_queued.set_function(lambda: reads.append(1) or 7)
    metrics.proxy_logins.labels(protocol="imap", result="ok").inc()
    assert metrics.status_counters(STATUS_GOSSIP) == {"packets_in": 4}
    assert metrics.status_counters(SERVICES) == {}
    assert metrics.status_counters(PROXY) == {"proxy.logins.ok": 1}
    assert reads == []
    assert metrics.status_counters(MX) == {"mx.queued": 7} and reads == [1]
    assert metrics.registry.get_sample_value("meshmail_mx_queued_messages") == 7  # /metrics sees everything


def test_each_node_has_its_own_registry():
    one, two = Metrics(), Metrics()  # a default global registry would refuse the second
    one.logins.inc()
    assert one.registry.get_sample_value("meshmail_http_logins_total") == 1
    assert two.registry.get_sample_value("meshmail_http_logins_total") == 0


# --- real nodes ------------------------------------------------------------------------------------

SLAVE = """
[[slave.sources]]
type = "static"
name = "listed"
domains = ["a.example", "b.example"]
"""


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(node, accept: str = "") -> tuple[str, str]:
    answer = await fetch(node, "GET", "/metrics", None, {"Accept": accept} if accept else {})
    assert answer.status == 200
    return answer.headers["Content-Type"], answer.body.decode()


async def test_metrics_of_two_nodes_in_one_process(nursery):
    key = new_key_b64()
    master = await start(nursery, loads(minimal_config("m1", key=key), "m1.toml"))
    slave_text = minimal_config("s1", key=key, extra=SLAVE).replace("[node]\n", '[node]\nrole = "slave"\n')
    slave = await start(nursery, loads(slave_text, "s1.toml"))
    seeds = json.dumps({"seeds": [f"127.0.0.1:{master.gossip[1]}"]}).encode()
    assert await request(slave, "POST", "/join", seeds) == (200, {"joined": 1})
    with trio.fail_after(10):
        while (await request(master, "GET", "/domains"))[1]["domains"] == []:
            await trio.sleep(0.05)

    content_type, text = await scrape(master)
    assert content_type.startswith("text/plain; version=0.0.4")
    before = samples(text)
    assert before[("meshmail_gossip_packets_received_total", ())] > 0
    assert before[("meshmail_state_syncs_total", ())] >= 1
    assert before[("meshmail_http_login_failures_total", ())] == 0
    assert before[("meshmail_http_logins_total", ())] == 0

    # A refused login moves the auth series on this node, in /metrics and /status alike.
    assert (await login_json(master, "nobody", "wrong password")).status == 401
    after = samples((await scrape(master))[1])
    assert after[("meshmail_http_login_failures_total", ())] == 1
    assert (await request(master, "GET", "/status"))[1]["state"]["counters"]["auth.login_failed"] == 1
    # ...and on no other node of the process.
    _, slave_text = await scrape(slave)
    on_slave = samples(slave_text)
    assert on_slave[("meshmail_http_login_failures_total", ())] == 0
    assert "auth.login_failed" not in (await request(slave, "GET", "/status"))[1]["state"]["counters"]

    # The slave's own series: its source read with no bad line, its routes written.
    assert on_slave[("meshmail_slave_skipped_lines_total", (("source", "listed"),))] == 0
    assert on_slave[("meshmail_slave_routes_written_total", ())] == 2
    assert after[("meshmail_slave_routes_written_total", ())] == 0
    status = (await request(slave, "GET", "/status"))[1]
    assert status["state"]["counters"]["slave.skipped_lines"] == 0
    assert status["state"]["counters"]["slave.routes_written"] == 2
    assert status["counters"]["packets_in"] > 0

    # Every meshmail family carries HELP, also in OpenMetrics when the scraper asks for it.
    for family in text_string_to_metric_families(slave_text):
        assert family.documentation, family.name
    content_type, text = await scrape(slave, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and text.endswith("# EOF\n")
    names = {family.name for family in openmetrics_families(text)}
    assert {"meshmail_gossip_packets_received", "meshmail_state_syncs", "meshmail_slave_routes_written"} <= names


async def test_the_mx_counts_on_its_series_and_its_status_block_reads_them(tmp_path):
    """A real SMTP session with a real MX (the slave is dead, so the mail is queued on a real
    spool): the session gauge while it is open, the refusal and the queued recipient counted
    on the MX series, and /status's "mx" block showing the same numbers."""
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    dead = attrs.evolve(slave("s1", {"lmtp": Endpoint("127.0.0.1:1")}), state=State.DEAD)
    router = Router(DomainMap({"one.example": "s1"}), {"s1": dead})
    section = loads(minimal_config()).mx
    spool = Spool.open(tmp_path / "queue")
    try:
        deliverer = Deliverer(Connector(backend_contexts(None, None, "/")), "mx.test")
        runner = Runner(spool, Queue(RetryPolicy(), random.Random(1)), deliverer, router, "mx.test", "m1",
                        metrics=metrics)  # fmt: skip
        mx = Mx(section, router, deliverer, runner, None, metrics, "mx.test")
        report = MxReport(mx, runner)
        assert value("meshmail_mx_sessions") == 0 and value("meshmail_mx_queued_messages") == 0
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, mx.handle, [listener])
            client = await trio.to_thread.run_sync(lambda: smtplib.SMTP("127.0.0.1", port, timeout=20))
            assert value("meshmail_mx_sessions") == 1 and report.summary()["sessions"] == 1

            def send() -> tuple[int, dict]:
                client.ehlo("client.test")
                client.mail("x@outside.example")
                relay = client.rcpt("<someone@outside.example>")[0]
                client.rset()
                return relay, client.sendmail("x@outside.example", ["ann@one.example"], b"Subject: hi\r\n\r\nhi\r\n")

            assert await trio.to_thread.run_sync(send) == (550, {})
            await trio.to_thread.run_sync(client.quit)
            with trio.fail_after(10):
                while value("meshmail_mx_sessions"):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        spool.close()
    assert value("meshmail_mx_rejections_total", {"reason": "relay_denied"}) == 1
    assert value("meshmail_mx_recipients_total", {"result": "queued"}) == 1
    assert value("meshmail_mx_recipients_total", {"result": "delivered"}) == 0  # counted (none), so shown
    assert value("meshmail_mx_queued_messages") == 1  # read from the queue at each scrape
    block = report.summary()
    assert block["recipients"] == {"delivered": 0, "queued": 1}
    assert block["rejections"] == {"relay_denied": 1}
    assert (block["sessions"], block["queued"], block["slaves"]["s1"]["messages"]) == (0, 1, 1)
    assert metrics.status_counters(MX)["mx.recipients.queued"] == 1
