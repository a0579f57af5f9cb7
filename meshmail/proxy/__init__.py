"""The IMAP, POP3 and submission proxy of a master: each client logs in here, its account is
resolved to the slave that hosts its domain, the same credentials log in there, and the two
connections are spliced. The protocols themselves are the codecs of meshmail.protocols;
this package is their trio drivers (session.py), the backend connector (backend.py), the
splice (splice.py) and the service that listens (service.py).
"""
