"""Read kubetrain custom resources from YAML files, with errors that point at the field.

One file may hold several documents (`---`); empty ones are skipped. Each document's
`kind` picks its model from `KIND_MODELS` (TrainingRun, Pipeline, Sweep), so a new kind is one
table entry. Errors read `examples/x.yaml: TrainingRun sft-tiny: spec.training.learningRate: Input
should be greater than 0`: the file, the object and the field, one problem per line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetrain.api.pipeline import PIPELINE_KIND, Pipeline
from kubetrain.api.sweep import SWEEP_KIND, Sweep
from kubetrain.api.trainingrun import API_VERSION, KIND, TrainingRun
from kubetrain_trainer.config import ConfigError, format_validation_error

# kind -> (apiVersion, model).
KIND_MODELS: dict[str, tuple[str, type[BaseModel]]] = {
    KIND: (API_VERSION, TrainingRun),
    PIPELINE_KIND: (API_VERSION, Pipeline),
    SWEEP_KIND: (API_VERSION, Sweep),
}


class ManifestError(ConfigError):
    """A custom resource file that cannot be read or does not validate."""


def parse_document(doc: Any, source: str) -> Any:
    """Validate one parsed YAML document; `source` names where it came from in errors."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: expected a mapping (a Kubernetes object)")
    kind = doc.get("kind")
    if kind not in KIND_MODELS:
        known = ", ".join(sorted(KIND_MODELS))
        raise ManifestError(f"{source}: unknown kind {kind!r}; kubetrain reads {known}")
    api_version, model = KIND_MODELS[kind]
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    where = f"{source}: {kind} {name or '(no metadata.name)'}"
    if doc.get("apiVersion") != api_version:
        raise ManifestError(
            f"{where}: apiVersion is {doc.get('apiVersion')!r}; {kind} is {api_version}"
        )
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise ManifestError(_name_stages(format_validation_error(e, where), doc)) from e


def _name_stages(message: str, doc: dict[str, Any]) -> str:
    """Write `spec.stages.1` as `spec.stages[sft]`: people know stages by name, not index."""
    stages = (doc.get("spec") or {}).get("stages") if isinstance(doc.get("spec"), dict) else None
    if not isinstance(stages, list):
        return message

    def by_name(match: re.Match[str]) -> str:
        index = int(match.group(1))
        stage = stages[index] if index < len(stages) else None
        name = stage.get("name") if isinstance(stage, dict) else None
        return f"spec.stages[{name}]" if isinstance(name, str) else match.group(0)

    return re.sub(r"\bspec\.stages\.(\d+)\b", by_name, message)


def load_documents(path: str | Path) -> list[Any]:
    """Every kubetrain object (TrainingRun, Pipeline) in a YAML file, in file order."""
    path = Path(path)
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError as e:
        raise ManifestError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a spec is a YAML file"
        ) from e
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"{path}: cannot read: {e}") from e
    objects = []
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        # Objects are named by kind and name; only a document without them needs its index.
        named = isinstance(doc, dict) and doc.get("kind") in KIND_MODELS
        source = str(path) if named or len(docs) == 1 else f"{path} (document {index})"
        objects.append(parse_document(doc, source))
    if not objects:
        raise ManifestError(f"{path}: no objects found (the file is empty)")
    return objects
