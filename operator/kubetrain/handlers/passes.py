"""What both reconcile passes share: the object as read and its events."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetrain.status import parse_rfc3339, rfc3339

log = logging.getLogger("kubetrain.handlers")

__all__ = ["ObjectPass", "parse_rfc3339", "rfc3339"]


class ObjectPass:
    """One pass over one kubetrain object (TrainingRun or Pipeline), as read at its start."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        meta = body["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid", "")
        self.generation: int | None = meta.get("generation")
        self.status: dict[str, Any] = body.get("status") or {}

    @property
    def qualified(self) -> str:
        return f"{self.namespace}/{self.name}"

    def announce(self, reason: str, message: str, *, warning: bool = False) -> None:
        """An event on the object (kubectl describe) and the same line in the log."""
        # kopf.event, unlike kopf.info, is not held back by settings.posting.level, which
        # keeps kopf's own per-handler log lines out of the objects' events.
        kopf.event(
            self.body, type="Warning" if warning else "Normal", reason=reason, message=message
        )
        log.log(
            logging.WARNING if warning else logging.INFO,
            "%s %s: %s",
            self.body.get("kind", "object"),
            self.qualified,
            message,
        )
