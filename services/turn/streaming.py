"""An answer shown while the LLM writes it.

In a private chat the text streams as a Telegram *draft* (``sendMessageDraft``: animated, with a
stop button); wherever drafts are refused (groups, an older Bot API) the first part is sent as a
message and edited in place. Either way Telegram is called at most once per interval (the draft
interval for drafts, the edit interval for edits, also after a refused draft), always with the
latest text (never a backlog), and a reply longer than one message continues in a new one; a
preview that would show nothing new is not sent, and an answer that arrives in one piece gets
none (the final message follows at once).
What is shown is rendered from the Markdown so far (``services.text.formatting``), so a half-written
construct renders as text until it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from services.text.formatting import Part, render, split
from services.turn.delivery import Address, Delivery, DeliveryFailed, DeliveryRefused, DraftsUnavailable

logger = logging.getLogger(__name__)


@dataclass
class Shown:
    """What the user can see of an answer so far: messages whose part is complete, and the
    message still being edited (edit mode)."""

    complete: list[int] = field(default_factory=list)
    editing: int | None = None
    editing_shows: Part | None = None  # what the message being edited shows now


class LiveReply:
    """Streams an answer to ``address``: ``write`` the Markdown so far as it grows, ``finish`` at
    the end; the turn then delivers the final parts (see ``Turn._deliver``)."""

    def __init__(
        self,
        delivery: Delivery,
        address: Address,
        *,
        draft_id: int | None,
        draft_interval_s: float,
        edit_interval_s: float,
        replacing: int | None = None,
    ) -> None:
        """``draft_id``: stream as this draft (None: edit a message); the pause after each draft
        or edit; ``replacing``: the message to edit from the start (it shows an answer this one
        replaces)."""
        self._delivery = delivery
        self._address = address
        self._draft_id = draft_id
        self._draft_interval_s = draft_interval_s
        self._edit_interval_s = edit_interval_s
        self._latest = ""
        self._showing = ""  # the Markdown whose preview is on the screen
        self._shown_parts: list[Part] = []  # that preview, rendered
        self._task: asyncio.Task[None] | None = None
        self._calling = False  # a call to Telegram is in flight
        self._closing = False
        self.shown = Shown(editing=replacing)
        self.visible = asyncio.Event()  # set once the first text is on the screen

    def write(self, markdown: str) -> None:
        """The answer so far; shown within the interval, unless newer text replaces it first."""
        self._latest = markdown
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._show_latest())

    async def finish(self) -> Shown:
        """Stop streaming (after the call in flight, so no stale preview lands after the final
        text); what the user can see."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            if not self._calling:
                task.cancel()  # it is only waiting out the interval
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return self.shown

    async def _show_latest(self) -> None:
        # One pass of the event loop first, for the rest of a burst: an answer that comes in one
        # piece (an endpoint that does not stream) is finished by then and needs no preview.
        await asyncio.sleep(0)
        while self._latest != self._showing and not self._closing:
            markdown = self._latest
            parts = split(render(markdown, partial=True))
            if parts == self._shown_parts:  # grown by nothing that shows (spaces, a construct just opened)
                self._showing = markdown
                continue
            self._calling = True
            try:
                await self._show(parts)
            except DraftsUnavailable as refused:
                if not refused.server_wide:  # a server without drafts was named once, when found
                    logger.info("drafts refused in chat %s: editing a message instead", self._address.chat_id)
                self._draft_id = None
                continue
            except (DeliveryRefused, DeliveryFailed) as error:
                # The preview is a courtesy: the final delivery reports what matters.
                logger.warning("live preview in chat %s stopped: %s", self._address.chat_id, error)
                return
            finally:
                self._calling = False
            self._showing, self._shown_parts = markdown, parts
            self.visible.set()
            if not self._closing:
                await asyncio.sleep(self._draft_interval_s if self._draft_id is not None else self._edit_interval_s)

    async def _show(self, parts: list[Part]) -> None:
        if not parts:
            return
        shown = self.shown
        # Parts before the last are complete: each becomes a message of its own, once.
        while len(shown.complete) < len(parts) - 1:
            part = parts[len(shown.complete)]
            if shown.editing is not None:
                if part != shown.editing_shows:
                    await self._delivery.edit(self._address, shown.editing, part)
                shown.complete.append(shown.editing)
                shown.editing, shown.editing_shows = None, None
            else:
                shown.complete.append(await self._delivery.send(self._address, part, quote=not shown.complete))
        last = parts[-1]
        if self._draft_id is not None:
            await self._delivery.draft(self._address, self._draft_id, last)
            return
        if shown.editing is None:
            shown.editing = await self._delivery.send(self._address, last, quote=not shown.complete)
        elif last != shown.editing_shows:
            await self._delivery.edit(self._address, shown.editing, last)
        shown.editing_shows = last
