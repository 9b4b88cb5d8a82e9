"""The durable queue: the spool on disk and the scheduler that drains it."""
