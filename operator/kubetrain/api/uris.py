"""Where a TrainingRun's model, data and output live: classify and take apart their URIs.

A spec names storage in one of five ways: a Hugging Face hub id (`Qwen/Qwen2.5-3B`, models
only), a hub dataset (`hf://datasets/org/name[@revision][/path]`, data only), a
PersistentVolumeClaim (`pvc://claim/sub/path`), an S3 object or prefix (`s3://bucket/key`,
fetched and published by the trainer itself), or a local path (for `kubetrain run` on one
machine). The local runner and the cluster renderer rewrite these to paths in
their own way; both start from `uri_refs`, which lists every URI-bearing field of a spec
with its kind, so neither has to know which fields hold URIs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kubetrain.api.cel import present
from kubetrain_trainer.contract import HF_DATASETS_SCHEME, parse_hf_uri

if TYPE_CHECKING:
    from kubetrain.api.trainingrun import TrainingRunSpec

UriKind = Literal["hub", "hf", "pvc", "s3", "local"]

PVC_SCHEME = "pvc://"
S3_SCHEME = "s3://"
HF_SCHEME = "hf://"
SCHEMES = (PVC_SCHEME, S3_SCHEME)  # models and outputs
DATA_SCHEMES = (*SCHEMES, HF_SCHEME)  # data may also be a hub dataset
# Anything that starts like a URI (`ftp://`, `gs://`); read as a local path it would fail
# only inside the pod, so it is refused here unless the field takes that scheme.
URI_SCHEME_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://"
_URI_SCHEME = re.compile(URI_SCHEME_PATTERN)

# A PVC name is a DNS-1123 subdomain; keeping to the label form also makes it a valid
# volume name once prefixed, which the renderer relies on.
_CLAIM_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Hub ids are `name` or `org/name` (huggingface_hub's repo-id rule); anything with more
# slashes, or starting with `.`, `/` or `~`, can only be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")


@dataclass(frozen=True)
class UriRef:
    """One URI-bearing field of a spec: its path in the CR, its value and what it names."""

    field: str
    uri: str
    kind: UriKind


@dataclass(frozen=True)
class PvcUri:
    """`pvc://claim/sub/path` taken apart; `path` is "" for the claim's root."""

    claim: str
    path: str


def classify_uri(uri: str, *, may_be_hub_id: bool) -> UriKind:
    """Say what a URI names. Only model fields (`may_be_hub_id`) can hold hub ids."""
    if uri.startswith(PVC_SCHEME):
        return "pvc"
    if uri.startswith(S3_SCHEME):
        return "s3"
    if uri.startswith(HF_SCHEME):
        return "hf"
    if may_be_hub_id and _HUB_ID.match(uri):
        return "hub"
    return "local"


def parse_pvc_uri(uri: str) -> PvcUri:
    """Split `pvc://claim/sub/path`; raise ValueError naming the rule a bad one breaks."""
    if not uri.startswith(PVC_SCHEME):
        raise ValueError(f"{uri!r} is not a pvc:// URI")
    rest = uri[len(PVC_SCHEME) :]
    claim, _, path = rest.partition("/")
    if not _CLAIM_NAME.match(claim) or len(claim) > 63:
        raise ValueError(
            f"{uri!r}: {claim!r} is not a PersistentVolumeClaim name (lowercase letters, "
            "digits and '-', at most 63 characters); write pvc://<claim>/<path>"
        )
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"{uri!r}: '.' and '..' are not allowed in the path inside the claim")
    return PvcUri(claim=claim, path="/".join(parts))


def check_uri(uri: str, schemes: tuple[str, ...] = SCHEMES) -> str:
    """Validate the syntax of a pvc://, s3:// or (where `schemes` has it) hf://datasets/ URI;
    refuse other schemes (`ftp://`).

    Hub ids and local paths are free text. `scheme_rule` is the CEL twin of the scheme check.
    """
    if uri.startswith(PVC_SCHEME):
        parse_pvc_uri(uri)
    elif uri.startswith(S3_SCHEME):
        if not uri[len(S3_SCHEME) :].split("/")[0]:
            raise ValueError(f"{uri!r}: write s3://<bucket>/<prefix>")
    elif uri.startswith(HF_SCHEME) and HF_SCHEME in schemes:
        if not uri.startswith(HF_DATASETS_SCHEME):
            raise ValueError(
                f"{uri!r}: only hub datasets have URIs (hf://datasets/<org>/<name>); a hub "
                "model is named by its id alone (model.name: <org>/<name>)"
            )
        parse_hf_uri(uri)
    elif _URI_SCHEME.match(uri):
        scheme = uri.split("://", 1)[0]
        raise ValueError(
            f"{uri!r}: unsupported scheme {scheme}://; use {' or '.join(schemes)} URIs, a hub "
            "id (models) or a local path"
        )
    return uri


def scheme_rule(path: str, schemes: tuple[str, ...] = SCHEMES) -> str:
    """CEL that is true when the string at `self.<path>` is unset or uses no unknown scheme."""
    known = " || ".join(f"self.{path}.startsWith('{scheme}')" for scheme in schemes)
    return f"!({present(path)}) || !self.{path}.matches('{URI_SCHEME_PATTERN}') || {known}"


def uri_refs(spec: TrainingRunSpec) -> list[UriRef]:
    """Every URI-bearing field the spec sets, in a stable order (model, data, output)."""
    model_fields: list[tuple[str, str | None]] = [
        ("spec.model.name", spec.model.name),
        ("spec.model.tokenizer", spec.model.tokenizer),
    ]
    if spec.dpo is not None:
        model_fields.append(("spec.dpo.referenceModel.name", spec.dpo.reference_model.name))
    path_fields: list[tuple[str, str | None]] = []
    if spec.data is not None:
        path_fields += [("spec.data.train", spec.data.train), ("spec.data.eval", spec.data.eval)]
    if spec.evaluate is not None:
        model_fields.append(
            ("spec.evaluate.referenceModel.name", spec.evaluate.reference_model.name)
        )
        for index, suite in enumerate(spec.evaluate.suites):
            where = f"spec.evaluate.suites[{index}]"
            model_fields.append((f"{where}.refusalClassifier", suite.refusal_classifier))
            path_fields.append((f"{where}.data", suite.data))
    path_fields.append(("spec.output", spec.output))
    refs = [
        UriRef(field, uri, classify_uri(uri, may_be_hub_id=True))
        for field, uri in model_fields
        if uri
    ]
    refs += [
        UriRef(field, uri, classify_uri(uri, may_be_hub_id=False))
        for field, uri in path_fields
        if uri
    ]
    return refs
