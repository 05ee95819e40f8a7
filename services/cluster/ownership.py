"""Who answers a chat, behind one protocol: this process alone, or whichever process holds the
chat's lease.

``SingleProcess``: polling (Telegram allows one consumer), or no database. Every chat is this
process's, there is nothing to agree on and no one to tell. ``Leased``: webhook mode, where
several processes may share one database (ADR-07). A new question takes or bumps the chat's
lease in the statement that stores it; the holder answers the chat's turns one by one and hands
the chat over after each; a stop or a /clear that reaches another process is passed on to the
holder. The turn pipeline asks the same questions of both and never checks which one it has.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.cluster.leases import Handover, Leases, NextQuestion
from services.cluster.signals import ChatSignal, ChatSignals
from services.failures import StorageUnavailable

logger = logging.getLogger(__name__)

OnNext = Callable[[int, NextQuestion], None]  # the chat's next question, handed to this process
OnSignal = Callable[[ChatSignal], None]  # a stop or a cancel another process passed on


@dataclass(frozen=True, slots=True)
class LastPart:
    """What ``record_last_part`` did: whether it recorded the part (False: the caller records
    it), and the chat's hand-over taken in the same round trip (None: to be asked after the turn)."""

    recorded: bool
    handover: Handover | None = None


class Ownership(Protocol):
    """What the turn pipeline asks about who answers a chat."""

    @property
    def holder(self) -> str | None:
        """The name a new question takes the chat's lease for (None: no lease is asked for)."""

    @property
    def ttl_s(self) -> int:
        """How long a lease lasts when it is not renewed."""

    @property
    def hands_over(self) -> bool:
        """Whether a chat passes to its next question's process after each turn (``after``)."""

    def asked(self, chat_id: int, *, leased: bool | None, version: int | None, sent: float) -> bool:
        """Whether this process answers a new question, from what storing it found about the
        chat's lease (``leased``, ``version``; the statement was sent at ``sent``, monotonic)."""

    def answers(self, chat_id: int, question_id: int | None) -> bool:
        """Whether this process answers the chat's turns now."""

    async def take(self, chat_id: int, question_id: int | None) -> bool:
        """Whether this process may run the turn of a question that is not new (a /retry, an
        edit, a recovered turn); when not, the process holding the chat answers it in its turn."""

    async def secure(self, chat_id: int, question_id: int | None) -> None:
        """Before a turn stores or sends anything: raises ``LeaseLost`` when the chat has gone
        to another process."""

    async def record_last_part(self, chat_id: int, *, answer_id: int, telegram_message_id: int) -> LastPart:
        """Record the last part of an answer with the chat's hand-over, when that saves a round trip."""

    async def after(
        self, chat_id: int, question_id: int | None, *, settled: bool, handover: Handover | None
    ) -> NextQuestion | None:
        """After a turn (inside the chat's intake): the chat's next question for this process."""

    async def tell_holder(self, signal: ChatSignal) -> bool:
        """Pass ``signal`` to the process holding its chat when that is another one; whether one was told."""

    def start(self, on_next: OnNext, on_signal: OnSignal) -> None:
        """Start tending: questions handed to this process go to ``on_next``, signals to ``on_signal``."""

    async def release(self) -> None:
        """Let go of every chat this process holds, for another to take at once."""

    async def stop(self) -> None:
        """Stop tending and let go of every chat."""


class SingleProcess:
    """Every chat is this process's: nothing to take, secure, hand over or pass on."""

    holder: str | None = None
    ttl_s = 0
    hands_over = False

    def asked(self, chat_id: int, *, leased: bool | None, version: int | None, sent: float) -> bool:
        return True

    def answers(self, chat_id: int, question_id: int | None) -> bool:
        return True

    async def take(self, chat_id: int, question_id: int | None) -> bool:
        return True

    async def secure(self, chat_id: int, question_id: int | None) -> None:
        return None

    async def record_last_part(self, chat_id: int, *, answer_id: int, telegram_message_id: int) -> LastPart:
        return LastPart(recorded=False)

    async def after(
        self, chat_id: int, question_id: int | None, *, settled: bool, handover: Handover | None
    ) -> NextQuestion | None:
        return None

    async def tell_holder(self, signal: ChatSignal) -> bool:
        return False

    def start(self, on_next: OnNext, on_signal: OnSignal) -> None:
        return None

    async def release(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class Leased:
    """The chat's lease decides (``services.cluster.leases``); signals reach the holder by
    PostgreSQL's LISTEN/NOTIFY (``services.cluster.signals``). While the bot is degraded (its
    database out, or being written back to) there is no one to agree with, or no way to: the
    checks that need the database are skipped and the writes meet the outage their own way."""

    hands_over = True

    def __init__(self, leases: Leases, *, degraded: Callable[[], bool]) -> None:
        self._leases = leases
        self._degraded = degraded
        self._signals: ChatSignals | None = None

    @property
    def holder(self) -> str | None:
        return self._leases.holder

    @property
    def ttl_s(self) -> int:
        return self._leases.ttl_s

    def asked(self, chat_id: int, *, leased: bool | None, version: int | None, sent: float) -> bool:
        if leased is None:  # stored while degraded: spooled, answered here
            return True
        self._leases.note(chat_id, held=leased, version=version or 0, sent=sent)
        return leased

    def answers(self, chat_id: int, question_id: int | None) -> bool:
        # A question kept only in the spool has no lease to follow: it is answered where it was asked.
        return question_id is None or self._leases.holds(chat_id)

    async def take(self, chat_id: int, question_id: int | None) -> bool:
        if question_id is None:
            return True
        if await self._leases.take(chat_id, question_id):
            return True
        logger.info("question %s left to the process holding chat %s", question_id, chat_id)
        return False

    async def secure(self, chat_id: int, question_id: int | None) -> None:
        if question_id is None or self._degraded():
            return
        with contextlib.suppress(StorageUnavailable):  # the store or the send meets the outage its own way
            await self._leases.secure(chat_id)

    async def record_last_part(self, chat_id: int, *, answer_id: int, telegram_message_id: int) -> LastPart:
        if not self._leases.holds(chat_id) or self._degraded():
            return LastPart(recorded=False)
        try:
            handover = await self._leases.record_last_part(
                chat_id, answer_id=answer_id, telegram_message_id=telegram_message_id
            )
        except StorageUnavailable:
            return LastPart(recorded=False)  # not known to be recorded: the storage records it, or spools it
        return LastPart(recorded=True, handover=handover)

    async def after(
        self, chat_id: int, question_id: int | None, *, settled: bool, handover: Handover | None
    ) -> NextQuestion | None:
        if question_id is None or not self._leases.holds(chat_id):
            return None
        if handover is not None:  # taken with the delivery's record
            return handover.question
        # A settled question is not named: should it be asked again meanwhile (a /retry at
        # another process), the hand-over finds it open and answers it.
        return await self._hand_over(chat_id, None if settled else question_id)

    async def _hand_over(self, chat_id: int, finished: int | None) -> NextQuestion | None:
        """The lease's next question for this chat (stored by this process or another); with
        none left the lease is released."""
        try:
            return (await self._leases.handover(chat_id, finished=finished)).question
        except StorageUnavailable:
            logger.warning("chat %s: lease not handed over (database unavailable); it expires", chat_id)
            return None

    async def tell_holder(self, signal: ChatSignal) -> bool:
        if self._signals is None or self._leases.holds(signal.chat_id) or self._degraded():
            return False
        try:
            return await self._signals.send(signal)
        except StorageUnavailable:
            return False

    def start(self, on_next: OnNext, on_signal: OnSignal) -> None:
        async def swept(chat_id: int) -> None:
            found = await self._hand_over(chat_id, None)
            if found is not None:
                on_next(chat_id, found)

        self._leases.start(swept)
        self._signals = ChatSignals(self._leases.pool, holder=self._leases.holder, on_signal=on_signal)
        self._signals.start()

    async def release(self) -> None:
        if not self._degraded():
            with contextlib.suppress(StorageUnavailable):
                await self._leases.expire_mine()

    async def stop(self) -> None:
        if self._signals is not None:
            await self._signals.stop()
        await self._leases.stop()
        with contextlib.suppress(StorageUnavailable):
            await self._leases.expire_mine()  # what is left, another process takes at once
