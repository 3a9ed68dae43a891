"""Text from the web (captions, URLs, file names, error messages) made safe for a terminal."""

from __future__ import annotations

import logging
import unicodedata
from contextlib import contextmanager


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
    """The terminal gets ``level`` and up; the root logger passes INFO on, for log files."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(min(logging.INFO, logging.getLevelName(level.upper())))
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Held(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def held_records():
    """Keep this process's log records (INFO and up) for a log file opened later: a round's
    folder is checked, made and swept before its ``capfilt.log`` can be opened in it."""
    held = _Held()
    logger = logging.getLogger()
    level = logger.level
    logger.addHandler(held)
    if logger.level > logging.INFO or logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    try:
        yield held.records
    finally:
        logger.removeHandler(held)
        logger.setLevel(level)


@contextmanager
def log_file(path: str, earlier: list[logging.LogRecord] = ()):
    """Also write this process's capfilt log records (INFO and up) to ``path``, after the
    ``earlier`` ones (see ``held_records``)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for record in earlier:
        handler.handle(record)
    logger = logging.getLogger()
    logger.addHandler(handler)
    if logger.level > logging.INFO or logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
