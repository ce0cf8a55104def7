"""structlog JSON logs, one line per event, with trace context and secrets redacted."""

from __future__ import annotations

import logging
import sys

import structlog

from fleet.shared.redact import redact_value

_configured = False


def _redact_processor(_logger, _name, event_dict):
    return redact_value(event_dict)


def _pool_discards(record: logging.LogRecord) -> bool:
    """psycopg_pool warns once per connection it finds closed or broken and discards; the fleet's reconnect
    rule (fleet.shared.reconnect) already logs the lost connection once per episode, with its SQLSTATE, and
    counts it. Its other warnings (a failed connect, a rollback) pass."""
    return not record.getMessage().startswith(("discarding closed connection", "discarding broken connection"))


def configure_logging(level: str = "INFO") -> None:
    global _configured
    if _configured:
        return
    _configured = True
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # dramatiq and libraries log through stdlib logging: render them the same way.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[
                *shared[:-2],
                structlog.stdlib.add_logger_name,
                structlog.processors.format_exc_info,
                _redact_processor,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("psycopg.pool").addFilter(_pool_discards)
