# The bot's image: `docker compose up` builds it (see docker-compose.yml), or
# `docker build -t llmbot .`. The same image runs the bot and the one-shot migration.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bot

# Dependencies in their own layer, rebuilt only when pyproject.toml or constraints.txt change:
# the runtime dependencies of pyproject.toml at the exact versions the tests ran (constraints.txt).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code, owned by root and read-only for the bot; only the spool directory is writable, and
# readable by the bot alone: it holds message text (mount a volume there so an outage's writes
# survive a restart of the container; a new volume takes this directory's owner and mode).
COPY . .
RUN mkdir -p -m 700 .spool && chown bot:bot .spool
USER bot

# The webhook's port (BOT_MODE=webhook); METRICS_PORT, when set, is another.
EXPOSE 8080
CMD ["python", "bot.py"]
