"""config.py's closed sets: each a ``Literal``, read by ``_choice`` as the type spells it."""

from __future__ import annotations

import logging

from config import BOT_MODES, GROUP_CONTEXTS, GROUP_TRIGGERS, LOG_LEVELS, load_config
from tests.harness import TOKEN

REQUIRED = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "k"}


def test_log_levels_are_names_logging_knows() -> None:
    assert set(LOG_LEVELS) <= set(logging.getLevelNamesMapping())  # bot.py looks each one up there


def test_a_closed_setting_is_read_case_aside_as_its_literal_spells_it() -> None:
    config = load_config({**REQUIRED, "LOG_LEVEL": "Warn", "GROUP_TRIGGER": "ALL", "GROUP_CONTEXT": "Shared"})
    assert (config.log_level, config.group_trigger, config.group_context) == ("WARN", "all", "shared")
    assert config.bot_mode in BOT_MODES
    assert (GROUP_TRIGGERS, GROUP_CONTEXTS) == (("mention", "all"), ("per_user", "shared"))
