"""The slave agent: domain sources, backend health, publishing."""
