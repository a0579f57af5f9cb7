"""`make demo`: a local meshmail cluster of two masters and two slaves on 127.0.0.1, made the way
an operator makes one (init, token create, join, run --data-dir), left running until Ctrl-C.

When Dovecot can run here (installed, and we are root), each slave has a real Dovecot under
the demo's folder with users and a welcome message in every mailbox; the slave publishes
its imap, pop3 and lmtp endpoints and takes its domains from Dovecot's passwd-file, as in
production. Otherwise (or with --static) the slaves list their domains statically and
publish no endpoints. The summary's commands use absolute paths and work from any folder;
--check runs each of them once everything is up, then stops (tests/test_demo.py).

A developer demo, not product code: it puts tests/ on sys.path and builds on the test kit
(helpers.cluster starts the nodes and learns their ports, helpers.mailkit runs Dovecot).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.parse
from email.message import EmailMessage
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import mailkit  # noqa: E402
from helpers.cluster import PASSWORD, Cluster, Node  # noqa: E402

from meshmail.security import files  # noqa: E402

MASTERS = ("m1", "m2")
#: The users of each slave; their domains are what the slave publishes.
USERS = {
    "s1": ("alice@example.com", "bob@example.com"),
    "s2": ("carol@example.org", "dave@example.net"),
}
SUBJECT = "Welcome to meshmail"
#: How long the cluster may take to route every slave's users from both masters.
READY_TIMEOUT = 60.0
POLL_INTERVAL = 0.2
#: How long a node may take to leave gracefully before it is killed.
LEAVE_TIMEOUT = 15.0
INSTALL = mailkit.PACKAGES["dovecot"]


@attrs.frozen
class Without:
    """Why the slaves run no Dovecot, and what to do about it."""

    reasons: tuple[str, ...]
    hint: str


class Stop(Exception):
    """SIGTERM (or SIGINT): stop the demo."""


def main() -> int:
    args = _parser().parse_args()
    root = _demo_dir(args.dir)
    if args.static:
        without = Without(("--static",), "Leave out --static for a real Dovecot per slave.")
    else:
        problems = mailkit.unavailable("dovecot")
        hint = f"For real mailboxes: apt-get install {INSTALL}, then run make demo as root."
        without = Without(tuple(problems), hint) if problems else None
    sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    demo = Demo(root, without)
    try:
        demo.build()
        demo.wait_routed()
        print(demo.summary())
        if args.check:
            return demo.check()
        print("Ctrl-C stops the cluster.")
        demo.watch()
        return 0
    except Stop:
        return 0
    except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.stop()
        print(f"demo stopped; its files stay in {root} (logs: {root}/*.log)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="a new or empty folder for the demo's files (default: one in /tmp)")
    parser.add_argument("--static", action="store_true", help="no Dovecot even when installed: static domains only")
    parser.add_argument("--check", action="store_true", help="run every command shown once ready, then stop")
    return parser


def _demo_dir(given: Path | None) -> Path:
    if given is None:
        return Path(tempfile.mkdtemp(prefix="meshmail-demo."))
    root = given.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise SystemExit(f"demo: {root} is not empty (give a new folder, or remove its files)")
    return root


def _stop(signum: int, frame: object) -> None:
    raise Stop()


def _meshmail() -> list[str]:
    """The meshmail command of this Python's environment, by absolute path."""
    script = Path(sys.executable).parent / "meshmail"
    return [str(script)] if script.exists() else [sys.executable, "-m", "meshmail"]


class Demo:
    """The cluster under `root`: nodes m1, m2, s1, s2 (data dir root/NAME, log root/NAME.log)
    and, unless `without` says why not, a Dovecot per slave in root/NAME-dovecot."""

    def __init__(self, root: Path, without: Without | None) -> None:
        self.root = root
        self.cluster = Cluster(root)
        self.dovecots: dict[str, mailkit.Dovecot] = {}
        self.passwords: dict[str, str] = {}
        self.without = without
        self.with_dovecot = without is None

    # --- making it

    def build(self) -> None:
        """init m1 and start it, join the others with tokens from m1, set up the slaves' mail
        servers and sources, start m2, s1 and s2."""
        print(f"meshmail demo in {self.root}: starting two masters and two slaves ...")
        self.cluster.init("m1", cluster="demo")
        self.cluster.start("m1")
        self._join("m2", self.cluster.token("m1", "master"), "master")
        token = self.cluster.token("m1", "slave", "--uses", str(len(USERS)), "--note", "demo")
        for slave in USERS:
            self._join(slave, token, "slave")
            if self.with_dovecot:
                self._serve_mail(slave)
            else:
                self._list_domains(slave)
        self.cluster.start("m2", *USERS)

    def _join(self, name: str, token: str, role: str) -> None:
        result = self.cluster.join(name, token, role)
        if result.returncode != 0:
            raise RuntimeError(f"meshmail join {name} failed: {result.stderr.strip()}")

    def _serve_mail(self, slave: str) -> None:
        """A Dovecot for the slave's users with a welcome message each; the slave's config gets
        its endpoints and reads its domains from the passwd-file."""
        users = {address: secrets.token_urlsafe(9) for address in USERS[slave]}
        self.passwords |= users
        dovecot = mailkit.Dovecot(self.root / f"{slave}-dovecot", users, name=f"demo-{slave}",
                                  trusted_networks=["127.0.0.0/8"])  # fmt: skip
        self.dovecots[slave] = dovecot
        dovecot.start()
        lmtp = dovecot.endpoints()["lmtp"].rsplit(":", 1)
        with smtplib.LMTP(lmtp[0], int(lmtp[1])) as client:
            for address in users:
                client.send_message(_welcome(address, slave))
        endpoints = dovecot.endpoints()
        self._add_config(
            slave,
            f"""
[endpoints]
imap = {{ address = "{endpoints["imap"]}", transport = "starttls", client_address = "id" }}
pop3 = {{ address = "{endpoints["pop3"]}", transport = "starttls" }}
lmtp = "{endpoints["lmtp"]}"

[[slave.sources]]
type = "dovecot"
path = "{dovecot.passwd}"
""",
        )

    def _list_domains(self, slave: str) -> None:
        domains = ", ".join(f'"{d}"' for d in _domains(slave))
        self._add_config(slave, f'\n[[slave.sources]]\ntype = "static"\ndomains = [{domains}]\n')

    def _add_config(self, name: str, text: str) -> None:
        config = self.cluster.data_dir(name) / files.CONFIG
        config.write_text(config.read_text() + text)

    # --- waiting and watching

    def wait_routed(self) -> None:
        """Wait until both masters route the first user of each slave to that slave (with
        Dovecot: to its imap endpoint; without: the slave is known and publishes none)."""
        deadline = time.monotonic() + READY_TIMEOUT
        pending = {(master, slave) for master in MASTERS for slave in USERS}
        while pending:
            for master, slave in sorted(pending):
                if self._routes(master, slave):
                    pending.discard((master, slave))
            self._check_running()
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not routed within {READY_TIMEOUT:.0f} s (master, slave): {sorted(pending)}\n"
                                   f"{self.cluster.logs()}")  # fmt: skip
            time.sleep(POLL_INTERVAL if pending else 0)

    def _routes(self, master: str, slave: str) -> bool:
        query = urllib.parse.urlencode({"address": USERS[slave][0], "protocol": "imap"})
        token = files.read_api_token(self.cluster.data_dir(master))
        try:
            document = self.cluster.get(master, f"/route?{query}", token)
        except (OSError, ValueError):
            return False
        if self.with_dovecot:
            return document.get("route", {}).get("slave") == slave
        return document.get("no_route", {}).get("reason") == "no_endpoint"

    def _check_running(self) -> None:
        gone = {name: node.exited() for name, node in self.cluster.nodes.items() if node.exited() is not None}
        if gone:
            raise RuntimeError(f"nodes exited: {gone}\n{self.cluster.logs()}")

    def watch(self) -> None:
        """Return when a node exits (raising RuntimeError); Stop ends it on a signal."""
        while True:
            self._check_running()
            time.sleep(1)

    # --- telling

    def commands(self) -> list[list[str]]:
        """Commands to try, each as an argv that works from any folder."""
        meshmail = _meshmail()

        def at(name: str) -> list[str]:
            return ["--data-dir", str(self.cluster.data_dir(name))]

        alice, carol = USERS["s1"][0], USERS["s2"][0]
        shown = [[*meshmail, "status", *at("m2")]]
        if self.with_dovecot:
            shown += [
                [*meshmail, "route", alice, *at("m2")],
                [*meshmail, "route", carol, "--protocol", "lmtp", "--json", *at("m1")],
            ]
        else:
            shown += [[*meshmail, "domains", "show", _domains("s1")[0], *at("m2")]]
        shown += [
            [*meshmail, "domains", "list", *at("m1")],
            [*meshmail, "slave", "domains", *at("s1")],
            [*meshmail, "token", "list", *at("m1")],
        ]
        if self.with_dovecot:
            shown.append([sys.executable, "-c", self._imap_check(alice)])
        return shown

    def _imap_check(self, address: str) -> str:
        """Python that logs in to `address`'s Dovecot over IMAP with STARTTLS and prints the
        subjects in its INBOX."""
        slave = next(s for s, users in USERS.items() if address in users)
        dovecot = self.dovecots[slave]
        host, port = dovecot.endpoints()["imap"].rsplit(":", 1)
        # Double-quoted Python strings, so that the shell line quotes the whole code once.
        values = {"host": host, "ca": str(dovecot.cafile), "user": address, "password": self.passwords[address]}
        quoted = {name: json.dumps(value) for name, value in values.items()}
        return (
            f"import imaplib, ssl; imap = imaplib.IMAP4({quoted['host']}, {port}); "
            f"imap.starttls(ssl.create_default_context(cafile={quoted['ca']})); "
            f"imap.login({quoted['user']}, {quoted['password']}); imap.select(); "
            'print(imap.fetch("1:*", "(BODY[HEADER.FIELDS (FROM TO SUBJECT)])")[1][0][1].decode().strip()); '
            "imap.logout()"
        )

    def summary(self) -> str:
        m1 = self.cluster.nodes["m1"]
        lines = [
            "",
            f'meshmail demo cluster "demo" in {self.root} (logs: {self.root}/*.log)',
            "  masters: " + ", ".join(f"{m} {self.cluster.url(m)}" for m in MASTERS),
            f"  admin:   {m1.url}/login  account admin, password {PASSWORD}",
            f"           (certificate from the demo's own CA: {m1.ca})",
        ]
        for slave in USERS:
            lines += self._slave_lines(slave)
        if self.without:
            lines += [
                f"  no Dovecot ({'; '.join(self.without.reasons)}): the slaves list static domains and",
                "  publish no endpoints, so `meshmail route` finds a domain's slave but nowhere to send a login.",
                f"  {self.without.hint}",
            ]
        lines += ["", "Try (from any folder):"]
        lines += [f"  {shlex.join(command)}" for command in self.commands()]
        if self.with_dovecot:
            lines += [
                "  (the last one reads alice's INBOX straight from s1's Dovecot: the masters do not",
                "   proxy IMAP and POP3 yet; `route` shows where they will send each login)",
            ]
        return "\n".join(lines)

    def _slave_lines(self, slave: str) -> list[str]:
        domains = ", ".join(_domains(slave))
        dovecot = self.dovecots.get(slave)
        if dovecot is None:
            return [f"  slave {slave}: domains {domains} (static)"]
        services = ", ".join(f"{service} {address}" for service, address in dovecot.endpoints().items())
        lines = [
            f"  slave {slave}: Dovecot in {dovecot.root} ({services})",
            f"           domains {domains}, from the users of {dovecot.passwd}",
        ]
        lines += [f"           {address}  password {self.passwords[address]}" for address in USERS[slave]]
        return lines

    def check(self) -> int:
        """Run every command of the summary, showing its output; 0 when all succeed."""
        failed = 0
        for command in self.commands():
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            print(f"\n$ {shlex.join(command)}\n{result.stdout}{result.stderr}".rstrip())
            if result.returncode != 0:
                print(f"(exit {result.returncode})")
                failed += 1
        print(f"\ncheck: {len(self.commands()) - failed} commands ran, {failed} failed")
        return 1 if failed else 0

    # --- stopping

    def stop(self) -> None:
        """Ask every node to leave (SIGTERM), kill what has not left in time, stop the Dovecots."""
        running = [node for node in self.cluster.nodes.values() if node.process and node.exited() is None]
        print("\nstopping: the nodes leave the cluster" + (", the Dovecots stop" if self.dovecots else "") + " ...")
        for node in running:
            node.send(signal.SIGTERM)
        for node in running:
            _wait_or_kill(node)
        for dovecot in self.dovecots.values():
            dovecot.close()


def _wait_or_kill(node: Node) -> None:
    assert node.process is not None
    try:
        node.process.wait(timeout=LEAVE_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"demo: {node.name} did not leave within {LEAVE_TIMEOUT:.0f} s; killed", file=sys.stderr)
    node.kill()  # also whatever it left in its process group


def _domains(slave: str) -> list[str]:
    return sorted({address.rpartition("@")[2] for address in USERS[slave]})


def _welcome(address: str, slave: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "demo@meshmail.test"
    message["To"] = address
    message["Subject"] = SUBJECT
    message.set_content(f"Hello {address}: this mailbox lives in the Dovecot of slave {slave}.\n")
    return message


if __name__ == "__main__":
    sys.exit(main())
