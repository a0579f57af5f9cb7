"""`make demo` (deploy/demo.py) as a new user meets it: every command it prints works as
printed, from another folder; with Dovecot the slaves serve real mailboxes and publish their
endpoints; a signal stops every process it started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import mailkit

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parent.parent / "deploy" / "demo.py"
#: Start of four nodes and two Dovecots, routing news, the commands, and the graceful leave.
TIMEOUT = 240.0


def processes_in(folder: Path) -> dict[int, str]:
    """{pid: command line} of the processes whose command line names `folder` (the demo's
    nodes name their data dir, its Dovecots their config)."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in text:
            found[int(cmdline.parent.name)] = text
    return found


@pytest.fixture
def demo_dir(tmp_path):
    """The demo's folder; whatever the demo left running there is killed after the test."""
    folder = tmp_path / "demo"
    yield folder
    for pid in processes_in(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_demo(demo_dir: Path, *args: str) -> subprocess.Popen:
    # Run from a folder that is neither the repository nor the demo's: the commands must not
    # depend on where they are typed.
    elsewhere = demo_dir.parent / "elsewhere"
    elsewhere.mkdir()
    return subprocess.Popen(
        [sys.executable, str(DEMO), "--dir", str(demo_dir), *args],
        cwd=elsewhere,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_check(demo_dir: Path, *args: str) -> str:
    """Run the demo with --check; return its output once it exited 0, having stopped everything."""
    demo = start_demo(demo_dir, "--check", *args)
    try:
        output, _ = demo.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        demo.kill()
        output, _ = demo.communicate()
        raise AssertionError(f"demo --check did not finish within {TIMEOUT:.0f} s:\n{output}") from None
    assert demo.returncode == 0, output
    assert processes_in(demo_dir) == {}, output
    return output


def ran(output: str) -> dict[str, str]:
    """{command as printed under "Try": its output} of a --check run; every command is asserted
    to have run exactly as printed and to have succeeded."""
    tried = re.search(r"\nTry \(from any folder\):\n(.*?)\n\n", output, re.DOTALL)
    assert tried, output
    shown = [line.strip() for line in tried.group(1).splitlines() if line.startswith("  /")]
    blocks = re.findall(r"^\$ ([^\n]*)\n(.*?)(?=^\$ |^check: )", output, re.DOTALL | re.MULTILINE)
    outputs = {command: text for command, text in blocks}
    assert list(outputs) == shown, output
    failed = {command: text for command, text in outputs.items() if "(exit " in text}
    assert not failed, output
    assert f"check: {len(shown)} commands ran, 0 failed" in output
    for command in shown:
        assert command.startswith("/"), command
        assert "--data-dir /" in command or " -c " in command, command
    return outputs


def only(outputs: dict[str, str], pattern: str) -> str:
    [text] = [text for command, text in outputs.items() if re.search(pattern, command)]
    return text


def test_with_dovecot_the_slaves_serve_real_mailboxes_and_every_printed_command_works(demo_dir):
    mailkit.require("dovecot")
    output = run_check(demo_dir)
    outputs = ran(output)
    assert "start it with" not in output and "start this master with" not in output, output

    imap_port = re.search(r"slave s1: Dovecot in \S+ \(imap 127\.0\.0\.1:(\d+),", output)
    assert imap_port, output
    password = re.search(r"alice@example\.com  password (\S+)", output)
    assert password, output
    assert f"alice@example.com:{{PLAIN}}{password.group(1)}:" in (demo_dir / "s1-dovecot" / "users").read_text()

    route = only(outputs, r" route alice@example\.com ")
    assert route.strip() == f"alice@example.com (imap) -> s1 at 127.0.0.1:{imap_port.group(1)} (alive)"
    assert '"slave": "s2"' in only(outputs, r" route carol@example\.org --protocol lmtp ")

    slave = only(outputs, r" slave domains ")
    assert re.search(r"example\.com\s+dovecot\s+published", slave), slave
    assert f"dovecot (dovecot, {demo_dir}/s1-dovecot/users): 1 domains, ok" in slave
    assert re.search(r"imap: up", slave), slave
    assert re.search(r"example\.net\s+s2.*\n.*example\.org\s+s2", only(outputs, r" domains list ")), output

    mailbox = only(outputs, r"imaplib")  # alice's INBOX over IMAP with STARTTLS
    assert "To: alice@example.com" in mailbox and "Subject: Welcome to meshmail" in mailbox, mailbox
    for log in ("m1", "m2", "s1", "s2"):
        assert "leaving the cluster" in (demo_dir / f"{log}.log").read_text()


def test_without_dovecot_the_slaves_list_static_domains_and_the_demo_says_what_to_install(demo_dir):
    output = run_check(demo_dir, "--static")
    outputs = ran(output)
    assert "no Dovecot (--static)" in output and "Leave out --static" in output, output
    assert not any(" route " in command for command in outputs), output  # nothing routes without endpoints
    assert only(outputs, r" domains show example\.com ").strip() == "example.com -> s1 (slave)"
    assert re.search(r"example\.com\s+static\s+published", only(outputs, r" slave domains ")), output
    assert not (demo_dir / "s1-dovecot").exists()


def test_sigterm_stops_every_node_and_says_where_the_files_are(demo_dir):
    demo = start_demo(demo_dir, "--static")
    assert demo.stdout is not None
    seen = []
    deadline = time.monotonic() + TIMEOUT
    try:
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("Ctrl-C stops the cluster.") or time.monotonic() > deadline:
                break
        assert seen and seen[-1].startswith("Ctrl-C"), "".join(seen)
        nodes = set(processes_in(demo_dir)) - {demo.pid}
        assert len(nodes) == 4, processes_in(demo_dir)
        demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=TIMEOUT)
    finally:
        demo.kill()
        demo.wait()
    assert demo.returncode == 0, "".join(seen) + rest
    assert f"demo stopped; its files stay in {demo_dir}" in rest, rest
    assert processes_in(demo_dir) == {}
    for log in ("m1", "m2", "s1", "s2"):
        text = (demo_dir / f"{log}.log").read_text()
        assert "leaving the cluster" in text and f"node {log} stopped" in text, text
