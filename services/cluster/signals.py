"""Stops across processes: the draft's stop button or /cancel (stop the answer, keep what was
written), and /clear (cancel the user's running turn), handled by a process that does not hold the chat,
reach the process that does, through PostgreSQL's LISTEN/NOTIFY.

In webhook mode a load balancer hands these to any process, while the answer is being written by
the chat's lease holder (ADR-07). The process that got one sends one notification, only if
another process holds the chat's lease now, naming that process; every process listens on a
connection of its own and acts when it is the one named. A notification is delivered when the
statement sending it commits, within milliseconds, and is lost (like the answer in progress) if
the holder dies meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import psycopg
from psycopg import sql
from psycopg.rows import scalar_row

from services.context import call
from services.database import Connection, Pool, connect_session

logger = logging.getLogger(__name__)

CHANNEL: Final = "llmbot_chat_signals"
RECONNECT_S: Final = 1.0
WAIT_S: Final = 1.0  # how long one wait for notifications lasts: the listener's reaction to ``stop``

# The notification goes out only when another live process holds the chat, and names it.
NOTIFY_HOLDER: Final = """
    SELECT pg_notify(%(channel)s::text, json_build_object(
               'to', l.holder, 'kind', %(kind)s::text, 'chat', %(telegram_chat_id)s::bigint,
               'user', %(telegram_user_id)s::bigint, 'ident', %(ident)s::bigint
           )::text) IS NOT NULL
    FROM chats c JOIN chat_leases l ON l.chat_id = c.id
    WHERE c.telegram_chat_id = %(telegram_chat_id)s::bigint
      AND l.holder IS NOT NULL AND l.holder <> %(holder)s::text AND l.expires_at > now()
"""


@dataclass(frozen=True, slots=True)
class ChatSignal:
    """``stop`` the answer being written in ``chat_id`` (by ``user_id``, or for question
    ``ident``), keeping what was written; or ``cancel`` the running turn of ``user_id`` there."""

    kind: Literal["stop", "cancel"]
    chat_id: int
    user_id: int | None
    ident: int | None = None


async def notify_holder(conn: Connection, *, signal: ChatSignal, holder: str) -> bool:
    """Send ``signal`` to the process holding its chat, if that is not ``holder``; whether one did."""
    cur = conn.cursor(row_factory=scalar_row)
    params = {
        "kind": signal.kind,
        "telegram_chat_id": signal.chat_id,
        "telegram_user_id": signal.user_id,
        "ident": signal.ident,
        "holder": holder,
        "channel": CHANNEL,
    }
    await cur.execute(NOTIFY_HOLDER, params)
    return bool(await cur.fetchone())


class ChatSignals:
    """This process's end of the channel: sends signals to other processes and passes those
    naming it to ``on_signal``."""

    def __init__(self, pool: Pool, *, holder: str, on_signal: Callable[[ChatSignal], object]) -> None:
        self.pool = pool
        self.holder = holder
        self._on_signal = on_signal
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def send(self, signal: ChatSignal) -> bool:
        """Pass ``signal`` to the process holding its chat (if another one does); whether one was
        told. Raises ``StorageUnavailable`` when the database does not answer."""
        return await call(self.pool, notify_holder, signal=signal, holder=self.holder)

    def start(self) -> None:
        """Listen for signals naming this process, until ``stop``."""
        self._task = asyncio.create_task(self._listen(), name="chat-signals")

    async def stop(self) -> None:
        """Stop listening (within ``WAIT_S``)."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                async with await connect_session(self.pool) as conn:  # LISTEN needs a session of its own
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    while not self._stopping.is_set():
                        async for notify in conn.notifies(timeout=WAIT_S):
                            try:
                                self._received(notify.payload)
                            except Exception:  # one signal that cannot be acted on must not stop the listening
                                logger.exception("signal on %s not acted on", CHANNEL)
            except psycopg.Error as error:
                logger.warning("not listening for other processes' signals: %s", type(error).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), RECONNECT_S)

    def _received(self, payload: str) -> None:
        signal = json.loads(payload)
        if signal["to"] != self.holder:
            return
        logger.info("%s for chat %s from another process", signal["kind"], signal["chat"])
        self._on_signal(ChatSignal(signal["kind"], signal["chat"], signal["user"], signal["ident"]))
