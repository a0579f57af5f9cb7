"""What the tests share: config text, the meshmail command, in-process and multi-process
nodes, and real Dovecot/Postfix. Test modules import from here, never from each other;
tests/conftest.py holds only fixtures."""
