"""A hung test becomes a failed run with a diagnosis, instead of a CI job that waits forever.

The suite runs every async test in one event loop, so a hang shows as an idle loop: nothing in
the thread stacks says what is awaited. Past ``HUNG_AFTER_S`` the watchdog writes what is:
the stack of every pending asyncio task and the server's view of its backends (who waits for
which lock), then interrupts the run as Ctrl-C would.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import signal
import threading
import time
from typing import Final

import psycopg

HUNG_AFTER_S: Final = 300.0  # the slowest test takes about a minute on a loaded 2-core machine
ACTIVITY: Final = """
    SELECT pid, state, wait_event_type, wait_event, pg_blocking_pids(pid) AS blocked_by,
           now() - xact_start AS in_transaction, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query
    FROM pg_stat_activity WHERE datname IS NOT NULL AND pid <> pg_backend_pid()
"""


class Watchdog:
    """Watches the test running now from a thread of its own."""

    def __init__(self, hung_after_s: float = HUNG_AFTER_S) -> None:
        self.hung_after_s = hung_after_s
        self.database_url = ""
        self._test: str | None = None
        self._started = 0.0
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="test-watchdog", daemon=True).start()

    def entered(self, test: str | None) -> None:
        with self._lock:
            self._test, self._started = test, time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(5)
            with self._lock:
                test, running_s = self._test, time.monotonic() - self._started
            if test is not None and running_s > self.hung_after_s:
                os.write(2, self.diagnosis(test, running_s).encode())  # past pytest's capture
                os.kill(os.getpid(), signal.SIGINT)
                return

    def diagnosis(self, test: str, running_s: float) -> str:
        out = io.StringIO()
        out.write(f"\n=== {test} has run for {running_s:.0f}s: hung. Pending asyncio tasks:\n")
        # From another thread, so a snapshot without the loop's help: every Task object alive.
        for task in [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]:
            out.write(f"--- {task.get_name()}\n")
            task.print_stack(limit=40, file=out)
        out.write("=== The server's backends:\n")
        try:
            with psycopg.connect(self.database_url, connect_timeout=5, autocommit=True) as conn:
                for row in conn.execute(ACTIVITY):
                    out.write(f"{row}\n")
        except psycopg.Error as error:
            out.write(f"(not readable: {error})\n")
        return out.getvalue()
