"""A stop across processes: the draft's stop button or /cancel, handled by a process that does not
hold the chat, reaches the process that does, through PostgreSQL's LISTEN/NOTIFY.

In webhook mode a load balancer hands the stop to any process, while the answer is being written
by the chat's lease holder (ADR-07). The process that got the stop sends one notification, only
if another process holds the chat's lease now, naming that process; every process listens on a
connection of its own and stops the answer when it is the one named. A notification is delivered
when the statement sending it commits, within milliseconds, and is lost (like the stop itself)
if the holder dies meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import sql
from psycopg.rows import scalar_row

from services import database
from services.context import StorageUnavailable
from services.database import Connection, Pool

logger = logging.getLogger(__name__)

CHANNEL: Final = "llmbot_stop"
RECONNECT_S: Final = 1.0
WAIT_S: Final = 1.0  # how long one wait for notifications lasts: the listener's reaction to ``stop``

# The notification goes out only when another live process holds the chat, and names it.
NOTIFY_HOLDER: Final = """
    SELECT pg_notify(%(channel)s::text, json_build_object(
               'to', l.holder, 'chat', %(telegram_chat_id)s::bigint,
               'user', %(telegram_user_id)s::bigint, 'ident', %(ident)s::bigint
           )::text) IS NOT NULL
    FROM chats c JOIN chat_leases l ON l.chat_id = c.id
    WHERE c.telegram_chat_id = %(telegram_chat_id)s::bigint
      AND l.holder IS NOT NULL AND l.holder <> %(holder)s::text AND l.expires_at > now()
"""


@dataclass(frozen=True, slots=True)
class StopSignal:
    """Stop the answer being written in ``chat_id`` (by ``user_id``, or for question ``ident``)."""

    chat_id: int
    user_id: int | None
    ident: int | None


async def notify_holder(
    conn: Connection, *, telegram_chat_id: int, telegram_user_id: int | None, ident: int | None, holder: str
) -> bool:
    """Send the stop to the process holding the chat, if it is not ``holder``; whether one did."""
    cur = conn.cursor(row_factory=scalar_row)
    params = {"telegram_chat_id": telegram_chat_id, "telegram_user_id": telegram_user_id, "ident": ident}
    await cur.execute(NOTIFY_HOLDER, {**params, "holder": holder, "channel": CHANNEL})
    return bool(await cur.fetchone())


class ChatSignals:
    """This process's end of the channel: sends stops to other processes and passes those
    naming it to ``on_stop``."""

    def __init__(self, pool: Pool, *, holder: str, on_stop: Callable[[StopSignal], object]) -> None:
        self.pool = pool
        self.holder = holder
        self._on_stop = on_stop
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def send_stop(self, chat_id: int, *, user_id: int | None = None, ident: int | None = None) -> bool:
        """Ask the process holding the chat (if another one does) to stop its answer; whether one
        was asked. Raises ``StorageUnavailable`` when the database does not answer."""
        try:
            return await database.run(
                self.pool,
                notify_holder,
                telegram_chat_id=chat_id,
                telegram_user_id=user_id,
                ident=ident,
                holder=self.holder,
            )
        except psycopg.Error as error:
            raise StorageUnavailable(type(error).__name__) from error

    def start(self) -> None:
        """Listen for stops naming this process, until ``stop``."""
        self._task = asyncio.create_task(self._listen(), name="chat-signals")

    async def stop(self) -> None:
        """Stop listening (within ``WAIT_S``)."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                assert isinstance(self.pool.conninfo, str)
                async with await psycopg.AsyncConnection.connect(self.pool.conninfo, autocommit=True) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    while not self._stopping.is_set():
                        async for notify in conn.notifies(timeout=WAIT_S):
                            self._received(notify.payload)
            except psycopg.Error as error:
                logger.warning("not listening for stops from other processes: %s", type(error).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), RECONNECT_S)

    def _received(self, payload: str) -> None:
        signal = json.loads(payload)
        if signal["to"] != self.holder:
            return
        logger.info("stop for chat %s from another process", signal["chat"])
        self._on_stop(StopSignal(signal["chat"], signal["user"], signal["ident"]))
