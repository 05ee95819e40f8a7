"""Telegram update handlers, one router per module."""

from __future__ import annotations

from aiogram import Router

from handlers import commands, messages, unsupported


def create_routers() -> list[Router]:
    """The routers in the order they must be tried: commands, text, then the catch-all."""
    return [commands.create_router(), messages.create_router(), unsupported.create_router()]
