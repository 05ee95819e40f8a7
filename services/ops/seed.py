"""Demo data for development (``make db-seed``): two users, a private chat each and a group."""

from __future__ import annotations

import asyncio

from services import database
from services.database import Connection
from services.ops.retention import tool_pool

ANN, BOB = 1001, 1002
GROUP = -1001000000001
DIALOGS: list[tuple[int, str, int, list[str]]] = [
    (
        ANN,
        "Ann",
        ANN,
        [
            "What is PostgreSQL?",
            "An open-source relational database.",
            "And MVCC?",
            "Multi-version concurrency control: readers never block writers.",
        ],
    ),
    (BOB, "Bob", BOB, ["Привет! Как дела?", "Привет! Всё хорошо, чем помочь?"]),
    (ANN, "Ann", GROUP, ["Summarise the meeting, please.", "Nothing was decided; a follow-up is on Friday."]),
    (BOB, "Bob", GROUP, ["Tell me a joke 🙂", "Why do programmers prefer dark mode? Light attracts bugs."]),
]


async def seed(conn: Connection) -> int:
    """Insert the demo dialogs (idempotent per Telegram message id); how many messages are new."""
    new = 0
    for user, first_name, chat, texts in DIALOGS:
        question: int | None = None
        for index, text in enumerate(texts):
            if index % 2 == 0:
                added = await database.add_question(
                    conn,
                    telegram_user_id=user,
                    first_name=first_name,
                    telegram_chat_id=chat,
                    content=text,
                    telegram_message_id=user * 100 + index,
                )
                question = added.id
                new += added.new
            elif question is not None:
                answer = await database.add_answer(conn, question_id=question, content=text)
                if answer is not None:
                    # demo answers count as delivered, so the bot's recovery leaves them alone
                    await database.record_sent_part(conn, answer_id=answer, telegram_message_id=0, last=True)
                    new += 1
    return new


async def _main() -> None:
    async with tool_pool() as pool:
        added = await database.run(pool, seed)
        counts = await database.run(pool, database.count_messages, telegram_user_id=ANN, telegram_chat_id=ANN)
        print(f"seeded {added} new message(s); Ann's private chat holds {counts.live} live message(s)")


if __name__ == "__main__":
    asyncio.run(_main())
