"""Read kubetrain custom resources from YAML files, with errors that point at the field.

One file may hold several documents (`---`); empty ones are skipped. Each document's
`kind` picks its model from `KIND_MODELS`, so a new kind (Pipeline) is one table entry.
Errors read `examples/x.yaml: TrainingRun sft-tiny: spec.training.learningRate: Input
should be greater than 0`: the file, the object and the field, one problem per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetrain.api.trainingrun import API_VERSION, TrainingRun
from kubetrain_trainer.config import ConfigError, format_validation_error

# kind -> (apiVersion, model). Pipeline joins this table when it exists.
KIND_MODELS: dict[str, tuple[str, type[BaseModel]]] = {
    "TrainingRun": (API_VERSION, TrainingRun),
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
        raise ManifestError(format_validation_error(e, where)) from e


def load_documents(path: str | Path) -> list[Any]:
    """Every kubetrain object in a YAML file, in file order (TrainingRun for now)."""
    path = Path(path)
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
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
