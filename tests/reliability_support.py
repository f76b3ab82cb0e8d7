"""Support for the reliability suites (fuzz, faults, churn): an ERROR-record trap for the
``llmgine_ws`` loggers, and registry checks. The raw WebSocket client is in ``tests/rawws.py``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from llmgine_ws.runtime import Runtime


class ErrorTrap(logging.Handler):
    """Collects ERROR (and worse) records of the ``llmgine_ws`` loggers, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.expected: list[str] = []
        """Substrings of messages that are expected (e.g. a callback the test makes fail)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unexpected(self) -> list[str]:
        found = []
        for record in self.records:
            text = record.getMessage()
            if not any(marker in text for marker in self.expected):
                exc = f" [{record.exc_info[0].__name__}: {record.exc_info[1]}]" if record.exc_info and \
                    record.exc_info[0] else ""
                found.append(f"{record.name}: {text}{exc}")
        return found

    def check(self) -> None:
        unexpected = self.unexpected()
        assert not unexpected, f"unexpected ERROR records: {unexpected}"


@contextmanager
def error_trap(*expected: str) -> Iterator[ErrorTrap]:
    """Attach an :class:`ErrorTrap` to ``llmgine_ws`` for the block; fail if it caught anything
    not marked as expected (substrings of the message)."""
    trap = ErrorTrap()
    trap.expected.extend(expected)
    logger = logging.getLogger("llmgine_ws")
    logger.addHandler(trap)
    try:
        yield trap
    finally:
        logger.removeHandler(trap)
    trap.check()


def registries(runtime: Runtime) -> dict[str, int]:
    """Everything that must be empty once every client is gone."""
    return {
        "connections": len(runtime.hub),
        "sessions": len(runtime.sessions),
        "engines": runtime.engines.running(),
        "pending_requests": runtime.hub.pending_request_count(),
        "connection_counter": runtime.connection_counter.total,
        "connection_counter_ips": runtime.connection_counter.addresses,
        "in_flight": sum(len(c.in_flight) for c in runtime.hub),
    }


EMPTY = {"connections": 0, "sessions": 0, "engines": 0, "pending_requests": 0, "connection_counter": 0,
         "connection_counter_ips": 0, "in_flight": 0}


async def wait_registries_empty(runtime: Runtime, timeout: float = 10.0) -> None:
    """Wait (bounded) until the hub is empty, then check every registry is."""
    with anyio.fail_after(timeout):
        await runtime.hub.wait_empty()
    assert registries(runtime) == EMPTY
