"""Alembic environment: plain SQL migrations over psycopg 3, URL from config.py."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from config import ConfigError, load_database_url


def sqlalchemy_url(database_url: str) -> str:
    """SQLAlchemy's spelling of a libpq URL, pinned to the psycopg 3 driver."""
    _, _, rest = database_url.partition("://")
    return f"postgresql+psycopg://{rest}"


if context.config.config_file_name is not None:
    # Show "Running upgrade ..." lines; keep the loggers of a host process (the tests) alive.
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)


def run_migrations_online() -> None:
    # Tests and tools pass the URL in; everyone else gets DATABASE_DIRECT_URL (default DATABASE_URL):
    # the session settings below, and each migration's transaction, need the server itself, not
    # a transaction pooler that may hand each transaction to another server connection.
    url = context.config.attributes.get("database_url")
    if url is None:
        try:
            url = load_database_url(direct=True)
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Fail fast rather than queue behind a long-running transaction holding a lock.
        connection.exec_driver_sql("SET lock_timeout = '5s'")
        connection.exec_driver_sql("SET statement_timeout = '5min'")
        connection.commit()  # session settings stay; Alembic then owns the transactions
        context.configure(
            connection=connection,
            target_metadata=None,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("error: offline (--sql) mode is not supported; run against a database")
run_migrations_online()
