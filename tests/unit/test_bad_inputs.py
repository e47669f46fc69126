"""Bad specs a new user writes, each refused by `kubetrain validate` and `kubetrain render`
with a clear error: a nonzero exit, no traceback, and the field (or the file) named.

The table is the corpus: every row is one mistake, written as a change to a valid cluster
spec (hub model, pvc:// data and output), so `render` reaches the same check as `validate`.
Bad *data* (rows, model folders) needs the trainer and lives in tests/trainer/test_bad_data.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain.cli import main

GOOD: dict[str, Any] = {
    "apiVersion": "kubetrain.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "sft-tiny"},
    "spec": {
        "method": "sft",
        "model": {"name": "Qwen/Qwen2.5-0.5B"},
        "data": {"train": "pvc://datasets/sft.jsonl", "format": "messages", "maxLength": 192},
        "training": {"numTrainEpochs": 2, "learningRate": 1.0e-3},
        "output": "pvc://outputs/sft-tiny",
    },
}


def spec(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change that sets `spec.<path>` (dots between keys) to `value`."""

    def change(doc: dict[str, Any]) -> None:
        node = doc["spec"]
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return change


def dpo(**blocks: Any) -> Callable[[dict[str, Any]], None]:
    """Turn the spec into a dpo run on preference data, then set `blocks` on it."""

    def change(doc: dict[str, Any]) -> None:
        doc["spec"]["method"] = "dpo"
        doc["spec"]["data"]["format"] = "preference"
        doc["spec"].update(blocks)

    return change


def toleration(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return spec("resources.tolerations", [fields])


def delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        del node[last]

    return change


# (case id, change to GOOD, text the error must contain: the field or the file's problem).
SPEC_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # The object itself.
    ("kind-unknown", lambda d: d.update(kind="TrainingJob"), "unknown kind 'TrainingJob'"),
    ("api-version-old", lambda d: d.update(apiVersion="kubetrain.dev/v1"), "apiVersion is"),
    ("name-missing", delete("metadata.name"), "metadata.name"),
    ("name-uppercase", lambda d: d["metadata"].update(name="SFT"), "metadata.name"),
    ("name-too-long", lambda d: d["metadata"].update(name="a" * 41), "metadata.name"),
    ("spec-missing", delete("spec"), "spec: Field required"),
    ("unknown-field", spec("trainig", {}), "spec.trainig: unknown field"),
    ("method-unknown", spec("method", "rlhf"), "spec.method"),
    # Data.
    ("data-missing", delete("spec.data"), "method sft needs a data block (data.train)"),
    ("train-missing", delete("spec.data.train"), "spec.data.train: Field required"),
    ("train-empty", spec("data.train", ""), "spec.data.train"),
    ("train-blank", spec("data.train", "  "), "spec.data.train: is blank"),
    ("train-ftp", spec("data.train", "ftp://host/t.jsonl"), "spec.data.train: 'ftp://"),
    ("train-https", spec("data.train", "https://host/t.jsonl"), "unsupported scheme https://"),
    ("eval-gs", spec("data.eval", "gs://bucket/e.jsonl"), "spec.data.eval: 'gs://"),
    ("train-pvc-no-claim", spec("data.train", "pvc://"), "spec.data.train: 'pvc://'"),
    ("train-pvc-bad-claim", spec("data.train", "pvc://Data_Set/t"), "spec.data.train"),
    ("train-pvc-dotdot", spec("data.train", "pvc://data/../t"), "spec.data.train"),
    ("train-s3-no-bucket", spec("data.train", "s3://"), "spec.data.train"),
    ("train-number", spec("data.train", 42), "spec.data.train"),
    ("train-hf-model", spec("data.train", "hf://models/org/m"), "only hub datasets have URIs"),
    ("train-hf-no-name", spec("data.train", "hf://datasets/org"), "hf://datasets/<org>/<name>"),
    ("train-hf-dotdot", spec("data.train", "hf://datasets/o/n/../x"), "'.' or '..' part"),
    ("max-length-string", spec("data.maxLength", "192"), "spec.data.maxLength"),
    ("max-length-huge", spec("data.maxLength", 10**9), "spec.data.maxLength"),
    ("max-length-tiny", spec("data.maxLength", 4), "spec.data.maxLength"),
    ("max-length-float", spec("data.maxLength", 192.5), "spec.data.maxLength"),
    ("max-length-bool", spec("data.maxLength", True), "spec.data.maxLength"),
    ("format-unknown", spec("data.format", "chat"), "spec.data.format"),
    ("format-preference-on-sft", spec("data.format", "preference"), "not preference pairs"),
    ("packing-string", spec("data.packing", "yes"), "spec.data.packing"),
    ("mlm", spec("data.mlmProbability", 0.15), "spec.data.mlmProbability"),
    ("prompt-length-on-sft", spec("data.maxPromptLength", 64), "data.maxPromptLength"),
    # Model.
    ("model-missing", spec("model", {}), "model.name"),
    ("model-blank", spec("model.name", " "), "spec.model.name"),
    ("model-hf-scheme", spec("model.name", "hf://Qwen/Qwen2.5-0.5B"), "spec.model.name"),
    ("model-number", spec("model.name", 7), "spec.model.name"),
    ("model-dtype", spec("model.torchDtype", "fp8"), "spec.model.torchDtype"),
    ("trust-remote-code-string", spec("model.trustRemoteCode", "no"), "trustRemoteCode"),
    ("scratch-no-architecture", spec("method", "from_scratch"), "model.architecture"),
    # Training.
    ("bf16-string", spec("training.bf16", "true"), "spec.training.bf16"),
    ("bf16-and-fp16", spec("training", {"bf16": True, "fp16": True}), "bf16 and fp16"),
    ("epochs-zero", spec("training.numTrainEpochs", 0), "spec.training.numTrainEpochs"),
    ("lr-word", spec("training.learningRate", "fast"), "spec.training.learningRate"),
    ("batch-string", spec("training.perDeviceTrainBatchSize", "8"), "perDeviceTrainBatchSize"),
    ("batch-float", spec("training.perDeviceTrainBatchSize", 8.0), "perDeviceTrainBatchSize"),
    ("max-steps-zero", spec("training.maxSteps", 0), "maxSteps"),
    ("eval-without-data", spec("training.evalStrategy", "steps"), "data.eval"),
    ("scheduler-unknown", spec("training.lrSchedulerType", "step"), "lrSchedulerType"),
    ("report-to-unknown", spec("training.reportTo", ["comet"]), "spec.training.reportTo"),
    ("warmup-ratio-big", spec("training.warmupRatio", 2), "spec.training.warmupRatio"),
    # Method blocks.
    ("dpo-block-on-sft", spec("dpo", {"beta": 0.1}), "dpo block given"),
    ("lora-block-on-sft", spec("lora", {"r": 8}), "lora block given"),
    ("lora-r-string", lambda d: (spec("method", "lora")(d), spec("lora.r", "8")(d)), "lora.r"),
    ("dpo-on-messages", lambda d: (dpo()(d), spec("data.format", "messages")(d)), "preference"),
    ("dpo-beta-zero", dpo(dpo={"beta": 0}), "spec.dpo.beta"),
    (
        "dpo-reference-ftp",
        dpo(dpo={"referenceModel": {"name": "ftp://models/ref"}}),
        "spec.dpo.referenceModel.name",
    ),
    ("dpo-loss-unknown", dpo(dpo={"lossType": "kto"}), "spec.dpo.lossType"),
    # Output, image, env, restarts, backend.
    ("output-empty", spec("output", ""), "spec.output"),
    ("output-ftp", spec("output", "ftp://host/out"), "spec.output"),
    ("output-hf", spec("output", "hf://datasets/org/out"), "spec.output: 'hf://datasets"),
    ("model-hf-uri", spec("model.name", "hf://datasets/org/m"), "spec.model.name: 'hf://"),
    (
        "s3-endpoint-no-scheme",
        spec("storage.s3.endpoint", "minio:9000"),
        "spec.storage.s3.endpoint",
    ),
    ("s3-region-upper", spec("storage.s3.region", "EU-West-1"), "spec.storage.s3.region"),
    ("s3-secret-no-name", spec("storage.s3.credentialsSecretRef", {}), "credentialsSecretRef.name"),
    ("s3-secret-inline", spec("storage.s3.secretAccessKey", "abc"), "spec.storage.s3"),
    ("cache-claim-and-size", spec("cache", {"claimName": "c", "sizeLimit": "1Gi"}), "sizeLimit"),
    ("cache-claim-bad", spec("cache.claimName", "Cache_1"), "spec.cache.claimName"),
    ("cache-size-bad", spec("cache.sizeLimit", "lots"), "spec.cache.sizeLimit"),
    ("output-missing", delete("spec.output"), "spec.output: Field required"),
    ("image-empty", spec("image", ""), "spec.image"),
    ("pull-policy", spec("imagePullPolicy", "Sometimes"), "spec.imagePullPolicy"),
    ("suspend-string", spec("suspend", "true"), "spec.suspend"),
    ("max-restarts-string", spec("restartPolicy.maxRestarts", "3"), "maxRestarts"),
    ("max-restarts-huge", spec("restartPolicy.maxRestarts", 1000), "maxRestarts"),
    ("backend-unknown", spec("backend", "mpi"), "spec.backend"),
    ("env-rank", spec("env", [{"name": "RANK", "value": "0"}]), "spec.env"),
    ("env-name-bad", spec("env", [{"name": "1X", "value": "0"}]), "spec.env.0.name"),
    ("env-value-number", spec("env", [{"name": "X", "value": 1}]), "spec.env.0.value"),
    # Resources: what the API server would refuse when the operator creates the Job.
    ("nodes-string", spec("resources.nodes", "2"), "spec.resources.nodes"),
    ("nodes-zero", spec("resources.nodes", 0), "spec.resources.nodes"),
    ("procs-too-many", spec("resources.procPerNode", 65), "spec.resources.procPerNode"),
    (
        "gpu-request-only",
        spec("resources.requests", {"nvidia.com/gpu": 1}),
        "requests.nvidia.com/gpu: 1 has no limit",
    ),
    (
        "gpu-request-not-limit",
        spec("resources", {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 1}}),
        "requests.nvidia.com/gpu: 2 differs from its limit 1",
    ),
    ("gpu-half", spec("resources.limits", {"nvidia.com/gpu": "0.5"}), "limits.nvidia.com/gpu"),
    (
        "cpu-request-above-limit",
        spec("resources", {"requests": {"cpu": 8}, "limits": {"cpu": 4}}),
        "requests.cpu: 8 is above limits.cpu: 4",
    ),
    (
        "memory-request-above-limit",
        spec("resources", {"requests": {"memory": "64Gi"}, "limits": {"memory": "60G"}}),
        "requests.memory",
    ),
    ("memory-word", spec("resources.requests", {"memory": "lots"}), "requests.memory"),
    ("cpu-float", spec("resources.limits", {"cpu": 0.5}), "spec.resources.limits.cpu"),
    ("cpu-bool", spec("resources.limits", {"cpu": True}), "spec.resources.limits.cpu"),
    (
        "toleration-exists-value",
        toleration(key="gpu", operator="Exists", value="true"),
        "spec.resources.tolerations.0: operator Exists",
    ),
    (
        "toleration-seconds-no-effect",
        toleration(key="gpu", tolerationSeconds=60),
        "spec.resources.tolerations.0: tolerationSeconds",
    ),
    (
        "toleration-seconds-wrong-effect",
        toleration(key="gpu", effect="NoSchedule", tolerationSeconds=60),
        "tolerationSeconds applies to NoExecute",
    ),
    ("toleration-no-key", toleration(operator="Equal", value="x"), "without key"),
    ("toleration-seconds-string", toleration(key="g", tolerationSeconds="60"), "Seconds"),
    ("toleration-effect", toleration(key="g", effect="NoRun"), "tolerations.0.effect"),
    ("node-selector-number", spec("resources.nodeSelector", {"gpu": 1}), "nodeSelector.gpu"),
]


def write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def refuse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process; assert a clear refusal and return what it printed."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0, f"accepted: {out}"
    assert "Traceback" not in out + err
    return err


@pytest.mark.parametrize(
    ("change", "expected"),
    [(change, expected) for _, change, expected in SPEC_CASES],
    ids=[case_id for case_id, _, _ in SPEC_CASES],
)
@pytest.mark.parametrize("command", ["validate", "render"])
def test_bad_spec_is_refused_naming_the_field(
    command: str,
    change: Callable[[dict[str, Any]], None],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = copy.deepcopy(GOOD)
    change(doc)
    err = refuse([command, str(write(tmp_path, doc))], capsys)
    assert expected in err, err


def test_the_good_spec_renders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The base every row changes is valid, so each row fails for its own mistake only."""
    assert main(["render", str(write(tmp_path, GOOD))]) == 0
    assert "kind: Job" in capsys.readouterr().out


# (case id, file bytes, what the error says): files that are not a spec at all.
FILE_CASES: list[tuple[str, bytes, str]] = [
    ("binary", b"\xff\xfe\x00\x81garbage", "not UTF-8 text"),
    ("latin-1", "metadata:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("empty", b"", "no objects found"),
    ("comments-only", b"# nothing here\n", "no objects found"),
    ("bad-indent", b"kind: TrainingRun\n  spec: {\n", "cannot read"),
    ("tab-indent", b"kind: TrainingRun\nspec:\n\tmethod: sft\n", "line 3"),
    ("a-list", b"- kind: TrainingRun\n", "expected a mapping"),
    ("a-string", b"hello\n", "expected a mapping"),
    ("duplicate-docs-bad-second", yaml.safe_dump(GOOD).encode() + b"---\n- x\n", "document 2"),
]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(content, expected) for _, content, expected in FILE_CASES],
    ids=[case_id for case_id, _, _ in FILE_CASES],
)
@pytest.mark.parametrize("command", ["validate", "render"])
def test_unreadable_file_is_refused_naming_the_file(
    command: str,
    content: bytes,
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    err = refuse([command, str(path)], capsys)
    assert str(path) in err and expected in err, err


def test_missing_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.yaml"
    err = refuse(["validate", str(path)], capsys)
    assert f"{path}: cannot read" in err, err


def test_pipeline_stage_mistakes_name_the_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = yaml.safe_load(Path("examples/pipeline-tiny.yaml").read_text())
    stage = pipeline["spec"]["stages"][1]
    stage["spec"]["data"]["maxLength"] = "192"
    err = refuse(["validate", str(write(tmp_path, pipeline))], capsys)
    assert f"spec.stages[{stage['name']}].spec.data.maxLength" in err, err


def test_corpus_size() -> None:
    """The corpus keeps its breadth (issue 10): every row above is a refused mistake."""
    assert len(SPEC_CASES) + len(FILE_CASES) + 2 >= 90
