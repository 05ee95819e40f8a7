"""The suite's watchdog: what it writes about a hung test is enough to see what hangs."""

from __future__ import annotations

import asyncio

from services.database import Pool
from tests.watchdog import Watchdog


async def stuck_on_an_event(event: asyncio.Event) -> None:
    await event.wait()


async def test_the_diagnosis_names_the_awaiting_coroutine_and_the_backend_waiting_for_a_lock(
    pool: Pool, admin_url: str
) -> None:
    watchdog = Watchdog(hung_after_s=10**9)  # never fires here
    watchdog.database_url = admin_url
    released = asyncio.Event()
    stuck = asyncio.create_task(stuck_on_an_event(released), name="stuck-task")
    async with pool.connection() as holder, holder.transaction():
        await holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        waiter = asyncio.create_task(pool_query(pool, "SELECT count(*) FROM users"))
        for _ in range(200):
            diagnosis = await asyncio.to_thread(watchdog.diagnosis, "tests/x.py::test_x", 301)
            if "'Lock'" in diagnosis:
                break
            await asyncio.sleep(0.05)
    await waiter
    released.set()
    await stuck
    assert "tests/x.py::test_x has run for 301s" in diagnosis
    assert "--- stuck-task" in diagnosis and "stuck_on_an_event" in diagnosis
    lock_waits = [line for line in diagnosis.splitlines() if "'Lock'" in line]
    assert lock_waits and "SELECT count(*) FROM users" in lock_waits[0]
    assert "[]" not in lock_waits[0]  # pg_blocking_pids names the holder


async def pool_query(pool: Pool, query: str) -> None:
    async with pool.connection() as conn:
        await conn.execute(query)
