"""SWIM + Lifeguard gossip membership: who is in the cluster and who is alive.

Messages and their codec, the keyring and envelope, timing maths, the broadcast queue,
the membership state machine (`Memberlist`) and its transports (UDP/TCP and in-memory).
"""
