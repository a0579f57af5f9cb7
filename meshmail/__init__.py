"""meshmail: one face on many mail servers.

Masters route IMAP, POP3, SMTP and HTTP to the slave that hosts each user's domain; every
master and slave runs a gossip node that shares membership and the cluster state.
"""

__version__ = "0.1.0"
