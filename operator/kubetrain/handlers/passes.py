"""What the reconcile passes share: the object as read, its events, and for the kinds that
own runs (Pipeline, Sweep) the verdict they keep, the InvalidSpec failure and the status write."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kubetrain import k8s
from kubetrain.api import FINISHED_PHASES, PHASE_FAILED, REASON_INVALID_SPEC
from kubetrain.status import (
    CONDITION_READY,
    condition_of,
    invalid_spec_status,
    merge_patch,
    next_status,
    parse_rfc3339,
    rfc3339,
)

log = logging.getLogger("kubetrain.handlers")

Model = TypeVar("Model", bound=BaseModel)

__all__ = ["ObjectPass", "OwnerPass", "parse_rfc3339", "rfc3339"]


class ObjectPass:
    """One pass over one kubetrain object, as read at its start."""

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
        k8s.post_event(self.body, "Warning" if warning else "Normal", reason, message)
        log.log(
            logging.WARNING if warning else logging.INFO,
            "%s %s: %s",
            self.body.get("kind", "object"),
            self.qualified,
            message,
        )


class OwnerPass(ObjectPass, ABC):
    """One pass over a kind whose status is decided from the runs it owns (Pipeline, Sweep).

    Subclasses say how their status is patched and counted; this class keeps a finished
    verdict, fails an invalid spec once (one event per new message) and writes the status.
    """

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.now = rfc3339(time.time())

    @abstractmethod
    def patch_status(self, patch: dict[str, Any]) -> None:
        """Merge-patch this object's status subresource with `patch`."""

    @abstractmethod
    def observe(self, status: dict[str, Any]) -> None:
        """Count the written status in the operator's metrics."""

    def validated(self, model: type[Model], status_model: type[BaseModel]) -> Model:
        """The object as `model` (ValidationError if its spec is bad), with its status.

        The status is read apart, so that it can never make the spec look invalid; one that
        does not parse (edited by hand) is dropped, and the plan rebuilds it from the runs.
        """
        parsed = model.model_validate({k: v for k, v in self.body.items() if k != "status"})
        try:
            status = status_model.model_validate(self.status) if self.status else None
        except ValidationError as e:
            log.warning("%s: rebuilding an unreadable status: %s", self.qualified, e)
            status = None
        parsed.status = status  # type: ignore[attr-defined]
        return parsed

    def owns(self, run: Mapping[str, Any]) -> bool:
        """Whether `run` is this object's (not a namesake's, nor a user's)."""
        references = run["metadata"].get("ownerReferences") or []
        return any(ref.get("uid") == self.uid for ref in references)

    def keeps_verdict(self) -> bool:
        """A finished object keeps its verdict; then only acknowledge the generation (kstatus).

        InvalidSpec is the one failure a spec edit may mend, so it does not count as final.
        """
        ready = condition_of(self.status, CONDITION_READY) or {}
        phase = self.status.get("phase")
        if phase not in FINISHED_PHASES or ready.get("reason") == REASON_INVALID_SPEC:
            return False
        self.write(
            next_status(
                self.status,
                phase=phase,
                reason=ready.get("reason", ""),
                message=ready.get("message", ""),
                now=self.now,
                generation=self.generation,
            )
        )
        return True

    def invalid(self, message: str) -> None:
        """Fail with InvalidSpec and `message`; announce it only when the message is new."""
        ready = condition_of(self.status, CONDITION_READY) or {}
        if (ready.get("reason"), ready.get("message")) != (REASON_INVALID_SPEC, message):
            self.announce(REASON_INVALID_SPEC, f"Failed: {message}", warning=True)
        self.write(
            invalid_spec_status(self.status, message, now=self.now, generation=self.generation)
        )

    def write(self, new: dict[str, Any]) -> None:
        """Patch the status to `new` (only what changed), announce a new phase, count it."""
        patch = merge_patch(self.status, new)
        if patch:
            self.patch_status(patch)
        phase = new.get("phase", "")
        ready = condition_of(new, CONDITION_READY) or {}
        reason = ready.get("reason", "")
        # InvalidSpec was announced with its message already.
        if phase != self.status.get("phase") and reason != REASON_INVALID_SPEC:
            self.announce(
                reason, f"{phase}: {ready.get('message', '')}", warning=phase == PHASE_FAILED
            )
        self.observe(new)
        self.status = new
