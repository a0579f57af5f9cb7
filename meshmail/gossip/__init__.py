"""SWIM + Lifeguard gossip membership: who is in the cluster and who is alive.

Messages and their codec, the keyring and envelope, timing maths, the broadcast queue, the
membership state machine (state.py), probing (probe.py), the network side (net.py,
frames.py), the delegate hooks, and `Memberlist` (memberlist.py), which ties them together.
"""
