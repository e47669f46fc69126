"""Events on kubetrain objects: what `kubectl describe` shows, mirrored in the operator log."""

from __future__ import annotations

import logging
from typing import Any

import kopf

log = logging.getLogger("kubetrain.handlers")


def announce(body: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
    """Post an event on the object and log the same line, naming the object."""
    # kopf.event, unlike kopf.info, is not held back by settings.posting.level, which
    # keeps kopf's own per-handler log lines out of the objects' events.
    kopf.event(body, type="Warning" if warning else "Normal", reason=reason, message=message)
    meta = body["metadata"]
    log.log(
        logging.WARNING if warning else logging.INFO,
        "%s %s/%s: %s",
        body.get("kind", "object"),
        meta.get("namespace"),
        meta.get("name"),
        message,
    )
