"""Remote storage: s3:// and hf:// inputs staged into the cache, s3:// outputs published.

Training code reads and writes local folders only; this module is the border. `stage(cfg)`
runs before anything else and returns the config with every remote input replaced by a
local copy under the cache (contract.cache_root: the pod's cache volume on a cluster):

- `s3://bucket/key` (a file) or `s3://bucket/prefix` (a folder of files): downloaded once
  per machine; the first process of a node takes a file lock and downloads, the others
  wait on the lock and find the copy. The objects' ETags are kept beside the copy, so an
  unchanged object is not fetched again (a restarted attempt, a resumed run) and a changed
  one is.
- `hf://datasets/org/name[@revision][/path]`: a dataset repository from the Hugging Face
  hub, through huggingface_hub's own cache (HF_HOME) with the token in HF_TOKEN.
  Hub model ids need nothing here: transformers downloads them into the same cache.

An s3:// output is worked on in a local folder (contract.staged_output_dir) and published:
`PublishCheckpoints` uploads each checkpoint once it is complete, its completion marker
last, so a half-uploaded checkpoint is never complete in the bucket either; `publish_final`
uploads the final model, the report and metrics.json last (metrics.json means the model is
whole, as in a local folder). On start, the newest complete checkpoint in the bucket is
fetched, so a new pod (a restarted attempt on another node) resumes where the last one
stopped.

Errors name the field and the URI: a missing bucket or object, or credentials the store
refuses, are configuration errors (exit 78, never retried); a store that does not answer is
`StorageUnavailable` (retried). Credentials never pass through here: botocore reads them
from the environment (a Secret) or the pod's identity, and no message repeats them.
Messages about a local copy (a bad line in a downloaded file) name the remote object
instead (`remote_names`), e.g. `s3://bucket/train.jsonl:17: ...`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetrain_trainer.checkpoints import is_distributed
from kubetrain_trainer.config import ConfigError, S3Storage, TrainerConfig
from kubetrain_trainer.contract import (
    CHECKPOINT_DIR_PREFIX,
    CHECKPOINT_MARKER,
    DOWNLOAD_MARKER,
    HF_DATASETS_SCHEME,
    METRICS_FILE,
    cache_root,
    checkpoint_dir_name,
    checkpoint_dir_step,
    list_checkpoints,
    newest_complete_checkpoint,
    parse_hf_uri,
    staged_output_dir,
)

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
# Under the output, what stays local: the tokenized-data cache (datacache.CACHE_DIR) and the
# checkpoints (each published on its own, when complete).
_NOT_PUBLISHED_AT_THE_END = (".cache",)

# Local copies and the remote URI each holds, for messages (`remote_names`).
_REMOTE_NAMES: dict[str, str] = {}


class StorageUnavailable(RuntimeError):
    """The store did not answer (network, throttling, a hub outage): a retry may succeed."""


def remote_names(text: str) -> str:
    """`text` with every local copy's path replaced by the remote URI it was fetched from."""
    for local, uri in sorted(_REMOTE_NAMES.items(), key=lambda item: -len(item[0])):
        text = text.replace(local, uri)
    return text


def is_remote(uri: str | None) -> bool:
    return bool(uri) and (uri.startswith(S3_SCHEME) or uri.startswith(HF_DATASETS_SCHEME))


# -- s3:// ------------------------------------------------------------------------------------


def s3_filesystem(settings: S3Storage | None) -> Any:
    """An s3fs filesystem for the configured endpoint and region; credentials come from
    botocore's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, web identity, instance)."""
    import s3fs

    client_kwargs: dict[str, str] = {}
    config_kwargs: dict[str, Any] = {}
    if settings is not None and settings.endpoint:
        client_kwargs["endpoint_url"] = settings.endpoint
        # S3-compatible stores on a plain host name or IP have no per-bucket DNS names.
        config_kwargs["s3"] = {"addressing_style": "path"}
    if settings is not None and settings.region:
        client_kwargs["region_name"] = settings.region
    return s3fs.S3FileSystem(
        client_kwargs=client_kwargs, config_kwargs=config_kwargs, skip_instance_cache=True
    )


def _bare(uri: str) -> str:
    """`s3://bucket/key/` -> `bucket/key`, the form s3fs takes."""
    return uri[len(S3_SCHEME) :].rstrip("/")


@contextlib.contextmanager
def s3_errors(field: str, uri: str, fs: Any) -> Iterator[None]:
    """Turn s3fs' exceptions into messages naming the field, the URI and the fix."""
    try:
        yield
    except FileNotFoundError as e:
        bucket = _bare(uri).split("/", 1)[0]
        if not _bucket_exists(fs, bucket):
            raise ConfigError(
                f"{field}: {uri}: bucket {bucket!r} does not exist at "
                f"{_endpoint(fs)}; create it or correct {field}"
            ) from e
        raise ConfigError(f"{field}: {uri}: no such object or prefix in the bucket") from e
    except PermissionError as e:
        raise ConfigError(
            f"{field}: {uri}: the store refused the credentials ({_reason(e)}); check the "
            "access key and secret (storage.s3.credentialsSecretRef, or AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY) and the bucket's policy"
        ) from e
    except OSError as e:
        raise StorageUnavailable(f"{field}: {uri}: the store did not answer: {_reason(e)}") from e
    except Exception as e:
        from botocore.exceptions import (
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            raise ConfigError(
                f"{field}: {uri}: no credentials for S3 ({_reason(e)}); on a cluster name a "
                "Secret in storage.s3.credentialsSecretRef or give the pods an identity "
                "(IRSA); on this machine set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "or an AWS profile"
            ) from e
        if isinstance(e, EndpointConnectionError):
            raise StorageUnavailable(
                f"{field}: {uri}: the store did not answer: {_reason(e)}"
            ) from e
        raise


def _bucket_exists(fs: Any, bucket: str) -> bool:
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell; say "no such object"
    return True


def _endpoint(fs: Any) -> str:
    return (fs.client_kwargs or {}).get("endpoint_url") or "AWS S3"


def _reason(error: BaseException) -> str:
    """The store's own words, one line (botocore's messages never hold the secret key)."""
    said = str(error).strip().splitlines()
    return said[0] if said else type(error).__name__


def _local_copy(uri: str) -> Path:
    return cache_root() / "downloads" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """One process per machine at a time (the others wait): flock on `<path>.lock`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def download_s3(fs: Any, field: str, uri: str) -> Path:
    """A local copy of an s3:// object or prefix, fetched only when it changed (module doc)."""
    copy = _local_copy(uri)
    marker = copy.with_name(copy.name + DOWNLOAD_MARKER)
    with _node_lock(copy), s3_errors(field, uri, fs):
        remote = _bare(uri)
        if fs.isfile(remote):
            objects = {remote: fs.info(remote)}
            single = True
        else:
            objects = fs.find(remote, detail=True)
            single = False
            if not objects:
                raise FileNotFoundError(remote)
        etags = {
            _relative(key, remote, single): info.get("ETag", "") for key, info in objects.items()
        }
        if not (marker.is_file() and json.loads(marker.read_text()) == etags and copy.is_dir()):
            scratch = copy.with_name(f"{copy.name}.tmp-{os.getpid()}")
            shutil.rmtree(scratch, ignore_errors=True)
            sources = list(objects)
            targets = [str(scratch / _relative(key, remote, single)) for key in sources]
            for target in targets:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            fs.get(sources, targets)
            marker.unlink(missing_ok=True)
            shutil.rmtree(copy, ignore_errors=True)
            os.replace(scratch, copy)
            marker.write_text(json.dumps(etags, sort_keys=True))
            log.info("%s: downloaded %s (%d object(s)) to %s", field, uri, len(objects), copy)
    local = copy / Path(remote).name if single else copy
    _REMOTE_NAMES[str(local)] = uri.rstrip("/")
    return local


def _relative(key: str, remote: str, single: bool) -> str:
    return Path(key).name if single else key[len(remote) :].lstrip("/")


# -- hf:// --------------------------------------------------------------------------------------


def download_hub_dataset(field: str, uri: str) -> Path:
    """A dataset repository from the hub (or its copy in HF_HOME), as a local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    dataset = parse_hf_uri(uri)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = snapshot_download(
            dataset.repo_id,
            repo_type="dataset",
            revision=dataset.revision,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except GatedRepoError as e:
        raise ConfigError(
            f"{field}: {uri}: the dataset is gated; accept its terms on the hub and give a "
            "token that may read it (model.tokenSecretRef)"
        ) from e
    except RevisionNotFoundError as e:
        raise ConfigError(f"{field}: {uri}: no revision {dataset.revision!r} on the hub") from e
    except RepositoryNotFoundError as e:
        raise ConfigError(
            f"{field}: {uri}: no dataset {dataset.repo_id!r} on the hub (or it is private "
            "and the token, model.tokenSecretRef, may not read it)"
        ) from e
    except LocalEntryNotFoundError as e:
        where = os.environ.get("HF_HOME") or "~/.cache/huggingface"
        if offline:
            raise ConfigError(
                f"{field}: {uri}: HF_HUB_OFFLINE is set and the dataset is not in the hub "
                f"cache ({where}); download it there first, or unset HF_HUB_OFFLINE"
            ) from e
        raise StorageUnavailable(
            f"{field}: {uri}: the hub cannot be reached and the dataset is not in the hub "
            f"cache ({where}); retry when it is reachable, or put the data on a claim or s3"
        ) from e
    local = Path(folder) / dataset.path if dataset.path else Path(folder)
    if not local.exists():
        raise ConfigError(f"{field}: {uri}: the repository has no {dataset.path!r}")
    _REMOTE_NAMES[str(local)] = uri.rstrip("/")
    return local


# -- staging ------------------------------------------------------------------------------------


@dataclass
class RemoteOutput:
    """An s3:// output and the local folder the trainer works in for it (module doc)."""

    uri: str
    local: Path
    fs: Any

    def remote(self, *parts: str) -> str:
        return "/".join([_bare(self.uri), *parts])

    def remote_checkpoints(self) -> list[int]:
        """Steps of the complete checkpoints in the bucket (with a marker), oldest first."""
        with s3_errors("output", self.uri, self.fs):
            try:
                markers = self.fs.glob(self.remote(f"{CHECKPOINT_DIR_PREFIX}-*", CHECKPOINT_MARKER))
            except FileNotFoundError:
                markers = []
            if not markers and not self.fs.exists(_bare(self.uri).split("/", 1)[0]):
                raise FileNotFoundError(self.uri)
        steps = [checkpoint_dir_step(Path(m).parent.name) for m in markers]
        return sorted(s for s in steps if s is not None)

    def fetch_newest_checkpoint(self) -> None:
        """Bring the bucket's newest complete checkpoint here, unless a newer one is here."""
        remote_steps = self.remote_checkpoints()
        here = newest_complete_checkpoint(self.local)
        here_step = checkpoint_dir_step(here.name) if here is not None else None
        if not remote_steps or (here_step is not None and here_step >= remote_steps[-1]):
            return
        name = checkpoint_dir_name(remote_steps[-1])
        target = self.local / name
        scratch = self.local / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        with s3_errors("output", self.uri, self.fs):
            keys = self.fs.find(self.remote(name))
            marker = self.remote(name, CHECKPOINT_MARKER)
            # The marker last: the local copy is complete only once everything is here.
            keys = [k for k in keys if k != marker] + [marker]
            targets = [str(scratch / k[len(self.remote(name)) :].lstrip("/")) for k in keys]
            for path in targets:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(keys, targets)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
        log.info("output: fetched %s from %s to resume from", name, self.uri)

    def publish_checkpoint_files(self, step: int) -> None:
        """Upload checkpoint `step`'s files as found here, all but its marker."""
        folder = self.local / checkpoint_dir_name(step)
        files = [p for p in folder.rglob("*") if p.is_file() and p.name != CHECKPOINT_MARKER]
        with s3_errors("output", self.uri, self.fs):
            self._put(folder, files, checkpoint_dir_name(step))

    def publish_marker(self, step: int) -> None:
        """Upload checkpoint `step`'s marker: once every file of every node is up."""
        folder = self.local / checkpoint_dir_name(step)
        with s3_errors("output", self.uri, self.fs):
            self._put(folder, [folder / CHECKPOINT_MARKER], checkpoint_dir_name(step))

    def prune_checkpoints(self, keep: int | None) -> None:
        """Mirror transformers' rotation (save_total_limit) in the bucket."""
        if keep is None:
            return
        here = {step for step, _ in list_checkpoints(self.local)}
        steps = self.remote_checkpoints()
        with s3_errors("output", self.uri, self.fs):
            for step in steps[:-1]:
                if step not in here:
                    name = checkpoint_dir_name(step)
                    # The marker first: a folder half deleted is never taken as complete.
                    self.fs.rm(self.remote(name, CHECKPOINT_MARKER))
                    self.fs.rm(self.remote(name), recursive=True)

    def publish_final(self) -> None:
        """Upload the final model and everything beside it; metrics.json last."""
        skipped = {*_NOT_PUBLISHED_AT_THE_END, METRICS_FILE}
        files = [
            p
            for p in self.local.rglob("*")
            if p.is_file()
            and p.relative_to(self.local).parts[0] not in skipped
            and checkpoint_dir_step(p.relative_to(self.local).parts[0]) is None
            and not p.name.endswith(".lock")
        ]
        with s3_errors("output", self.uri, self.fs):
            self._put(self.local, files)
            if (self.local / METRICS_FILE).is_file():
                self._put(self.local, [self.local / METRICS_FILE])
        log.info("output: published %d file(s) to %s", len(files) + 1, self.uri)

    def _put(self, root: Path, files: list[Path], *prefix: str) -> None:
        if not files:
            return
        targets = [self.remote(*prefix, *f.relative_to(root).parts) for f in files]
        self.fs.put([str(f) for f in files], targets)


def stage(cfg: TrainerConfig) -> tuple[TrainerConfig, RemoteOutput | None]:
    """The config with remote inputs fetched and an s3:// output worked on locally."""
    settings = cfg.storage.s3 if cfg.storage is not None else None
    fs: Any = None

    def local(field: str, uri: str | None) -> str | None:
        nonlocal fs
        if not uri or not is_remote(uri):
            return uri
        if uri.startswith(HF_DATASETS_SCHEME):
            return str(download_hub_dataset(field, uri))
        fs = fs or s3_filesystem(settings)
        return str(download_s3(fs, field, uri))

    staged = cfg.model_copy(deep=True)
    staged.model.name = local("model.name", cfg.model.name)
    staged.model.tokenizer = local("model.tokenizer", cfg.model.tokenizer)
    if staged.data is not None:
        staged.data.train = local("data.train", cfg.data.train) or ""
        staged.data.eval = local("data.eval", cfg.data.eval)
    if staged.dpo is not None:
        ref = staged.dpo.reference_model
        ref.name = local("dpo.referenceModel.name", ref.name)
    if staged.evaluate is not None:
        ref = staged.evaluate.reference_model
        ref.name = local("evaluate.referenceModel.name", ref.name)
        for index, suite in enumerate(staged.evaluate.suites):
            suite.data = local(f"evaluate.suites[{index}].data", suite.data)
            suite.refusal_classifier = local(
                f"evaluate.suites[{index}].refusalClassifier", suite.refusal_classifier
            )
    if not cfg.output_dir.startswith(S3_SCHEME):
        return staged, None
    output = RemoteOutput(
        cfg.output_dir, staged_output_dir(cfg.output_dir), fs or s3_filesystem(settings)
    )
    output.local.mkdir(parents=True, exist_ok=True)
    with _node_lock(output.local):
        output.fetch_newest_checkpoint()
    staged.output_dir = str(output.local)
    _REMOTE_NAMES[str(output.local)] = cfg.output_dir.rstrip("/")
    log.info("output: working in %s, publishing to %s", output.local, cfg.output_dir)
    return staged, output


class PublishCheckpoints(TrainerCallback):
    """Uploads each complete checkpoint to the s3:// output (after CompleteMarkerCallback).

    The first process of every node uploads what its node wrote (on a node-local cache each
    node holds its own ranks' files); once every node is done, global rank 0 uploads the
    marker it wrote, and prunes the bucket as transformers pruned the folder.
    """

    def __init__(self, output: RemoteOutput) -> None:
        self.output = output

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        step = state.global_step
        if args.local_process_index == 0:
            self.output.publish_checkpoint_files(step)
        if is_distributed():
            import torch.distributed as dist

            dist.barrier()
        if (
            state.is_world_process_zero
            and (self.output.local / checkpoint_dir_name(step) / CHECKPOINT_MARKER).is_file()
        ):
            self.output.publish_marker(step)
            self.output.prune_checkpoints(args.save_total_limit)
            log.info("checkpoint %s published to %s", checkpoint_dir_name(step), self.output.uri)
