"""Logging configured once: console plus a rotating file under the log folder."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_configured = False


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: str = "INFO", log_dir: Path | None = Path("logs")) -> None:
    """Attach console and rotating-file handlers to the ``malaria`` logger (idempotent)."""
    global _configured
    logger = logging.getLogger("malaria")
    logger.setLevel(level.upper())
    if _configured:
        return
    console = _ConsoleHandler()
    console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    logger.addHandler(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(log_dir / "malaria.log", maxBytes=5_000_000, backupCount=5)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(file_handler)
    _configured = True
