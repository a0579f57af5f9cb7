"""Replicated cluster state: hybrid logical clock, LWW map with tombstones and digests, records.

Pure data structures with no I/O and nothing of ours imported; gossip carries their bytes,
the journal persists them, routing reads them.
"""

from meshmail.state.hlc import ClockSkewError, HybridClock, Timestamp
from meshmail.state.lww import (
    DecodedEntries,
    Entry,
    LWWMap,
    chunks,
    decode_entries,
    encode_entries,
)
from meshmail.state.records import (
    NAMESPACES,
    AddressOverride,
    BadEntry,
    DomainRoute,
    decode_value,
    encode_value,
    make_key,
    split_key,
)

__all__ = [
    "NAMESPACES",
    "AddressOverride",
    "BadEntry",
    "ClockSkewError",
    "DecodedEntries",
    "DomainRoute",
    "Entry",
    "HybridClock",
    "LWWMap",
    "Timestamp",
    "chunks",
    "decode_entries",
    "decode_value",
    "encode_entries",
    "encode_value",
    "make_key",
    "split_key",
]
