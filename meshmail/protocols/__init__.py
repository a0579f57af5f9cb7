"""Sans-IO codecs of the mail protocols meshmail speaks: bytes in, events and reply bytes out.
No sockets, no trio, nothing else of meshmail: the proxy and the MX drive them."""
