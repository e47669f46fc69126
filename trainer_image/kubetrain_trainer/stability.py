"""The guide's stability checks as a callback: stop a run whose training has gone wrong.

On every logged step the loss as logged (`logging_nan_inf_filter` is off, so a NaN is not
averaged away) and the gradient norm before clipping are judged against
`training.stability`: `patienceSteps` bad logs in a row (a non-finite loss or gradient, or a
gradient norm above `gradNormLimit`) stop training with `TrainingUnstable`, which the entry
point turns into exit 72 and a termination message naming what was seen. Every rank sees
the same logged values, so all of them stop together. The operator does not retry exit 72
(the same config does the same again) and its condition lists the guide's stability knobs.

With `layerChecks`, the layers whose gradients are non-finite, large or vanishing are logged
as the guide's TrainingDebugger does, once per logging interval on rank 0 and only when
there is something to say. They are measured as the optimizer gets them, after clipping.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetrain_trainer.config import Stability
from kubetrain_trainer.sharding import local_part

log = logging.getLogger(__name__)

# The guide's TrainingDebugger thresholds for one parameter's gradient norm.
LARGE_LAYER_GRAD_NORM = 10.0
SMALL_LAYER_GRAD_NORM = 1e-8
LAYERS_NAMED = 5  # per kind and log line: the worst few


class TrainingUnstable(Exception):
    """Training went unstable for `patienceSteps` logged steps in a row."""


def logged_problem(logs: dict[str, Any], limit: float | None) -> str | None:
    """What is wrong with one training log entry (loss, grad_norm), None if nothing."""
    loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
    if loss is not None and not math.isfinite(loss):
        return f"loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    if limit is not None and grad_norm is not None and grad_norm > limit:
        return f"gradient norm {grad_norm:.4g} exceeds gradNormLimit {limit:g}"
    return None


def gradient_anomalies(named_norms: list[tuple[str, float]]) -> dict[str, list[str]]:
    """Parameter names by kind (non-finite, large, vanishing), worst first, a few each."""
    non_finite = [name for name, norm in named_norms if not math.isfinite(norm)]
    finite = [(name, norm) for name, norm in named_norms if math.isfinite(norm)]
    large = sorted(
        (item for item in finite if item[1] > LARGE_LAYER_GRAD_NORM), key=lambda i: -i[1]
    )
    # Exactly zero is no anomaly: a parameter this batch did not reach, or LoRA's A matrices
    # before B (initialised to zero) has moved.
    small = sorted(
        (item for item in finite if 0 < item[1] < SMALL_LAYER_GRAD_NORM), key=lambda i: i[1]
    )
    found = {
        "non-finite": non_finite[:LAYERS_NAMED],
        "large": [f"{name} ({norm:.3g})" for name, norm in large[:LAYERS_NAMED]],
        "vanishing": [f"{name} ({norm:.1e})" for name, norm in small[:LAYERS_NAMED]],
    }
    return {kind: names for kind, names in found.items() if names}


class StabilityCallback(TrainerCallback):
    """Stops unstable training (module docstring); logs gradient anomalies by layer."""

    def __init__(self, stability: Stability) -> None:
        self.stability = stability
        self.problems: list[str] = []  # the current run of bad logged steps

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:  # evaluation logs carry no training loss
            return
        problem = logged_problem(logs, self.stability.grad_norm_limit)
        if problem is None:
            self.problems.clear()
            return
        self.problems.append(f"step {state.global_step}: {problem}")
        patience = self.stability.patience_steps
        log.warning("unstable training (%d of %d): %s", len(self.problems), patience, problem)
        if len(self.problems) >= patience:
            raise TrainingUnstable(
                f"{'; '.join(self.problems)} ({patience} logged steps in a row; "
                "training.stability.patienceSteps)"
            )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step + 1  # the step these gradients make
        logged = step == 1 or step % args.logging_steps == 0
        model = kwargs.get("model")
        if not self.stability.layer_checks or not logged or model is None:
            return
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        # Under FSDP every rank holds a shard of each gradient: the layer's norm is the root
        # of the shards' squared norms summed over the ranks, so every rank takes part.
        sharded = any(local_part(g) is not g for _, g in named)
        if not named or not (sharded or state.is_world_process_zero):
            return
        with torch.no_grad():
            grads = [local_part(g).detach() for _, g in named]
            norms = torch.stack(torch._foreach_norm(grads)).float()
            if sharded:
                squares = norms.square()
                torch.distributed.all_reduce(squares)
                norms = squares.sqrt()
        if not state.is_world_process_zero:
            return
        names = [name for name, _ in named]
        found = gradient_anomalies(list(zip(names, norms.cpu().tolist(), strict=True)))
        if found:
            said = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in found.items())
            log.warning("gradient anomalies at step %d: %s", step, said)
