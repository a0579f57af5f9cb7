"""The foundation every other layer imports: addresses, node names and roles, errors, clocks,
durable file writes. It imports nothing else of meshmail and knows nothing of mail or gossip."""
