"""Text in and out: what PostgreSQL can store, the LLM's Markdown as Telegram entities split into
messages, export formats."""
