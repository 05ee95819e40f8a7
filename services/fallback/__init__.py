"""The outage fallback: the recent history in process memory and the spool of writes, written back in order."""
