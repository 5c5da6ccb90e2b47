"""Structured logs: JSON lines or text, with the process's identity on every line.

Fields a line carries come from ``extra={...}`` (jobId, correlationId, model,
...) and from ``bind()``, called once per process (role, workerId). Prompt and
completion text never reaches a log unless LOG_PROMPTS is set; call sites pass
it only through ``prompt_fields()``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import msgspec

from llm_worker.settings.sections import LogSettings

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_context: dict[str, Any] = {}
_log_prompts = False
_encode = msgspec.json.Encoder().encode


def bind(**fields: Any) -> None:
    """Set fields that every later line of this process carries (role, workerId)."""
    _context.update({k: v for k, v in fields.items() if v is not None})


def prompt_fields(**texts: str) -> dict[str, str]:
    """Prompt or completion text for a log line: empty unless LOG_PROMPTS is on."""
    return dict(texts) if _log_prompts else {}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out = dict(_context)
    for key, value in record.__dict__.items():
        if key not in _RESERVED and not key.startswith("_") and value is not None:
            out[key] = value
    return out


def _stamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": _stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encode(line).decode(errors="replace")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        who = fields.pop("workerId", None) or fields.pop("role", "")
        fields.pop("role", None)
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        text = f"{_stamp(record.created)} {record.levelname:<7} {who} {record.getMessage()}"
        if extra:
            text += f"  {extra}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(settings: LogSettings, **context: Any) -> None:
    """Configure the root logger of this process (call again after fork to rebind)."""
    global _log_prompts
    _log_prompts = settings.prompts
    _context.clear()
    bind(**context)
    level = {"warn": "WARNING"}.get(settings.level, settings.level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries chatter at INFO about every pooled connection; keep their warnings.
    for noisy in ("urllib3", "waitress"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    if os.environ.get("LLM_WORKER_LOG_PROMPTS_WARNED") is None and settings.prompts:
        os.environ["LLM_WORKER_LOG_PROMPTS_WARNED"] = "1"
        logging.getLogger("llm_worker").warning("LOG_PROMPTS is on: prompt and completion text will be logged")
