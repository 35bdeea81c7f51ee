"""Log levels and the log format of every osserve process (server, frontend, workers). Imports nothing
heavy: the command parsers read LOG_LEVELS."""

from __future__ import annotations

import logging

LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
