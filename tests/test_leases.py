"""The chat lease's statements, raced against each other on a real server: a question stored
while the holder hands the chat over is never left without a holder; an expired lease is swept
and its open questions handed over oldest first; an update is claimed once."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from services import database
from services.cluster import leases
from services.cluster import signals as chat_signals
from services.cluster.leases import Leases
from services.cluster.signals import ChatSignal, ChatSignals
from services.database import AddedQuestion, Connection, Pool

CHAT = 77


async def add(
    conn_or_pool: Connection | Pool, holder: str, message_id: int, *, ttl_s: int = 30, chat: int = CHAT
) -> AddedQuestion:
    params: dict[str, object] = {
        "telegram_user_id": chat,
        "first_name": "Ann",
        "telegram_chat_id": chat,
        "content": f"question {message_id}",
        "telegram_message_id": message_id,
        "holder": holder,
        "lease_ttl_s": ttl_s,
    }
    if isinstance(conn_or_pool, psycopg.AsyncConnection):
        return await database.add_question(conn_or_pool, **params)  # type: ignore[arg-type]
    return await database.run(conn_or_pool, database.add_question, **params)  # type: ignore[arg-type]


async def lease_row(pool: Pool) -> tuple[str | None, int, int]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT holder, version, done_through FROM chat_leases")
        row = await cur.fetchone()
        assert row is not None
        holder, version, done_through = row
        return holder, version, done_through


async def lock_waits(pool: Pool) -> int:
    """How many backends wait for a row lock on chat_leases now."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%%chat_leases%%'"
        )
        row = await cur.fetchone()
        assert row is not None
        count: int = row[0]
        return count


async def wait_for_lock_wait(pool: Pool) -> None:
    """Until some backend waits for a row lock on chat_leases (bounded)."""
    for _ in range(200):
        if await lock_waits(pool):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the hand-over never waited for the lease row")


async def test_the_first_to_store_a_question_takes_the_lease_and_others_only_bump_it(pool: Pool) -> None:
    first = await add(pool, "a", 1)
    assert (first.leased, first.lease_version) == (True, 1)
    second = await add(pool, "b", 2)
    assert (second.leased, second.lease_version) == (False, 2)
    again = await add(pool, "a", 3)
    assert (again.leased, again.lease_version) == (True, 3)
    assert (await lease_row(pool))[:2] == ("a", 3)


async def test_handover_gives_the_oldest_open_question_then_releases(pool: Pool) -> None:
    holder = Leases(pool, holder="a", ttl_s=30)
    q1 = await add(pool, "a", 1)
    holder.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic())
    q2 = await add(pool, "b", 2)  # stored by another process: left to "a"
    handover = await holder.handover(CHAT, finished=q1.id)
    assert handover.question is not None and handover.question.question_id == q2.id
    assert holder.holds(CHAT)
    released = await holder.handover(CHAT, finished=q2.id)
    assert released.question is None and not holder.holds(CHAT)
    assert (await lease_row(pool))[0] is None
    q3 = await add(pool, "b", 3)  # a released chat goes to whoever stores next
    assert q3.leased


async def test_a_question_stored_during_the_hand_over_is_never_left_without_a_holder(
    pool: Pool, database_url: str
) -> None:
    """The race a release on an old snapshot loses: "b" stores a question (and bumps the lease)
    in a transaction that commits only after "a"'s hand-over read the chat and found nothing
    open. "a"'s write is conditional on the version it read, so it does not release; it looks
    again and finds the question."""
    holder = Leases(pool, holder="a", ttl_s=30)
    q1 = await add(pool, "a", 1)
    holder.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic())
    async with await psycopg.AsyncConnection.connect(database_url) as other, other.transaction():
        q2 = await add(other, "b", 2)
        assert q2.leased is False
        handover = asyncio.create_task(holder.handover(CHAT, finished=q1.id))
        await wait_for_lock_wait(pool)  # "a" read its snapshot and waits for the row "b" bumped
        assert not handover.done()
        # "b" commits as the block ends
    found = await handover
    assert found.question is not None and found.question.question_id == q2.id
    assert (await lease_row(pool))[0] == "a"


async def test_a_release_that_commits_first_leaves_the_chat_to_the_next_question(pool: Pool) -> None:
    holder = Leases(pool, holder="a", ttl_s=30)
    q1 = await add(pool, "a", 1)
    holder.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic())
    assert (await holder.handover(CHAT, finished=q1.id)).question is None
    q2 = await add(pool, "b", 2)
    assert q2.leased  # "b" answers it: the lease was free


async def test_an_expired_lease_is_swept_and_its_questions_handed_over_oldest_first(pool: Pool) -> None:
    dead = await add(pool, "dead", 1, ttl_s=1)
    assert dead.leased
    later = await add(pool, "b", 2)  # stored while "dead" holds the chat
    assert later.leased is False
    async with pool.connection() as conn:  # as if the time to live had passed
        await conn.execute("UPDATE chat_leases SET expires_at = now() - interval '1 second'")
    sweeper = Leases(pool, holder="b", ttl_s=30)
    taken: list[int] = []

    async def on_taken(chat_id: int) -> None:
        taken.append(chat_id)

    try:
        assert await sweeper.tend(on_taken) == 1
        await asyncio.sleep(0)
        assert taken == [CHAT] and sweeper.holds(CHAT)
        first = await sweeper.handover(CHAT, finished=None)
        assert first.question is not None and first.question.question_id == dead.id
        second = await sweeper.handover(CHAT, finished=dead.id)
        assert second.question is not None and second.question.question_id == later.id
        assert await sweeper.tend(on_taken) == 0  # renewed, nothing else expired
    finally:
        await sweeper.stop()
    assert (await lease_row(pool))[0] == "b"


async def test_a_lease_taken_over_is_lost_by_its_old_holder(pool: Pool) -> None:
    old = Leases(pool, holder="a", ttl_s=30)
    q1 = await add(pool, "a", 1)
    old.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic())
    async with pool.connection() as conn:
        await conn.execute("UPDATE chat_leases SET expires_at = now() - interval '1 second'")
    assert await Leases(pool, holder="b", ttl_s=30).take(CHAT, q1.id or 0)
    lost = await old.handover(CHAT, finished=q1.id)
    assert lost.question is None and not old.holds(CHAT)
    assert (await lease_row(pool))[0] == "b"


@pytest.mark.parametrize("holder", ["a", "b"])
async def test_take_lowers_the_start_of_the_search_so_the_holder_finds_the_question(pool: Pool, holder: str) -> None:
    q1 = await add(pool, "a", 1)
    a = Leases(pool, holder="a", ttl_s=30)
    a.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic())
    assert (await a.handover(CHAT, finished=q1.id)).question is None  # released past q1
    await add(pool, "a", 2)  # "a" holds the chat again
    # q1 is asked again (a /retry): its answer is set aside, so it is open once more
    taken = await Leases(pool, holder=holder, ttl_s=30).take(CHAT, q1.id or 0)
    assert taken == (holder == "a")
    found = await a.handover(CHAT, finished=None)
    assert found.question is not None and found.question.question_id == q1.id


async def test_an_update_is_claimed_once(pool: Pool) -> None:
    assert await database.run(pool, leases.claim_update, update_id=10)
    assert not await database.run(pool, leases.claim_update, update_id=10)
    assert await database.run(pool, leases.purge_claims, keep_s=0) == 1
    assert await database.run(pool, leases.claim_update, update_id=10)


async def test_the_last_part_is_recorded_and_the_chat_handed_over_in_one_round_trip(pool: Pool) -> None:
    holder = Leases(pool, holder="a", ttl_s=30)
    q1 = await add(pool, "a", 1)
    holder.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic())
    q2 = await add(pool, "b", 2)
    answer = await database.run(pool, database.add_answer, question_id=q1.id, content="echo")
    assert answer is not None
    handed = await holder.record_last_part(CHAT, answer_id=answer, telegram_message_id=900)
    assert handed is not None and handed.question is not None and handed.question.question_id == q2.id
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT sent_message_ids, delivered_at IS NOT NULL FROM messages WHERE id = %s", (answer,)
        )
        assert await cur.fetchone() == ([900], True)


async def expires_at(pool: Pool) -> object:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT expires_at FROM chat_leases")
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def test_stop_lets_a_renewal_under_way_commit_instead_of_cancelling_it(pool: Pool) -> None:
    q1 = await add(pool, "a", 1, ttl_s=15)
    holder = Leases(pool, holder="a", ttl_s=15)  # a round every 5 s, each statement 5 s at most
    holder.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic())
    before = await expires_at(pool)
    async with pool.connection() as blocker, blocker.transaction():
        await blocker.execute("SELECT FROM chat_leases FOR UPDATE")  # the renewal waits for this row
        holder.start(lambda chat_id: asyncio.sleep(0))
        await wait_for_lock_wait(pool)
        stopping = asyncio.create_task(holder.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()  # it waits for the round, not cancelling its statement
    await stopping  # the blocker committed: the renewal went through, then the loop ended
    assert await expires_at(pool) > before  # type: ignore[operator]


async def test_a_round_stuck_behind_a_lock_ends_at_its_statement_timeout_and_the_next_renews(pool: Pool) -> None:
    q1 = await add(pool, "a", 1, ttl_s=3)
    holder = Leases(pool, holder="a", ttl_s=3)  # statements end after 1 s
    holder.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic())
    holder.start(lambda chat_id: asyncio.sleep(0))
    try:
        async with pool.connection() as blocker, blocker.transaction():
            await blocker.execute("SELECT FROM chat_leases FOR UPDATE")
            await wait_for_lock_wait(pool)
            # The stuck renewal is cancelled by the server, not waited for: the lock is released
            # only once no backend waits for it any more.
            for _ in range(100):
                if not await lock_waits(pool):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the renewal kept waiting past its statement timeout")
            before = await expires_at(pool)
        for _ in range(100):  # the next round renews
            if await expires_at(pool) > before:  # type: ignore[operator]
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no later round renewed the lease")
    finally:
        await holder.stop()


async def test_secure_renews_a_lease_past_half_its_ttl_and_a_renewal_finds_a_lease_taken_over(pool: Pool) -> None:
    q1 = await add(pool, "a", 1)
    holder = Leases(pool, holder="a", ttl_s=30)
    holder.note(CHAT, held=True, version=q1.lease_version or 0, sent=time.monotonic() - 20)  # 10 s left
    before = await expires_at(pool)
    await holder.secure(CHAT)
    assert await expires_at(pool) > before  # type: ignore[operator]
    renewed = await expires_at(pool)
    await holder.secure(CHAT)  # 30 s left now: nothing asked
    assert await expires_at(pool) == renewed

    async with pool.connection() as conn:  # "b" swept it, once it had expired
        await conn.execute("UPDATE chat_leases SET holder = 'b', version = version + 1")
    try:
        await holder.tend(lambda chat_id: asyncio.sleep(0))
    finally:
        await holder.stop()
    assert not holder.holds(CHAT)
    with pytest.raises(leases.LeaseLost):
        await holder.secure(CHAT)


async def test_the_signal_listener_acts_on_signals_naming_it_and_outlives_a_broken_one(pool: Pool) -> None:
    await add(pool, "b", 1)  # "b" holds the chat
    received: list[ChatSignal] = []
    listener = ChatSignals(pool, holder="b", on_signal=received.append)
    sender = ChatSignals(pool, holder="a", on_signal=received.append)
    listener.start()

    async def until_received(kind: str, send: ChatSignal | None = None) -> None:
        for _ in range(200):
            if any(signal.kind == kind for signal in received):
                return
            if send is not None:
                assert await sender.send(send)
            await asyncio.sleep(0.05)
        raise AssertionError(f"the listener got {received}")

    try:
        # Sent until it listens: a notification sent before that is not kept for it.
        await until_received("stop", send=ChatSignal("stop", CHAT, CHAT, 7))
        async with pool.connection() as conn:  # a payload it cannot read, then one it can
            await conn.execute("SELECT pg_notify(%s, 'not json')", (chat_signals.CHANNEL,))
        assert await sender.send(ChatSignal("cancel", CHAT, CHAT))
        await until_received("cancel")
        assert not await listener.send(ChatSignal("stop", CHAT, CHAT))  # it holds the chat: no one to tell
    finally:
        await listener.stop()
    assert received[0] == ChatSignal("stop", CHAT, CHAT, 7) and received[-1] == ChatSignal("cancel", CHAT, CHAT)
