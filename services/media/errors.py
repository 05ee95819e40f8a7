"""What the media readers raise."""


class Unreadable(Exception):
    """An attachment the bot cannot read; ``str(error)`` is the one line the user is told."""
