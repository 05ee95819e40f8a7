"""services.turn.queue and handlers.flood on their own, with fakes for the work they order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiogram import Bot
from aiogram.exceptions import TelegramRetryAfter
from aiogram.methods import GetMe, SendMessage

from handlers.flood import FloodControl
from services.turn.queue import ChatQueues, Stopped
from tests.harness import TOKEN


class Recorder:
    """Jobs that log their start and end and wait until released."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.running = 0
        self.peak = 0

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def job(self, name: str) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.log.append(f"start {name}")
        try:
            await self.gate(name).wait()
            if name.startswith("boom"):
                raise RuntimeError(name)
        finally:
            self.running -= 1
            self.log.append(f"end {name}")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_one_chat_runs_in_order_and_chats_run_side_by_side_within_the_limit() -> None:
    recorder = Recorder()
    queues: ChatQueues[str] = ChatQueues(recorder.job, limit=2)
    done = [queues.submit(chat, index, f"{chat}{index}") for index, chat in enumerate([1, 1, 2, 3])]
    await settle()
    assert recorder.log == ["start 10", "start 22"]  # 11 waits for 10; 33 waits for a slot
    recorder.gate("10").set()
    await settle()
    assert recorder.log[:3] == ["start 10", "start 22", "end 10"]
    assert recorder.log[3:] in (["start 11"], ["start 33"])  # the freed slot, and only it, is taken
    for gate in ("11", "22", "33"):
        recorder.gate(gate).set()
    await asyncio.wait(done)
    assert recorder.peak == 2
    assert recorder.log.index("start 11") > recorder.log.index("end 10")
    assert await queues.drain(1) == 0
    assert queues._chats == {}  # idle chats are forgotten


async def test_a_failing_job_does_not_stop_its_chat() -> None:
    recorder = Recorder()
    queues: ChatQueues[str] = ChatQueues(recorder.job, limit=10)
    for name in ("boom", "after"):
        recorder.gate(name).set()
    first = queues.submit(1, 1, "boom")
    second = queues.submit(1, 2, "after")
    await asyncio.wait([first, second])
    assert recorder.log == ["start boom", "end boom", "start after", "end after"]


async def test_an_item_queued_or_running_is_not_queued_twice() -> None:
    recorder = Recorder()
    queues: ChatQueues[str] = ChatQueues(recorder.job, limit=10)
    first = queues.submit(1, 7, "x")
    await settle()
    assert queues.submit(1, 7, "x") is first  # running
    queues.submit(1, 8, "y")
    assert queues.submit(1, 8, "y") is not first  # queued: the same future as the first submit
    recorder.gate("x").set()
    recorder.gate("y").set()
    await queues.drain(1)
    assert recorder.log == ["start x", "end x", "start y", "end y"]


async def test_cancel_drops_matching_queued_items_and_stops_the_running_one() -> None:
    stopped: list[str] = []
    queues: ChatQueues[str] = ChatQueues(lambda item: work(item), limit=10)
    never = asyncio.Event()

    async def work(item: str) -> None:
        try:
            await queues.stoppable(1, never.wait())
        except Stopped:
            stopped.append(item)

    queues.submit(1, 1, "mine-running")
    queues.submit(1, 2, "mine-queued")
    other = queues.submit(1, 3, "other-queued")
    await settle()
    await queues.cancel(1, lambda item: item.startswith("mine"))
    assert stopped == ["mine-running"]  # stopped, and cancel returned only once it had ended
    await settle()
    assert not other.done()  # the other user's item runs next, untouched
    await queues.cancel(1, lambda item: True)
    await asyncio.wait_for(other, 1)
    assert stopped == ["mine-running", "other-queued"]


async def test_shutdown_cancellation_is_not_taken_for_a_stop() -> None:
    async def forever(item: str) -> None:
        await queues.stoppable(1, asyncio.Event().wait())

    queues: ChatQueues[str] = ChatQueues(forever, limit=1)
    queues.submit(1, 1, "x")
    await settle()
    worker = queues._chats[1].worker
    assert worker is not None
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker


async def test_flood_control_pauses_only_the_chat_telegram_named() -> None:
    calls: list[str] = []
    refusals: dict[Any, int] = {1: 1}  # chat 1 gets one 429

    async def make_request(bot: Bot, method: Any) -> Any:
        chat = getattr(method, "chat_id", None)
        calls.append(f"{type(method).__name__} {chat}")
        if refusals.get(chat):
            refusals[chat] -= 1
            raise TelegramRetryAfter(method=method, message="Too Many Requests", retry_after=1)
        return "ok"

    flood = FloodControl(max_wait_s=10)
    bot = Bot(TOKEN)
    try:
        slow = asyncio.create_task(flood(make_request, bot, SendMessage(chat_id=1, text="a")))
        await settle()
        results: list[Any] = [
            await flood(make_request, bot, SendMessage(chat_id=2, text="b")),  # not paused
            await flood(make_request, bot, GetMe()),
            await slow,
        ]
    finally:
        await bot.session.close()
    assert calls == ["SendMessage 1", "SendMessage 2", "GetMe None", "SendMessage 1"]
    assert results == ["ok", "ok", "ok"]


async def test_flood_control_gives_up_past_its_bound() -> None:
    async def always_429(bot: Bot, method: Any) -> Any:
        raise TelegramRetryAfter(method=method, message="Too Many Requests", retry_after=1)

    bot = Bot(TOKEN)
    try:
        with pytest.raises(TelegramRetryAfter):
            await FloodControl(max_wait_s=1)(always_429, bot, SendMessage(chat_id=1, text="a"))
    finally:
        await bot.session.close()
