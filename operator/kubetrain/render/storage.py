"""Map a TrainingRun's storage URIs onto volumes a pod can mount.

On a cluster a model, dataset or output lives on a PersistentVolumeClaim named by a
`pvc://claim/sub/path` URI, in S3 (`s3://bucket/key`), on the Hugging Face hub (a model id,
or `hf://datasets/...` for data). Each claim becomes one volume mounted at
`/mnt/pvc/<claim>`: read-only, except the claim that holds the output, which the trainer
writes checkpoints to. s3:// and hub URIs reach the trainer as they are: it fetches them into
the pod's cache volume and publishes an s3:// output itself (kubetrain_trainer.storage), with
the credentials the pod gets as env from a Secret (`storage_env`). Local paths mean nothing
inside a pod, so they are refused here with the field that holds them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kubetrain.api import S3CredentialsRef, TrainingRunSpec, UriRef, parse_pvc_uri, uri_refs
from kubetrain_trainer.config import ConfigError

PVC_MOUNT_ROOT = "/mnt/pvc"


class RenderError(ConfigError, ValueError):
    """A spec the operator cannot turn into Kubernetes objects; the message says why.

    A ConfigError because only an edit to the spec fixes it (the CLI reports it as such);
    a ValueError because `to_trainer_config` lets its resolver refuse with one.
    """


@dataclass(frozen=True)
class ClaimMount:
    """One PersistentVolumeClaim the pods mount."""

    claim: str
    volume: str
    mount_path: str
    read_only: bool


def volume_name(claim: str) -> str:
    """A volume name for a claim: `pvc-<claim>`, shortened with a hash to fit 63 chars."""
    name = f"pvc-{claim}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(claim.encode()).hexdigest()[:8]
    return f"pvc-{claim[:50].rstrip('-')}-{digest}"


def cluster_path(ref: UriRef) -> str:
    """Where the trainer finds `ref` inside a pod; RenderError for forms a pod cannot use."""
    if ref.kind in ("hub", "hf", "s3"):
        return ref.uri  # the trainer fetches (and for an output, publishes) these itself
    if ref.kind == "pvc":
        pvc = parse_pvc_uri(ref.uri)
        return "/".join(p for p in (PVC_MOUNT_ROOT, pvc.claim, pvc.path) if p)
    hint = " or a Hugging Face hub id" if ref.field.startswith("spec.model") else ""
    raise RenderError(
        f"{ref.field}: local path {ref.uri!r} does not exist inside the pods; put it on a "
        f"PersistentVolumeClaim and write pvc://<claim>/<path>{hint} (local paths work with "
        "`kubetrain run`)"
    )


def claim_mounts(spec: TrainingRunSpec) -> list[ClaimMount]:
    """One mount per claim the spec names, sorted by claim; the output's is writable."""
    claims: dict[str, bool] = {}
    for ref in uri_refs(spec):
        if ref.kind != "pvc":
            continue
        claim = parse_pvc_uri(ref.uri).claim
        writable = ref.field == "spec.output"
        claims[claim] = claims.get(claim, False) or writable
    return [
        ClaimMount(
            claim=claim,
            volume=volume_name(claim),
            mount_path=f"{PVC_MOUNT_ROOT}/{claim}",
            read_only=not writable,
        )
        for claim, writable in sorted(claims.items())
    ]


def claims_used(spec: TrainingRunSpec) -> list[str]:
    """Names of the PersistentVolumeClaims the pods mount, sorted (must exist to start)."""
    cache = [spec.cache.claim_name] if spec.cache is not None and spec.cache.claim_name else []
    return sorted({mount.claim for mount in claim_mounts(spec)} | set(cache))


def s3_credentials(spec: TrainingRunSpec) -> S3CredentialsRef | None:
    """The Secret with the pods' S3 access key pair, if the spec names one."""
    s3 = spec.storage.s3 if spec.storage is not None else None
    return s3.credentials_secret_ref if s3 is not None else None


def storage_env(spec: TrainingRunSpec) -> list[dict[str, Any]]:
    """The AWS SDK's credential variables from the spec's Secret (nothing without one: the
    SDK then uses the pod's own identity). Values stay in the Secret; the pod spec only
    references them."""
    ref = s3_credentials(spec)
    if ref is None:
        return []
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}}
        for env, key in (
            ("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key),
        )
    ]


def secrets_used(spec: TrainingRunSpec) -> list[str]:
    """Names of the Secrets the pods read, sorted; optional env references are left out."""
    names = set()
    if spec.model.token_secret_ref is not None:
        names.add(spec.model.token_secret_ref.name)
    if s3_credentials(spec) is not None:
        names.add(s3_credentials(spec).name)
    for env in spec.env:
        ref = env.value_from.secret_key_ref if env.value_from else None
        if ref is not None and not ref.optional:
            names.add(ref.name)
    return sorted(names)


def config_maps_used(spec: TrainingRunSpec) -> list[str]:
    """Names of user ConfigMaps the pods read through env, sorted (optional ones left out)."""
    names = set()
    for env in spec.env:
        ref = env.value_from.config_map_key_ref if env.value_from else None
        if ref is not None and not ref.optional:
            names.add(ref.name)
    return sorted(names)
