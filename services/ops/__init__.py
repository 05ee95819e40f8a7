"""Running the bot: metrics, the retention purge, demo data, a local PostgreSQL for development and tests."""
