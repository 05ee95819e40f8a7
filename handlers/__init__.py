"""Telegram update handlers, one router per module."""

from __future__ import annotations

from aiogram import Router

from handlers import commands, errors, history, media, memory, messages, settings, unsupported


def create_routers() -> list[Router]:
    """The routers in the order they must be tried: the history commands, the memories (with
    their buttons, before the settings' catch-all of buttons), the chat's settings (with their
    buttons), the others (ending
    with the reply to unknown ones), text, photos, voice and files, then the catch-all; and the handlers of errors,
    which see the errors of all."""
    return [
        errors.create_router(),
        history.create_router(),
        memory.create_router(),
        settings.create_router(),
        commands.create_router(),
        messages.create_router(),
        media.create_router(),
        unsupported.create_router(),
    ]
