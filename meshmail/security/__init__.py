"""Cluster security: the cluster CA and node certificates, join and API tokens, password
hashing, and the files that hold a node's secrets. Pure functions and records; no trio."""
