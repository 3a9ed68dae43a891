"""Text from the web (captions, URLs, file names, error messages) made safe for a terminal."""

from __future__ import annotations

import logging
import unicodedata


def terminal_safe(text: object) -> str:
    """Control characters (ANSI escapes, carriage returns, bells...) shown as ``\\xNN`` escapes,
    so that no caption, URL or file name can move the cursor, recolour or rewrite a line."""
    return "".join(
        ch if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cf") else f"\\x{ord(ch):02x}"
        if ord(ch) < 256 else f"\\u{ord(ch):04x}"
        for ch in str(text)
    )


class SafeFormatter(logging.Formatter):
    """A log formatter whose every record passes through ``terminal_safe``."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().format(record))


def configure_logging(level: str, stream=None) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
