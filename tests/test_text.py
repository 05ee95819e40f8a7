"""services.text.clean: what PostgreSQL can store."""

from __future__ import annotations

from services.text.clean import storable


def test_storable_replaces_nul_and_lone_surrogates_only() -> None:
    assert storable("a\x00b") == "a\ufffdb"
    assert storable("x\ud800y\udfff") == "x\ufffdy\ufffd"
    kept = "Привет 👍🏽 שלום '; DROP TABLE users; -- \t\n"
    assert storable(kept) == kept
