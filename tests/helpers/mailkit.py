"""Real Dovecot and Postfix instances on 127.0.0.0/8 for tests that need a mail server to talk to.

Each instance lives under its own root folder (config, TLS certificate, logs, Maildirs, queue),
listens on ports from the kernel and runs as a child process group that `stop` SIGKILLs. Plain
classes and context managers, not fixtures; the system services and /etc are never touched.
Needs root (Dovecot and Postfix drop to their own users) and the Debian packages in `PACKAGES`.
"""

from __future__ import annotations

import abc
import datetime
import ipaddress
import math
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers import passwords
from helpers.cluster import kill_group

HOST = "127.0.0.1"
#: Debian packages that provide each binary `require` knows about.
PACKAGES = {
    "dovecot": "dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-submissiond",
    "postfix": "postfix",
    "curl": "curl",
    "swaks": "swaks",
}
#: Files that must exist besides the binary on PATH (the protocol servers are separate packages).
_PARTS = {
    "dovecot": [f"/usr/lib/dovecot/{server}" for server in ("imap", "pop3", "lmtp", "submission")],
    "postfix": ["/usr/lib/postfix/sbin/master"],
    "curl": [],
    "swaks": [],
}
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
#: Owner of every Maildir: a numeric uid/gid with no account is enough for Dovecot, and
#: Dovecot refuses uid 0 for mail access.
MAIL_UID = MAIL_GID = 5000
#: How long `start` waits for every port and greeting.
START_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
LOG_TAIL = 40
#: Unix sockets live in Dovecot's base_dir and Postfix's queue_directory; sun_path holds 108
#: bytes and the longest socket names are about 25, so longer folders move to /tmp.
_MAX_SOCKET_DIR = 75


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on HOST that nothing listens on.

    Dovecot and Postfix take fixed ports in their configs and keep them across a restart,
    so they cannot bind port 0. The ports come from the kernel (bind to port 0), every
    socket held open until all are chosen, so the kernel cannot hand out one port twice.
    """
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(probe)
            probe.bind((HOST, 0))
        return [probe.getsockname()[1] for probe in held]
    finally:
        for probe in held:
            probe.close()


def unavailable(*binaries: str) -> list[str]:
    """Why the kit cannot run `binaries` (keys of `PACKAGES`) here, one line each (what to
    install, that root is needed); [] when it can."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [b for b in binaries if shutil.which(b, path=search) is None or not all(map(os.path.exists, _PARTS[b]))]
    problems = []
    if missing:
        packages = " ".join(PACKAGES[b] for b in missing)
        problems.append(f"{', '.join(missing)} not installed (apt-get install {packages})")
    if os.geteuid() != 0:
        problems.append("must run as root: Dovecot and Postfix switch to their own users")
    return problems


def require(*binaries: str) -> None:
    """Skip the test when a binary (a key of `PACKAGES`) or root is missing; fail instead under CI.

    CI installs everything (.ci/run), so a missing part there is a broken machine, never a skip.
    """
    problems = unavailable(*binaries)
    if not problems:
        return
    message = "mailkit: " + "; ".join(problems)
    if os.environ.get("CI"):
        pytest.fail(message + " [CI is set, so this is an error, not a skip]", pytrace=False)
    pytest.skip(message)


def _let_daemons_in(folder: Path) -> None:
    """Make `folder` and its ancestors searchable by other users (o+x, never o+r): Dovecot's
    and Postfix's unprivileged processes must reach their files, and pytest's base
    temporary folder is mode 0700."""
    for path in [folder, *folder.parents]:
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _socket_dir(path: Path, temporaries: list[Path]) -> Path:
    """`path` when short enough to hold unix sockets, else a new folder in /tmp (recorded in
    `temporaries` for `close`) that `path` links to."""
    if len(str(path)) <= _MAX_SOCKET_DIR:
        path.mkdir(parents=True, exist_ok=True)
        return path
    short = Path(tempfile.mkdtemp(prefix="mailkit-", dir="/tmp"))
    short.chmod(0o755)
    temporaries.append(short)
    if path.is_symlink():
        path.unlink()
    path.symlink_to(short)
    return short


def _tail(*logs: Path) -> str:
    parts = []
    for log in logs:
        try:
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        except OSError:
            continue
        if lines:
            parts.append(f"--- {log}\n" + "\n".join(lines))
    return "\n".join(parts) or "(no log yet)"


def write_certificate(folder: Path, host: str = HOST) -> tuple[Path, Path]:
    """A self-signed certificate for `host`, 127.0.0.1 and localhost (EC P-256, valid one day),
    written as cert.pem and key.pem (0600) in `folder`; returns their paths.

    Each has a name of its own, so several can share one CA file: OpenSSL looks an issuer up
    by name and tries no other certificate of the same name.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mailkit test {serial:x}")])
    now = datetime.datetime.now(datetime.UTC)
    addresses = sorted({host, HOST})
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(a)) for a in addresses)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


#: A PROXY protocol v2 header with the LOCAL command: "no client address, use the connection's".
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY protocol v2 header (PROXY command, TCP over IPv4) announcing `source` -> `destination`."""
    body = (
        ipaddress.IPv4Address(source[0]).packed
        + ipaddress.IPv4Address(destination[0]).packed
        + source[1].to_bytes(2, "big")
        + destination[1].to_bytes(2, "big")
    )
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + len(body).to_bytes(2, "big") + body


def _greeting(host: str, port: int, expect: bytes, preamble: bytes = b"") -> bool:
    """True when a connection to host:port answers with a line starting with `expect`."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            if preamble:
                sock.sendall(preamble)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(512)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(expect)
    except OSError:
        return False


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def live_processes_in_group(group: int) -> list[str]:
    """Commands of the processes in process group `group` that are not zombies (children of a
    killed master are reaped by init, which can take seconds)."""
    live = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:
            continue
        command, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(command)
    return live


class _Daemon(abc.ABC):
    """A server run as a child process group under `root`, its output appended to `output`
    and its log in `log`, listening on `host` at `_listening_ports()`."""

    def __init__(self, root: Path, host: str, output: str, log: str) -> None:
        self.root = Path(root)
        self.host = host
        self.process: subprocess.Popen | None = None
        self._temporaries: list[Path] = []
        self.root.mkdir(parents=True, exist_ok=True)
        _let_daemons_in(self.root)
        self.output = self.root / output
        self.log = self.root / log

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @abc.abstractmethod
    def _listening_ports(self) -> list[int]:
        """The ports the daemon listens on once started."""

    def _spawn(self, argv: list[str]) -> None:
        _let_daemons_in(self.root)  # again: another pytest on the machine may have reset its base folder to 0700
        with open(self.output, "ab") as stream:
            stream.write(f"----- {' '.join(argv)} ({time.strftime('%H:%M:%S')})\n".encode())
            stream.flush()
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _kill(self) -> None:
        if self.process is None:
            return
        kill_group(self.process)
        deadline = time.monotonic() + START_TIMEOUT
        while left := live_processes_in_group(self.process.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mailkit: still alive after SIGKILL: {left}")
            time.sleep(POLL_INTERVAL)

    def _wait(self, what: str, ready: Callable[[], bool], ports: list[int]) -> None:
        """Poll `ready()` until true; raise RuntimeError with the log tail if the process
        exits or START_TIMEOUT passes (the process is killed then)."""
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if not self.running:
                self._kill()  # the master is gone; leave none of its children behind
                self.process = None
                raise RuntimeError(f"mailkit: {what} exited while starting\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mailkit: {what} not ready on {self.host} ports {ports} after {START_TIMEOUT} s\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def _wait_closed(self, ports: list[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while any(_accepts(self.host, p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mailkit: ports {ports} still accept after stop\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """SIGKILL the whole process group, wait until none of it is alive, then until no
        port accepts."""
        self._kill()
        self.process = None
        self._wait_closed(self._listening_ports())

    def close(self) -> None:
        """`stop`, then remove the short socket folder made outside the root, if any."""
        self.stop()
        for folder in self._temporaries:
            shutil.rmtree(folder, ignore_errors=True)

    def log_tail(self) -> str:
        """The last lines of the log and of the process's stdout/stderr (where start-up errors land)."""
        return _tail(self.output, self.log)


class Dovecot(_Daemon):
    """One Dovecot under `root` on `host`: imap and pop3 (STARTTLS), imaps, lmtp, and
    submission when `relay` ("host:port" of an SMTP server, e.g. a kit Postfix) is set.

    `users` maps address -> password (stored as {PLAIN}). Mail goes to
    root/mail/<domain>/<local part>/Maildir, owned by MAIL_UID. `trusted_networks` sets
    login_trusted_networks (IMAP ID x-originating-ip, XCLIENT); `haproxy` makes the imap and
    pop3 listeners require a PROXY protocol header from `haproxy_networks`. `auth_listener`
    opens the auth service on a TCP port (`auth_port`): a Postfix checks passwords there (SASL).
    `extra_config` is appended to the generated config as it is (service limits for a
    benchmark, say: Dovecot merges a repeated `service NAME { }` block into the one above it).
    Nothing runs until `start`; `close` (or the `dovecot` context manager) cleans up.
    """

    def __init__(
        self,
        root: Path,
        users: Mapping[str, str],
        *,
        host: str = HOST,
        name: str | None = None,
        relay: str | None = None,
        trusted_networks: list[str] | None = None,
        haproxy: bool = False,
        haproxy_networks: list[str] | None = None,
        auth_listener: bool = False,
        extra_config: str = "",
    ) -> None:
        super().__init__(root, host, output="dovecot.out", log="dovecot.log")
        self.name = name or re.sub(r"[^A-Za-z0-9-]", "-", self.root.name)
        self.relay = relay
        self.trusted_networks = list(trusted_networks or [])
        self.haproxy = haproxy
        self.haproxy_networks = list(haproxy_networks or ["127.0.0.0/8"])
        self.extra_config = extra_config
        *mail_ports, auth_port = free_ports(6)
        self.ports = dict(zip(["imap", "imaps", "pop3", "lmtp", "submission"], mail_ports, strict=True))
        self.auth_port = auth_port if auth_listener else None
        self._users = dict(users)
        self._users_stamp = 0.0
        self.config = self.root / "dovecot.conf"
        self.passwd = self.root / "users"
        self.mail = self.root / "mail"
        self.mail.mkdir(exist_ok=True)
        os.chown(self.mail, MAIL_UID, MAIL_GID)
        (self.root / "state").mkdir(exist_ok=True)
        self.cafile, self._key = write_certificate(self.root / "tls", host)
        self.base_dir = _socket_dir(self.root / "run", self._temporaries)
        self._write_users()

    # -- configuration

    def endpoints(self) -> dict[str, str]:
        """service -> "host:port" for every listener that is configured."""
        services = [s for s in self.ports if s != "submission" or self.relay]
        return {s: f"{self.host}:{self.ports[s]}" for s in services}

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts only this instance's certificate (host names checked)."""
        return ssl.create_default_context(cafile=str(self.cafile))

    @property
    def auth_endpoint(self) -> str:
        """The auth service's "host:port" (the `auth_listener` option); ValueError without it."""
        if self.auth_port is None:
            raise ValueError(f"mailkit: Dovecot {self.name} has no auth listener (auth_listener=True)")
        return f"{self.host}:{self.auth_port}"

    def add_user(self, address: str, password: str) -> None:
        """Add (or change) a user; effective for every login after this returns, no restart.

        Dovecot stats the passwd-file at most once per second of its clock, so this waits
        for the next whole second (up to 1 s) after writing.
        """
        self._users[address] = password
        self._write_users()
        now = time.time()
        time.sleep(math.floor(now) + 1 - now + 0.01)

    def _write_users(self) -> None:
        for address in self._users:
            if ":" in address or "\n" in address or "\n" in self._users[address]:
                raise ValueError(f"mailkit: address or password not fit for a passwd-file: {address!r}")
            passwords.register(self._users[address])
        text = "".join(f"{a}:{{PLAIN}}{p}::::::\n" for a, p in self._users.items())
        temporary = self.passwd.with_suffix(".new")
        temporary.write_text(text)
        temporary.chmod(0o644)
        # Dovecot reloads when mtime or size change; two writes within one second can keep both.
        self._users_stamp = max(time.time(), self._users_stamp + 1)
        os.utime(temporary, (self._users_stamp, self._users_stamp))
        temporary.replace(self.passwd)

    def _config_text(self) -> str:
        protocols = "imap pop3 lmtp" + (" submission" if self.relay else "")
        haproxy = "\n    haproxy = yes" if self.haproxy else ""
        # Postfix's smtpd asks over TCP (smtpd_sasl_path = inet:...): no unix socket to share.
        auth = f"service auth {{\n  inet_listener auth {{\n    port = {self.auth_port}\n  }}\n}}\n"
        lines = [
            f"instance_name = mailkit-{self.name}-{self.ports['imap']}",
            f"hostname = {self.name}.mailkit.test",
            f"base_dir = {self.base_dir}",
            f"state_dir = {self.root / 'state'}",
            f"log_path = {self.log}",
            f"listen = {self.host}",
            f"protocols = {protocols}",
            "default_internal_user = dovecot",
            "default_login_user = dovenull",
            "ssl = yes",
            f"ssl_cert = <{self.cafile}",
            f"ssl_key = <{self._key}",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            "auth_verbose = yes",
            # Tests log in wrongly on purpose; the 2 s default would slow every one of them.
            "auth_failure_delay = 0",
            f"first_valid_uid = {MAIL_UID}",
            f"last_valid_uid = {MAIL_UID}",
            f"first_valid_gid = {MAIL_GID}",
            f"last_valid_gid = {MAIL_GID}",
            "mail_location = maildir:~/Maildir",
            "postmaster_address = postmaster@mailkit.test",
        ]
        if self.trusted_networks:
            lines.append(f"login_trusted_networks = {' '.join(self.trusted_networks)}")
        if self.haproxy:
            lines.append(f"haproxy_trusted_networks = {' '.join(self.haproxy_networks)}")
        if self.relay:
            relay_host, relay_port = self.relay.rsplit(":", 1)
            lines += [
                f"submission_relay_host = {relay_host}",
                f"submission_relay_port = {relay_port}",
                "submission_relay_trusted = no",
                "submission_relay_ssl = no",
            ]
        return (
            "\n".join(lines)
            + f"""
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd}
  default_fields = uid={MAIL_UID} gid={MAIL_GID} home={self.mail}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    port = {self.ports["imap"]}{haproxy}
  }}
  inet_listener imaps {{
    port = {self.ports["imaps"]}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.ports["pop3"]}{haproxy}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = {self.ports["submission"]}
  }}
}}
# No anvil-auth-penalty socket: auth then skips the growing delay (2, 4, 8, 15 s) after
# failed logins from one IP, which every test on 127.0.0.1 would pay.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    port = {self.ports["lmtp"]}
  }}
}}
"""
            + (auth if self.auth_port is not None else "")
            + self.extra_config
        )

    # -- process

    def start(self) -> None:
        """Write the config and run `dovecot -F`; return once every port accepts and imap
        greets with "* OK". Raises RuntimeError with the log tail on failure."""
        if self.running:
            raise RuntimeError(f"mailkit: Dovecot {self.name} already running")
        self.config.write_text(self._config_text())
        (self.base_dir / "master.pid").unlink(missing_ok=True)
        self._spawn(["dovecot", "-F", "-c", str(self.config)])
        self._wait_ready()

    def _wait_ready(self) -> None:
        ports = [self.ports[s] for s in self.endpoints()] + ([self.auth_port] if self.auth_port else [])
        preamble = PROXY_V2_LOCAL if self.haproxy else b""

        def ready() -> bool:
            return all(_accepts(self.host, p) for p in ports) and _greeting(
                self.host, self.ports["imap"], b"* OK", preamble
            )

        self._wait(f"Dovecot {self.name}", ready, ports)

    def relay_to(self, relay: str | None) -> None:
        """Set the submission relay ("host:port" or None to disable submission); a running
        instance reloads its config (SIGHUP) and waits for the submission port."""
        self.relay = relay
        if not self.running:
            return
        self.config.write_text(self._config_text())
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGHUP)
        if relay:
            self._wait(
                f"Dovecot {self.name} submission",
                lambda: _greeting(self.host, self.ports["submission"], b"220"),
                [self.ports["submission"]],
            )
        else:
            self._wait_closed([self.ports["submission"]])

    def _listening_ports(self) -> list[int]:
        return list(self.ports.values()) + ([self.auth_port] if self.auth_port else [])

    # -- mail

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.mail / domain / local / "Maildir"

    def mailbox(self, address: str) -> list[bytes]:
        """The messages in `address`'s INBOX (new and cur), oldest first, as stored: with the
        headers Dovecot added and LF line ends. [] before the first delivery."""
        folder = self.maildir(address)
        files = [f for sub in ("new", "cur") if (folder / sub).is_dir() for f in (folder / sub).iterdir()]
        return [f.read_bytes() for f in sorted(files, key=_maildir_order)]


def _maildir_order(path: Path) -> tuple[int, int, str]:
    """Maildir names start "<seconds>.M<microseconds>P<pid>"; sort on those numbers."""
    match = re.match(r"(\d+)\.M(\d+)", path.name)
    return (int(match.group(1)), int(match.group(2)), path.name) if match else (0, 0, path.name)


class Postfix(_Daemon):
    """One Postfix under `root`: smtpd on host:<port from the kernel> accepting mail for
    `domains` (delivered over LMTP to `dovecot`) and for `routes` (domain -> another Dovecot);
    every other recipient is refused (no relaying, nothing leaves the machine). An unknown
    user of a hosted domain is accepted, then refused by Dovecot's LMTP and bounced.

    `xclient` lets 127.0.0.0/8 use XCLIENT, `xforward` XFORWARD. `tls` makes smtpd offer STARTTLS
    with the kit certificate in root/tls (`cafile`), logging each TLS session ("TLS connection
    established") and naming it in the Received header it writes. `submission` adds a second smtpd on
    host:`submission_port`: STARTTLS with the kit certificate in root/tls (`cafile`), AUTH only
    over TLS with passwords checked by `dovecot`'s auth listener (Dovecot(auth_listener=True)),
    XCLIENT from 127.0.0.0/8, and relaying for authenticated users, which still delivers to
    the kit's own domains only. Runs `master -d` on its own config_directory, queue_directory
    and data_directory; logs to root/postfix.log through postlogd. Deferred mail is retried
    every 2-4 s, so tests need not wait for Postfix's default minutes; `settings` replaces or
    adds main.cf settings (a benchmark restores Postfix's retry defaults, say).
    """

    def __init__(
        self,
        root: Path,
        dovecot: Dovecot,
        domains: list[str],
        *,
        routes: Mapping[str, Dovecot] | None = None,
        host: str = HOST,
        xclient: bool = False,
        xforward: bool = False,
        tls: bool = False,
        submission: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(root, host, output="master.out", log="postfix.log")
        self.routes = {domain: dovecot for domain in domains} | dict(routes or {})
        self.settings = dict(settings or {})
        self.xclient = xclient
        self.xforward = xforward
        self.tls = tls
        self.port, submission_port = free_ports(2)
        self.submission_port = submission_port if submission else None
        self._sasl = dovecot.auth_endpoint if submission else None
        self.cafile, self._key = write_certificate(self.root / "tls", host) if submission or tls else (None, None)
        self.config_dir = self.root / "conf"
        self.config_dir.mkdir(exist_ok=True)
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        self.queue_dir = _socket_dir(self.root / "queue", self._temporaries)

    @property
    def endpoint(self) -> str:
        """smtpd's "host:port"."""
        return f"{self.host}:{self.port}"

    @property
    def submission_endpoint(self) -> str:
        """The submission smtpd's "host:port"; ValueError without the `submission` option."""
        if self.submission_port is None:
            raise ValueError(f"mailkit: Postfix {self.endpoint} has no submission listener (submission=True)")
        return f"{self.host}:{self.submission_port}"

    def _submission_service(self) -> list[str]:
        """master.cf lines of the submission smtpd (the -o settings apply to it alone)."""
        settings = {
            "syslog_name": "postfix/submission",
            "smtpd_tls_security_level": "encrypt",
            "smtpd_tls_cert_file": self.cafile,
            "smtpd_tls_key_file": self._key,
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:{self._sasl}",
            "smtpd_relay_restrictions": "permit_sasl_authenticated,reject",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
        }
        return [
            f"{self.host}:{self.submission_port} inet n - n - - smtpd",
            *(f"  -o {name}={value}" for name, value in settings.items()),
        ]

    def _write_config(self) -> None:
        def lmtp(d: Dovecot) -> str:
            return f"lmtp:inet:[{d.host}]:{d.ports['lmtp']}"

        (self.config_dir / "transport").write_text("".join(f"{dom} {lmtp(d)}\n" for dom, d in self.routes.items()))
        nowhere = "error:5.7.1 mailkit delivers to its own domains only"
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "maillog_file": self.log,
            "maillog_file_prefixes": self.root,
            "myhostname": f"mx-{self.port}.mailkit.test",
            "mydomain": "mailkit.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            # Not 127.0.0.0/8: tests connect from there and relaying must stay refused.
            "mynetworks": "192.0.2.1/32",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": "",
            "default_transport": nowhere,
            "relay_transport": nowhere,
            "virtual_mailbox_domains": " ".join(self.routes),
            "transport_maps": f"texthash:{self.config_dir / 'transport'}",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_peername_lookup": "no",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8" if self.xclient else "",
            "smtpd_authorized_xforward_hosts": "127.0.0.0/8" if self.xforward else "",
            "biff": "no",
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
        }
        if self.tls:
            main |= {
                "smtpd_tls_security_level": "may",
                "smtpd_tls_cert_file": self.cafile,
                "smtpd_tls_key_file": self._key,
                "smtpd_tls_loglevel": "1",
                "smtpd_tls_received_header": "yes",
            }
        main |= self.settings
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        services = [
            f"{self.host}:{self.port} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "lmtp unix - - n - - lmtp",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        if self.submission_port is not None:
            services += self._submission_service()
        if self.tls or self.submission_port is not None:
            services.append("tlsmgr unix - - n 1000? 1 tlsmgr")
        (self.config_dir / "master.cf").write_text("\n".join(services) + "\n")

    def start(self) -> None:
        """Write the config, let `postfix check` create the queue folders, run `master -d`
        and return once every smtpd greets with 220. Raises RuntimeError with the log tail on failure."""
        if self.running:
            raise RuntimeError(f"mailkit: Postfix {self.endpoint} already running")
        self._write_config()
        check = subprocess.run(
            ["postfix", "-c", str(self.config_dir), "check"], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"mailkit: postfix check failed:\n{check.stdout}{check.stderr}\n{self.log_tail()}")
        self._spawn([POSTFIX_MASTER, "-d", "-c", str(self.config_dir)])
        ports = self._listening_ports()
        self._wait(f"Postfix {self.endpoint}", lambda: all(_greeting(self.host, p, b"220") for p in ports), ports)

    def _listening_ports(self) -> list[int]:
        return [self.port] + ([self.submission_port] if self.submission_port else [])


@contextmanager
def dovecot(root: Path, users: Mapping[str, str], **options) -> Iterator[Dovecot]:
    """A started `Dovecot` (options as its constructor) that is closed on exit, whatever happens."""
    require("dovecot")
    instance = Dovecot(root, users, **options)
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


@contextmanager
def postfix(root: Path, dovecot: Dovecot, domains: list[str], **options) -> Iterator[Postfix]:
    """A started `Postfix` (options as its constructor) that is closed on exit, whatever happens."""
    require("postfix")
    instance = Postfix(root, dovecot, domains, **options)
    try:
        instance.start()
        yield instance
    finally:
        instance.close()
