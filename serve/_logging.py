"""Process logging: stderr plus, for daemons, a file in the state directory.

Every line logged while a replica serves a request (serve's own, or the user's through any
``logging`` logger) carries that request's id; nested calls keep the caller's id. Replicas also
write one access line per request (``serve.access``): method, outcome, duration. Access lines go
to the log file only, buffered (as in Ray, where they live in the replica's log file): printing
one per request to a terminal would cost as much as serving it.
``SERVE_LOG_FORMAT=json`` (or a deployment's ``logging_config={"encoding": "JSON"}``) switches
to one JSON object per line. Log files are rotated by size, as Ray's are:
``SERVE_ROTATION_MAX_BYTES`` (512 MiB), keeping ``SERVE_ROTATION_BACKUP_COUNT`` (5) old files
(``replica_x.log.1`` is the newest); 0 for either turns rotation off.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from serve._context import current_request
from serve._settings import settings
from serve._state_dir import ensure_private_dir

ACCESS_LOGGER = "serve.access"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(component)s %(name)s%(request_tag)s: %(message)s"
LOGGING_CONFIG_KEYS = frozenset(
    {"encoding", "log_level", "logs_dir", "enable_access_log", "additional_log_standard_attrs"}
)


class _ContextFilter(logging.Filter):
    """Stamps each record with the process's component and the current request's id."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            context = current_request()
            request_id = context.request_id if context is not None else ""
            record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the same fields as the text format."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "component": getattr(record, "component", ""),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        for field in ("method", "outcome", "duration_ms"):
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def check_logging_config(value: Any) -> dict[str, Any] | None:
    """Validate Ray's LoggingConfig fields (a dict, or an object with those attributes)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        value = {k: getattr(value, k) for k in LOGGING_CONFIG_KEYS if hasattr(value, k)}
    unknown = sorted(set(value) - LOGGING_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"logging_config: unknown field(s) {unknown}; valid fields are "
            f"{sorted(LOGGING_CONFIG_KEYS)}."
        )
    config = dict(value)
    encoding = str(config.get("encoding", "TEXT")).upper()
    if encoding not in ("TEXT", "JSON"):
        raise ValueError(f"logging_config: encoding must be 'TEXT' or 'JSON', got {encoding!r}.")
    config["encoding"] = encoding
    level = config.get("log_level", "INFO")
    if isinstance(level, str):
        level = level.upper()
    if logging.getLevelName(level) == f"Level {level}":
        raise ValueError(f"logging_config: log_level {level!r} is not a logging level.")
    config["log_level"] = level
    if not isinstance(config.get("enable_access_log", True), bool):
        raise TypeError("logging_config: enable_access_log must be a bool.")
    return config


class AccessLog:
    """One line per request in the replica's log file, written in batches.

    Building a ``logging`` record per request cost about a quarter of a replica's CPU under
    load; here a request appends a tuple, and the lines are formatted and written together at
    most ``FLUSH_EVERY_S`` later, in the same text or JSON shape as every other line.
    """

    FLUSH_EVERY_S = 0.2

    def __init__(
        self, handler: PrivateRotatingFileHandler, component: str, json_lines: bool
    ) -> None:
        self._handler = handler  # the log file's handler: its stream, its rotation
        self._component = component
        self._json = json_lines
        self._pending: list[tuple[float, str, str, str, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = (-1, "")  # the last formatted second, reused across lines

    def record(self, request_id: str, method: str, outcome: str, duration_ms: float) -> None:
        self._pending.append((time.time(), request_id, method, outcome, duration_ms))
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.FLUSH_EVERY_S, self.flush)

    def flush(self) -> None:
        self._timer = None
        pending, self._pending = self._pending, []
        if pending:
            self._handler.write_lines("".join(self._line(*entry) for entry in pending))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()

    def _asctime(self, when: float) -> str:
        second = int(when)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        return f"{self._second[1]},{int((when - second) * 1000):03d}"

    def _line(
        self, when: float, request_id: str, method: str, outcome: str, duration_ms: float
    ) -> str:
        message = f"{method} {outcome} {duration_ms:.1f}ms"
        if self._json:
            entry: dict[str, Any] = {
                "time": self._asctime(when),
                "level": "INFO",
                "component": self._component,
                "logger": ACCESS_LOGGER,
                "message": message,
            }
            if request_id:
                entry["request_id"] = request_id
            entry.update(method=method, outcome=outcome, duration_ms=round(duration_ms, 3))
            return orjson.dumps(entry).decode() + "\n"
        tag = f" [{request_id}]" if request_id else ""
        return f"{self._asctime(when)} INFO {self._component} {ACCESS_LOGGER}{tag}: {message}\n"


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A log file rotated by size, every generation created 0600 (logs hold request data)."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def write_lines(self, text: str) -> None:
        """Append already formatted lines (the access log's batches), rotating whenever the
        next ones would pass the size limit: a busy replica's batch may fill several files."""
        self.acquire()
        try:
            if self.stream is None:
                return  # closed: late access lines are dropped
            if not (self.maxBytes > 0 and self.backupCount > 0):
                self.stream.write(text)
            while self.maxBytes > 0 and self.backupCount > 0 and text:
                room = self.maxBytes - self.stream.tell()
                cut = len(text) if len(text) < room else text.rfind("\n", 0, max(room, 0)) + 1
                if cut == 0:  # not one more whole line fits
                    if self.stream.tell() > 0:
                        self.doRollover()
                        continue
                    cut = text.find("\n") + 1 or len(text)  # one line longer than a file
                self.stream.write(text[:cut])
                text = text[cut:]
            self.stream.flush()
        finally:
            self.release()


_access_log: AccessLog | None = None


def access_log() -> AccessLog | None:
    """The process's access log: set up by :func:`configure` for a daemon with a log file."""
    return _access_log


def _create_private(log_file: Path) -> None:
    """Logs hold request data: their directory is 0700 and the file 0600, whatever the umask.

    Log setup runs before anything else in a daemon, so it also makes the state directory and
    its ``logs`` private when the log file lives there (the default).
    """
    ensure_private_dir(log_file.parent)
    state_dir = settings().state_dir
    if state_dir in log_file.parents:
        for directory in (state_dir, state_dir / "logs"):
            if directory in log_file.parents:
                os.chmod(directory, 0o700)
    os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(log_file, 0o600)


def configure(
    component: str,
    log_file: Path | None = None,
    *,
    json_lines: bool | None = None,
    level: str | int | None = None,
) -> None:
    """Send this process's logs to stderr (and ``log_file``), stamped with ``component``."""
    s = settings()
    use_json = s.log_format == "json" if json_lines is None else json_lines
    formatter: logging.Formatter = JsonFormatter() if use_json else logging.Formatter(_TEXT_FORMAT)
    # The process's real stderr: a replica routes user output through sys.stderr.
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.__stderr__ or sys.stderr)]
    file_handler = None
    if log_file is not None:
        _create_private(log_file)
        file_handler = PrivateRotatingFileHandler(
            log_file, maxBytes=s.rotation_max_bytes, backupCount=s.rotation_backup_count
        )
        handlers.append(file_handler)
    global _access_log
    if _access_log is not None:  # flushed into the handler it was made for, before it closes
        _access_log.close()
        _access_log = None
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    context = _ContextFilter(component)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(context)
        root.addHandler(handler)
    root.setLevel(level if level is not None else s.log_level)
    if file_handler is not None and root.isEnabledFor(logging.INFO):
        _access_log = AccessLog(file_handler, component, use_json)
