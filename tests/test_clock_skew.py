"""Clocks that disagree, with real processes under libfaketime: a join from a server whose
clock is off is refused before the token is used, naming the offset; and check_clock's
arithmetic on its own."""

from __future__ import annotations

import email.utils
import json
import os
import re
import shutil
import subprocess

import pytest
from helpers.cli import ok, refused
from helpers.cluster import HOST, Cluster
from helpers.config import MESHMAIL

from meshmail.security.bootstrap import MAX_CLOCK_OFFSET, BootstrapError, check_clock

FAKETIME = shutil.which("faketime")
needs_faketime = pytest.mark.skipif(
    FAKETIME is None and not os.environ.get("CI"), reason="needs libfaketime: apt-get install faketime"
)


def date(unix: float) -> str:
    return email.utils.formatdate(unix, usegmt=True)


@pytest.mark.parametrize(
    ("master_ahead", "words"),
    [(600, "10 minutes behind"), (-600, "10 minutes ahead of"), (45, "45 s behind"), (-90, "90 s ahead of")],
)
def test_a_clock_off_by_more_than_the_margin_is_refused(master_ahead, words):
    now = 1_800_000_000.25
    with pytest.raises(BootstrapError, match=f"clock is about {words} the master's .*fix NTP.*the token was not used"):
        check_clock("192.0.2.10:8443", date(now + master_ahead), now, now + 0.05)


@pytest.mark.parametrize("master_ahead", [0, 1, -1, MAX_CLOCK_OFFSET - 2, -(MAX_CLOCK_OFFSET - 2)])
def test_a_clock_within_the_margin_passes(master_ahead):
    now = 1_800_000_000.5
    check_clock("192.0.2.10:8443", date(now + master_ahead), now, now + 0.2)


@pytest.mark.parametrize("header", [None, "", "yesterday", "Mon, 99 Foo 2026 99:99:99 GMT"])
def test_no_usable_date_means_no_check(header):
    check_clock("192.0.2.10:8443", header, 1_800_000_000.0, 1_800_000_000.1)


@pytest.fixture
def cluster(tmp_path):
    fleet = Cluster(tmp_path)
    yield fleet
    fleet.close()


@needs_faketime
@pytest.mark.slow
@pytest.mark.parametrize(
    ("skew", "pattern"), [("-10m", r"about 10 minutes behind"), ("+90s", r"about (89|90|91) s ahead of")]
)
def test_a_joiner_whose_clock_is_off_is_refused_and_the_token_stays_unused(cluster, skew, pattern):
    """The master's Date header has whole seconds and the request takes a moment, so a clock
    90 s ahead may read as 89 to 91 s."""
    cluster.init("m1")
    cluster.start("m1")
    token = cluster.token("m1", "slave")
    join = [FAKETIME, "-f", skew, *MESHMAIL, "join", token, "--role", "slave", "--name", "s1"]
    result = subprocess.run(
        [*join, "--data-dir", str(cluster.data_dir("s1")), "--bind", HOST],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    line = refused(result, "this server's clock is about", "fix NTP", "the token was not used")
    assert re.search(pattern + " the master's", line), line
    assert not cluster.data_dir("s1").exists()
    [listed] = json.loads(ok("token", "list", "--json", "--data-dir", str(cluster.data_dir("m1"))))["tokens"]
    assert listed["used"] == 0 and listed["status"] == "valid"
    # The same token then joins from a clock that agrees.
    assert cluster.join("s1", token, "slave").returncode == 0
