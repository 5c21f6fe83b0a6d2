"""How log lines are formatted, wherever they go (journal, terminal, file)."""

from __future__ import annotations

import logging

from nvr_guard.text import printable


class InertFormatter(logging.Formatter):
    """Log lines whose message is inert in a terminal: names from the recording tree or typed by
    people (a camera directory holding an escape sequence) are shown with control characters
    escaped, as everywhere else; a traceback below the message keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        """The message with its control characters escaped, in the format's fields."""
        record.message = printable(record.message)
        return super().formatMessage(record)
