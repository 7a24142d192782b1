"""Process logging: stderr plus, for daemons, a file in the state directory."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import orjson

from serve._settings import settings

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(component)s %(name)s: %(message)s"


class _ComponentFilter(logging.Filter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the same fields as the text format."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "component": getattr(record, "component", ""),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(component: str, log_file: Path | None = None) -> None:
    """Send this daemon's logs to stderr (and ``log_file``), tagged with ``component``."""
    s = settings()
    formatter: logging.Formatter = (
        JsonFormatter() if s.log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_ComponentFilter(component))
        root.addHandler(handler)
    root.setLevel(s.log_level)
