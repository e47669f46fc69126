"""`kubetrain` commands: what a user types, what they get back, and the exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from example_specs import EXAMPLES, REPO

from kubetrain.cli import main
from kubetrain.local.runner import clearable_output_dir, local_output_dir
from kubetrain_trainer.config import ConfigError
from kubetrain_trainer.contract import staged_output_dir


def test_validate_accepts_every_example(capsys):
    files = sorted(str(p) for p in EXAMPLES.glob("trainingrun-*.yaml"))
    assert main(["validate", *files]) == 0
    assert capsys.readouterr().out.count(": valid") == len(files)


def test_validate_names_file_object_and_field(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((EXAMPLES / "trainingrun-sft-tiny.yaml").read_text())
    doc["spec"]["training"]["learningRate"] = -1
    bad.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: TrainingRun sft-tiny: spec.training.learningRate" in err
    assert "greater than 0" in err


def test_run_refuses_cluster_storage_with_the_fix(tmp_path: Path, capsys):
    run = tmp_path / "run.yaml"
    doc = yaml.safe_load((EXAMPLES / "trainingrun-sft.yaml").read_text())
    run.write_text(yaml.safe_dump(doc))
    assert main(["run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "spec.model.name" not in err  # a hub id is fine locally
    assert "spec.data.train: pvc://sft-data/sft/train.jsonl" in err
    assert "use a local path" in err


def test_an_s3_output_is_worked_on_in_the_cache_and_never_cleared_here(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETRAIN_CACHE_DIR", str(tmp_path))
    staged = local_output_dir("s3://models/runs/sft")
    assert staged == staged_output_dir("s3://models/runs/sft") and staged.parent.parent == tmp_path
    assert clearable_output_dir(str(tmp_path / "out"), "--rerun") == tmp_path / "out"
    # Clearing the local copy would leave the bucket's checkpoints to resume from.
    with pytest.raises(ConfigError, match=r"--rerun starts over, which this machine cannot do"):
        clearable_output_dir("s3://models/runs/sft", "--rerun")


def test_render_prints_the_workload(capsys):
    assert main(["render", str(EXAMPLES / "trainingrun-sft.yaml")]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    assert objects[2]["metadata"]["name"] == "sft-qwen2-5-3b-1"
    config = yaml.safe_load(objects[0]["data"]["config.yaml"])
    assert config["data"]["train"] == "/mnt/pvc/sft-data/sft/train.jsonl"


def test_render_shows_the_sharding_in_the_trainer_config(capsys):
    assert main(["render", str(EXAMPLES / "trainingrun-sft-7b-fsdp.yaml")]) == 0
    config_map = next(yaml.safe_load_all(capsys.readouterr().out))
    training = yaml.safe_load(config_map["data"]["config.yaml"])["training"]
    assert training["sharding"] == "fsdp" and training["gradientCheckpointing"] is True


def test_render_refuses_local_paths_for_a_cluster(capsys):
    assert main(["render", str(EXAMPLES / "trainingrun-sft-tiny.yaml")]) == 2
    assert "does not exist inside the pods" in capsys.readouterr().err


def test_crds_writes_what_is_committed(tmp_path: Path):
    assert main(["crds", "--out", str(tmp_path)]) == 0
    for generated in tmp_path.iterdir():
        assert generated.read_text() == (REPO / "crds" / generated.name).read_text()


def test_version_names_the_package_and_with_verbose_its_libraries(capsys):
    import importlib.metadata
    import subprocess
    import sys

    assert main(["--version"]) == 0
    expected = f"kubetrain {importlib.metadata.version('kubetrain')}"
    assert capsys.readouterr().out.splitlines() == [expected]
    assert main(["--version", "--verbose"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == expected
    shown = dict(line.split(" ", 1) for line in lines[1:])
    assert set(shown) == {
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "kopf",
        "kubernetes",
    }
    assert shown["trl"] == importlib.metadata.version("trl")
    # The installed entry point answers before it asks for a command.
    script = Path(sys.executable).parent / "kubetrain"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == expected
