"""[proxy]: listeners on by default and each one off with false; without a certificate only plain
listeners on loopback; limits and timeouts checked; the template documents every key."""

from __future__ import annotations

import pytest
from helpers.config import minimal_config

from meshmail.config import ConfigError, loads
from meshmail.config.template import example
from meshmail.core.address import Address
from meshmail.metrics import Metrics
from meshmail.proxy.session import MAX_FAILURE_DELAY, Proxy

CERT = 'cert = "/etc/mail.pem"\nkey = "/etc/mail.key"\n'


def proxy(text: str):
    return loads(minimal_config(extra="[proxy]\n" + text)).proxy


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        proxy(text)
    return str(caught.value).split(": ", 1)[1]


def test_no_table_no_proxy():
    assert loads(minimal_config()).proxy is None


def test_every_listener_on_by_default_with_a_certificate():
    section = proxy(CERT)
    assert section.listeners == {
        "imap": Address("0.0.0.0", 143),
        "imaps": Address("0.0.0.0", 993),
        "pop3": Address("0.0.0.0", 110),
        "pop3s": Address("0.0.0.0", 995),
        "submission": Address("0.0.0.0", 587),
        "submissions": Address("0.0.0.0", 465),
    }
    assert section.require_tls and section.tls_verify and section.tls
    assert (
        section.login_timeout,
        section.imap_idle,
        section.pop3_idle,
        section.smtp_idle,
    ) == (60, 1860, 600, 300)


def test_listeners_turned_off_and_moved():
    section = proxy(CERT + 'imaps = false\npop3 = ""\npop3s = false\nsubmission = "127.0.0.1:0"\n')
    assert section.listeners == {
        "imap": Address("0.0.0.0", 143),
        "submission": Address("127.0.0.1", 0),
        "submissions": Address("0.0.0.0", 465),
    }


def test_without_a_certificate_only_plain_loopback_listeners():
    off = "imaps = false\npop3s = false\nsubmissions = false\n"
    section = proxy(off + 'imap = "127.0.0.1:0"\npop3 = "[::1]:0"\nsubmission = "localhost:0"\n')
    assert not section.tls and set(section.listeners) == {"imap", "pop3", "submission"}
    assert refused('imap = "127.0.0.1:0"\npop3 = false\nsubmission = false\n').startswith(
        "proxy.imaps: needs proxy.cert and proxy.key"
    )
    assert refused(off + 'pop3 = "127.0.0.1:0"\nsubmission = false\n').startswith(
        "proxy.imap: 0.0.0.0:143 is not a loopback address"
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('cert = "/etc/mail.pem"\n', "proxy.key: cert and key go together"),
        (CERT + "max_sessions = 0\n", "proxy.max_sessions: must be at least 1"),
        (
            CERT + "login_timeout = 0\n",
            "proxy.login_timeout: must be 1 to 86400 seconds",
        ),
        (CERT + 'imap = "nowhere"\n', "proxy.imap: 'nowhere' is not host:port"),
        (
            CERT + 'backend_cas = "x"\n',
            "proxy.backend_cas: expected a table of node name = CA file, got a string",
        ),
        (
            CERT + "imapp = false\n",
            "proxy.imapp: unknown key (did you mean proxy.imap?)",
        ),
    ],
)
def test_bad_values_name_their_key(text, error):
    assert refused(text) == error


def test_backend_cas_by_slave():
    assert proxy(CERT + 'backend_cas = { s1 = "/ca/s1.pem" }\n').backend_cas == {"s1": "/ca/s1.pem"}


def test_the_template_documents_every_key():
    text = example()
    for key in (
        "imap",
        "imaps",
        "pop3s",
        "submissions",
        "cert",
        "require_tls",
        "default_domain",
        "tls_verify",
    ):
        assert f"# {key} = " in text
    assert "# [proxy]" in text


def test_the_failure_delay_doubles_with_each_recent_failure_up_to_a_ceiling():
    section = proxy(CERT + "failure_delay = 2\nfailures_per_client = 4\nfailures_per_account = 2\n")
    limits = Proxy(section, router=None, connector=None, certificate=None, metrics=Metrics())
    assert [limits.failure_delay(n) for n in range(5)] == [2.0, 4.0, 8.0, MAX_FAILURE_DELAY, MAX_FAILURE_DELAY]
    assert (limits.throttle.per_address, limits.throttle.per_account) == (4, 2)
    assert refused(CERT + "failures_per_client = 0\n") == "proxy.failures_per_client: must be at least 1"
