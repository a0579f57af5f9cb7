"""`meshmail queue` against a real `meshmail run` master whose queue holds mail for slaves the
cluster does not know (so every attempt fails with 451 and the mail stays): list, show, flush,
retry and delete, as tables and JSON, and bad input as one line with exit status 2."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.cli import assert_one_line_failure, meshmail
from helpers.cluster import Cluster

from meshmail.config import load
from meshmail.core.clock import human_ms, wall_ms
from meshmail.mta.queue import HOUR_MS
from meshmail.mta.spool import Envelope, Recipient, Spool, new_queue_id
from meshmail.security import files

STARTUP_TIMEOUT = 30.0
#: Time for the delivery loop to try a message it was told is due (it is woken at once).
ATTEMPT_TIMEOUT = 20.0
DATA = b"Subject: waiting\r\n\r\nfor a slave\r\n"


def seed(folder: Path) -> list[str]:
    """Two messages in the spool of a master that is not running yet, as its MX keeps them:
    one for slave "ghost", one for slave "far", neither due for an hour. Returns their ids."""

    async def store() -> list[str]:
        spool = Spool.open(folder)
        try:
            now, ids = wall_ms(), []
            for n, (sender, address, slave) in enumerate(
                [("x@outside.example", "ann@one.example", "ghost"), ("", "bob@two.example", "far")]
            ):
                envelope = Envelope(new_queue_id(now - 60_000 + n, n), sender,
                                    [Recipient(address, slave, next_attempt_ms=now + HOUR_MS)], now - 60_000 + n,
                                    "192.0.2.7", "client.test", origin="n1")  # fmt: skip
                ids.append((await spool.store(envelope, DATA)).id)
            return ids
        finally:
            spool.close()

    return trio.run(store)


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> Iterator[tuple[Cluster, list[str]]]:
    cluster = Cluster.configured(1, tmp_path_factory.mktemp("queue-cli"))
    node = cluster.nodes["n1"]
    data_dir = Path(load(node.config).node.data_dir)
    ids = seed(data_dir / "queue")
    try:
        cluster.start()
        shutil.copy(node.config, data_dir / "meshmail.toml")  # with its ports: for --data-dir
        cluster.wait_until("n1 answers /status", ["n1"], lambda views: "n1" in views["n1"], STARTUP_TIMEOUT)
        yield cluster, ids
    finally:
        cluster.close()
        print(cluster.logs())


@pytest.fixture
def url(master, monkeypatch) -> str:
    cluster, _ = master
    node = cluster.nodes["n1"]
    monkeypatch.setenv("MESHMAIL_TOKEN", files.read_api_token(Path(load(node.config).node.data_dir)))
    return f"http://127.0.0.1:{node.http_port}"


def ok(*args: str) -> str:
    result = meshmail(*args)
    assert result.returncode == 0, result
    assert result.stderr == ""
    return result.stdout


def shown(queue_id: str, url: str) -> dict:
    return json.loads(ok("queue", "show", queue_id, "--json", "--url", url))


def wait_tried(queue_id: str, url: str, attempts: int) -> dict:
    deadline = time.monotonic() + ATTEMPT_TIMEOUT
    while (document := shown(queue_id, url))["recipients"][0]["attempts"] < attempts:
        assert time.monotonic() < deadline, f"{queue_id} not tried {attempts} time(s): {document}"
        time.sleep(0.1)
    return document


@pytest.mark.parametrize("action", ["list", "show", "flush", "retry", "delete"])
def test_help_of_each_action(action):
    result = meshmail("queue", action, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: meshmail queue {action}") and "--url URL" in result.stdout


def test_list_flush_retry_show_delete(master, url):
    cluster, (ghost, far) = master
    received = human_ms(wall_ms() - 60_000)[:10]
    table = [re.split(r"\s{2,}", line) for line in ok("queue", "list", "--url", url).splitlines()]
    assert table[0] == ["ID", "RECEIVED", "SIZE", "FROM", "TO", "TRIES", "NEXT TRY", "LAST REPLY"]
    assert len(table) == 3
    assert table[1][2:6] == [str(len(DATA)), "<x@outside.example>", "ann@one.example (ghost)", "0"]
    assert table[1][0] == ghost and table[1][1].startswith(received) and table[1][7] == "-"
    assert table[2][0] == far and table[2][3:6] == ["<>", "bob@two.example (far)", "0"]
    listed = json.loads(ok("queue", "list", "--slave", "far", "--json", "--url", url))
    assert [m["id"] for m in listed["messages"]] == [far] and listed["more"] == 0
    assert ok("queue", "list", "--slave", "nobody", "--url", url) == "(no queued messages)\n"

    assert ok("queue", "flush", "--slave", "ghost", "--url", url) == "1 queued message(s) at slave ghost due now\n"
    tried = wait_tried(ghost, url, 1)  # the slave is unknown: 451, and it waits again
    assert tried["recipients"][0]["reply"] == "451 4.4.1 The slave's mail service cannot be reached now"
    assert tried["recipients"][0]["next_attempt_ms"] > wall_ms() + 20_000
    assert shown(far, url)["recipients"][0]["attempts"] == 0  # not flushed

    assert ok("queue", "retry", far, "--url", url) == f"message {far} due now\n"
    wait_tried(far, url, 1)
    assert json.loads(ok("queue", "flush", "--json", "--url", url)) == {"slave": None, "flushed": 2}
    wait_tried(ghost, url, 2)

    text = ok("queue", "show", ghost, "--url", url).splitlines()
    assert text[0] == f"message {ghost} from <x@outside.example>, {len(DATA)} bytes"
    assert text[1].startswith(f"received {received}") and text[1].endswith("from 192.0.2.7 (HELO client.test) by n1")
    assert text[2:4] == ["recipients:", text[3]] and text[3].startswith("  ann@one.example at ghost: queued, next try ")
    assert text[3].endswith(", 2 tries: 451 4.4.1 The slave's mail service cannot be reached now")

    data_dir = str(load(cluster.nodes["n1"].config).node.data_dir)
    assert ok("queue", "delete", ghost, "--data-dir", data_dir) == (
        f"message {ghost} deleted from the queue, undelivered\n"
    )
    assert_one_line_failure(meshmail("queue", "show", ghost, "--url", url), "answered 404",
                            f"no message {ghost} in this master's queue")  # fmt: skip
    assert [m["id"] for m in json.loads(ok("queue", "list", "--json", "--url", url))["messages"]] == [far]
    log = cluster.nodes["n1"].log.read_text()
    assert f"queued message {ghost} from <x@outside.example> to <ann@one.example> deleted by node:n1 (token)" in log


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["show", "not-an-id"], ["'not-an-id' is not a queue id"]),
        (["retry", "x" * 65], ["is not a queue id"]),
        (["delete", "a/b"], ["'a/b' is not a queue id"]),
        (["list", "--slave", "bad name"], ["--slave: 'bad name': a node name is"]),
        (["flush", "--slave=-x"], ["--slave: '-x'"]),
        (["retry", "0000000000000000"], ["answered 404", "no message 0000000000000000 in this master's queue"]),
        (["delete", "0000000000000000"], ["answered 404"]),
    ],
)
def test_bad_input_is_one_line(url, args, words):
    assert_one_line_failure(meshmail("queue", *args, "--url", url), *words)


def test_a_wrong_token_is_one_line(url):
    assert_one_line_failure(meshmail("queue", "list", "--url", url, "--token", "mmapi1_wrong"), "answered 401")
