"""Inbound mail on a master: the durable spool of messages a slave could not take yet, the
in-memory index that schedules their delivery, and the delivery status notifications sent
when they fail."""
