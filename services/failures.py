"""The failure model of the data layer: what a database error means, decided once (ADR-08).

========================  =============================================  ==============================
class                     recognised by                                  what it does
========================  =============================================  ==============================
``OUTAGE``                the pool has no connection for a while and a   degraded mode: answers from
                          new one is refused or times out; SQLSTATE      memory, writes spooled
                          class 53 (disk full, out of memory)            (``StorageUnavailable``)
``BROKEN``                class 08, ``57P01``-``57P03`` (terminated,     the statement runs again on a
                          crash, starting up), or a connection lost      fresh connection; never
                          with no SQLSTATE                               degraded while one opens
``BAD_REQUEST``           class 22 (data), 23 (constraint), 54 (a        ``BadRequest``: one line to the
                          limit of the server), psycopg's own            user who sent it; nothing else
                          ``DataError`` (a NUL it refuses to send)       changes
``BUG``                   anything else: our SQL, an internal error      raised as it is: the traceback
                                                                         in the log, the apology
========================  =============================================  ==============================

Imports nothing of ours: the pool, the context service, the spool's write-back and the handlers
all route by it.
"""

from __future__ import annotations

import enum

import psycopg
from psycopg_pool import PoolTimeout


class Failure(enum.Enum):
    OUTAGE = "outage"
    BROKEN = "broken"
    BAD_REQUEST = "bad_request"
    BUG = "bug"


class StorageUnavailable(Exception):
    """The database is out: it refuses or does not answer a new connection."""


class BadRequest(Exception):
    """The database refused what this request asked of it (its input); the argument is the
    SQLSTATE, or the driver's class name when the driver refused it itself."""


_BROKEN_STATES = frozenset({"57P01", "57P02", "57P03"})  # admin shutdown, crash shutdown, cannot connect now
_BAD_REQUEST_CLASSES = frozenset({"22", "23", "54"})


def classify(error: psycopg.Error) -> Failure:
    """The class of ``error``, raised by a statement run through ``database.run``."""
    if isinstance(error, PoolTimeout):  # ``database.run`` lets it through only once the server is asked
        return Failure.OUTAGE
    state = error.sqlstate or ""
    if state[:2] == "08" or state in _BROKEN_STATES or (not state and isinstance(error, psycopg.OperationalError)):
        return Failure.BROKEN
    if state[:2] == "53":
        return Failure.OUTAGE
    if state[:2] in _BAD_REQUEST_CLASSES or (not state and isinstance(error, psycopg.DataError)):
        return Failure.BAD_REQUEST
    return Failure.BUG


# What no retry of this request can mend now, only the database's return: an outage, or a
# connection that kept breaking past ``database.run``'s runs again. Writes wait (degraded mode,
# the spool's next round); nothing is said to be wrong with the request.
RETRY_LATER: frozenset[Failure] = frozenset({Failure.OUTAGE, Failure.BROKEN})


def reason(error: psycopg.Error) -> str:
    """What to log of ``error``: its class and SQLSTATE, never its message (a driver message can
    quote the row it failed on)."""
    return f"{type(error).__name__} ({error.sqlstate})" if error.sqlstate else type(error).__name__
