"""One chat turn from question to delivered answer: the turn itself, the per-chat queue, the
commands that change a turn, recovery, streaming to Telegram."""
