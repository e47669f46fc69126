"""s3:// and hf:// storage, against a real S3 server (versitygw, tests/s3_server.py) and a
hub cache laid out as huggingface_hub lays it out.

The s3 tests run the trainer as a pod would: a process with AWS_* credentials in its
environment and a cache folder of its own (KUBETRAIN_CACHE_DIR); a second process with an
empty cache folder plays the restarted pod on another node, which has only the bucket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from example_specs import REPO, example, with_spec

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local.runner import resolve_local_uri
from kubetrain_trainer import storage
from kubetrain_trainer.config import ConfigError, dump_trainer_config, load_trainer_config
from kubetrain_trainer.contract import CHECKPOINT_MARKER, ExitCode

pytestmark = pytest.mark.slow

DATA = REPO / "examples" / "data"


def trainer_config(doc: dict, path: Path) -> Path:
    run = parse_document(doc, "test")
    cfg = to_trainer_config(run.metadata.name, run.spec, resolve_local_uri, metrics_port=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_trainer_config(cfg))
    return path


def pod_env(s3_server, cache: Path, **extra: str) -> dict[str, str]:
    """A trainer process's environment as the operator renders it: the Secret's key pair
    and the cache volume."""
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "KUBETRAIN_CACHE_DIR": str(cache),
        **extra,
    }


def pretraining_on_s3(s3_server, bucket: str, max_steps: int) -> dict:
    return with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        data={"train": "s3://data/pretrain.jsonl", "eval": "s3://data/pretrain-eval.jsonl"},
        training={"maxSteps": max_steps, "saveSteps": 10, "evalSteps": 20, "loggingSteps": 5},
        output=f"s3://{bucket}/runs/tiny",
        storage={"s3": {"endpoint": s3_server.endpoint_url, "region": s3_server.region}},
    )


@pytest.fixture
def data_bucket(s3_server):
    """Bucket `data` holding the bundled pretraining text (made once per server)."""
    fs = s3_server.filesystem()
    if not fs.exists("data"):
        fs.mkdir("data")
    for name in ("pretrain.jsonl", "pretrain-eval.jsonl"):
        fs.put_file(str(DATA / name), f"data/{name}")
    return fs


def complete_remote_steps(fs, prefix: str) -> list[int]:
    fs.invalidate_cache()
    markers = fs.glob(f"{prefix}/checkpoint-*/{CHECKPOINT_MARKER}")
    return sorted(int(Path(m).parent.name.split("-")[1]) for m in markers)


def test_an_s3_output_is_published_and_a_new_pod_resumes_from_the_bucket(
    tmp_path: Path, s3_server, data_bucket
):
    fs = data_bucket
    fs.mkdir("models")
    config = trainer_config(pretraining_on_s3(s3_server, "models", 600), tmp_path / "c.yaml")
    pod1 = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_trainer", "--config", str(config)],
        env=pod_env(s3_server, tmp_path / "pod1-cache"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # The first complete checkpoint in the bucket, then a SIGTERM as at a preemption.
        deadline = time.monotonic() + 180
        while not complete_remote_steps(fs, "models/runs/tiny") and time.monotonic() < deadline:
            assert pod1.poll() is None, pod1.stdout.read()
            time.sleep(0.5)
        pod1.send_signal(signal.SIGTERM)
        log1 = pod1.communicate(timeout=180)[0]
    finally:
        pod1.kill()
    assert pod1.returncode == ExitCode.PREEMPTED, log1
    saved = complete_remote_steps(fs, "models/runs/tiny")
    assert saved, log1
    stopped_at = saved[-1]
    newest = f"models/runs/tiny/checkpoint-{stopped_at}"
    files = {Path(p).name: info for p, info in fs.find(newest, detail=True).items()}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(files), files
    # The marker went up after every other file of the checkpoint.
    marker_time = files[CHECKPOINT_MARKER]["LastModified"]
    assert all(info["LastModified"] <= marker_time for info in files.values())
    assert not fs.exists("models/runs/tiny/metrics.json"), "a preempted run is not finished"

    # A new pod (an empty cache: another node) resumes from the bucket and finishes.
    trainer_config(pretraining_on_s3(s3_server, "models", stopped_at + 10), config)
    pod2 = subprocess.run(
        [sys.executable, "-m", "kubetrain_trainer", "--config", str(config)],
        env=pod_env(s3_server, tmp_path / "pod2-cache"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log2 = pod2.stdout + pod2.stderr
    assert pod2.returncode == 0, log2
    assert f"fetched checkpoint-{stopped_at} from s3://models/runs/tiny" in log2
    assert "resuming from" in log2
    fs.invalidate_cache()
    summary = json.loads(fs.cat("models/runs/tiny/metrics.json"))
    assert summary["global_step"] == stopped_at + 10
    final = {Path(p).name for p in fs.ls("models/runs/tiny")}
    assert {"model.safetensors", "config.json", "tokenizer.json", "report.html"} <= final
    # saveTotalLimit 2 holds in the bucket as in the folder.
    assert len(complete_remote_steps(fs, "models/runs/tiny")) <= 2
    assert s3_server.secret_key not in log1 + log2


def test_wrong_credentials_fail_as_a_configuration_error_without_the_secret(
    tmp_path: Path, s3_server, data_bucket
):
    config = trainer_config(pretraining_on_s3(s3_server, "data", 20), tmp_path / "c.yaml")
    wrong = "not-" + s3_server.secret_key
    termination = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "kubetrain_trainer", "--config", str(config)],
        env={
            **pod_env(s3_server, tmp_path / "cache"),
            "AWS_SECRET_ACCESS_KEY": wrong,
            "KUBETRAIN_TERMINATION_LOG": str(termination),
        },
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == ExitCode.CONFIG_ERROR, log
    message = termination.read_text()
    assert message.startswith("config error: data.train: s3://data/pretrain.jsonl: the store "
                              "refused the credentials"), message  # fmt: skip
    assert "storage.s3.credentialsSecretRef" in message
    assert wrong not in log and s3_server.secret_key not in log
    assert "Traceback" not in log


@pytest.fixture
def s3_environment(s3_server, tmp_path, monkeypatch):
    """This process as a pod: the server's key pair and a cache folder of its own."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("KUBETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    return s3_server


def staged(doc: dict, tmp_path: Path):
    cfg = load_trainer_config(trainer_config(doc, tmp_path / "config.yaml"))
    return storage.stage(cfg)


def test_a_missing_bucket_is_named_with_the_field(tmp_path, s3_environment, data_bucket):
    doc = pretraining_on_s3(s3_environment, "no-such-bucket", 20)
    with pytest.raises(ConfigError) as err:
        staged(doc, tmp_path)
    assert str(err.value).startswith(
        "output: s3://no-such-bucket/runs/tiny: bucket 'no-such-bucket' does not exist at "
        f"{s3_environment.endpoint_url}; create it or correct output"
    )
    doc = with_spec(doc, data={"train": "s3://data/missing.jsonl"})
    with pytest.raises(ConfigError, match=r"data.train: s3://data/missing.jsonl: no such object"):
        staged(doc, tmp_path)


def test_a_bad_line_in_an_s3_file_is_named_by_its_uri_and_line(
    tmp_path, s3_environment, data_bucket
):
    from kubetrain_trainer.data import load_data

    lines = (DATA / "pretrain.jsonl").read_text().splitlines()
    lines[2] = '{"text": "unterminated'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    data_bucket.put_file(str(bad), "data/bad.jsonl")
    doc = with_spec(
        pretraining_on_s3(s3_environment, "data", 20),
        data={"train": "s3://data/bad.jsonl"},
        output=str(tmp_path / "out"),
    )
    cfg, remote_output = staged(doc, tmp_path)
    assert remote_output is None  # a local output stays local
    with pytest.raises(ConfigError) as err:
        load_data(cfg.data)
    assert storage.remote_names(str(err.value)).startswith("s3://data/bad.jsonl:3: ")


def test_a_download_is_reused_until_the_object_changes(tmp_path, s3_environment, data_bucket):
    doc = with_spec(pretraining_on_s3(s3_environment, "data", 20), output=str(tmp_path / "o"))
    first, _ = staged(doc, tmp_path)
    copy = Path(first.data.train)
    assert copy.read_bytes() == (DATA / "pretrain.jsonl").read_bytes()
    fetched_at = copy.stat().st_mtime_ns
    again, _ = staged(doc, tmp_path)
    assert Path(again.data.train).stat().st_mtime_ns == fetched_at  # unchanged: not fetched
    data_bucket.pipe_file("data/pretrain.jsonl", b'{"text": "a new corpus"}\n')
    changed, _ = staged(doc, tmp_path)
    assert Path(changed.data.train).read_bytes() == b'{"text": "a new corpus"}\n'


def test_a_prefix_is_fetched_as_a_folder_of_its_objects(tmp_path, s3_environment, data_bucket):
    for name in ("part-0.jsonl", "nested/part-1.jsonl"):
        data_bucket.put_file(str(DATA / "pretrain.jsonl"), f"data/corpus/{name}")
    doc = with_spec(
        pretraining_on_s3(s3_environment, "data", 20),
        data={"train": "s3://data/corpus/"},
        output=str(tmp_path / "out"),
    )
    cfg, _ = staged(doc, tmp_path)
    folder = Path(cfg.data.train)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "nested/part-1.jsonl",
        "part-0.jsonl",
    ]  # the ETag record lies beside the folder, not in it, so it is never read as data
    assert storage.remote_names(str(folder / "part-0.jsonl")) == "s3://data/corpus/part-0.jsonl"


# -- hf://datasets/ ------------------------------------------------------------------------------


def hub_cache(root: Path, repo: str, files: dict[str, str], revision: str = "main") -> Path:
    """A dataset in huggingface_hub's cache layout: snapshots/<commit>/ and refs/<revision>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / "hub" / f"datasets--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot


def test_a_hub_dataset_comes_from_the_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    rows = (DATA / "sft-messages.jsonl").read_text()
    snapshot = hub_cache(tmp_path / "hf", "org/chat", {"data/train.jsonl": rows})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = storage.download_hub_dataset("data.train", "hf://datasets/org/chat/data/train.jsonl")
    assert local == snapshot / "data" / "train.jsonl"
    folder = storage.download_hub_dataset("data.train", "hf://datasets/org/chat@main")
    assert folder == snapshot
    with pytest.raises(ConfigError) as err:
        storage.download_hub_dataset("data.train", "hf://datasets/org/other")
    assert str(err.value).startswith(
        "data.train: hf://datasets/org/other: HF_HUB_OFFLINE is set and the dataset is not in "
        "the hub cache"
    )


def test_an_unreachable_hub_with_nothing_cached_says_so(tmp_path):
    # A fresh process: huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT when imported.
    probe = (
        "from kubetrain_trainer import storage\n"
        "try:\n"
        "    storage.download_hub_dataset('data.train', 'hf://datasets/org/chat')\n"
        "except storage.StorageUnavailable as e:\n"
        "    print('UNAVAILABLE', e)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
        # Nothing listens on port 9 (discard) here: the connection is refused at once.
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    proc = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "UNAVAILABLE data.train: hf://datasets/org/chat: the hub cannot be reached and the "
        "dataset is not in the hub cache"
    ), proc.stdout + proc.stderr


def test_the_rendered_config_keeps_remote_uris_and_no_credentials(tmp_path, s3_server):
    doc = pretraining_on_s3(s3_server, "models", 20)
    cfg = yaml.safe_load(trainer_config(doc, tmp_path / "c.yaml").read_text())
    assert cfg["outputDir"] == "s3://models/runs/tiny"
    assert cfg["storage"] == {
        "s3": {"endpoint": s3_server.endpoint_url, "region": s3_server.region}
    }
