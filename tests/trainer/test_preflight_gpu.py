"""The trainer's own preflight on a GPU: a run that cannot fit stops before any weight loads.

This machine has no GPU, so torch's view of one is replaced by a device of a stated size;
the run is the tiny from_scratch example grown to a 7B shape (nothing is built: the check
comes first). The estimate is the one `kubetrain validate --preflight` prints.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from example_specs import example, with_spec

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local.runner import resolve_local_uri
from kubetrain_trainer.config import ConfigError
from kubetrain_trainer.preflight import GIB
from kubetrain_trainer.session import preflight

SEVEN_B = {
    "modelType": "llama",
    "vocabSize": 32000,
    "hiddenSize": 4096,
    "numHiddenLayers": 32,
    "numAttentionHeads": 32,
    "intermediateSize": 11008,
    "maxPositionEmbeddings": 4096,
}


def seven_b_config(tmp_path):
    doc = with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        output=str(tmp_path / "out"),
        model={"architecture": SEVEN_B},
    )
    run = parse_document(doc, "test")
    return to_trainer_config(run.metadata.name, run.spec, resolve_local_uri)


def with_gpu(monkeypatch: pytest.MonkeyPatch, size: float) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=size)
    )


def test_a_run_that_cannot_fit_its_gpu_is_refused_before_loading(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_gpu(monkeypatch, 80 * GIB)
    with pytest.raises(ConfigError) as refused:
        preflight(seven_b_config(tmp_path))
    said = str(refused.value)
    assert said.startswith("preflight: this run needs ~")
    assert "6.74B parameters" in said and "more than the 80.0 GiB device" in said
    assert "gradientCheckpointing is off" in said


def test_a_run_that_fits_logs_its_estimate(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with_gpu(monkeypatch, 1000 * GIB)
    with caplog.at_level(logging.INFO, logger="kubetrain_trainer.session"):
        preflight(seven_b_config(tmp_path))
    (line,) = [r.message for r in caplog.records if r.message.startswith("preflight:")]
    assert "per device: weights 25.1 GiB" in line and "of the 1000.0 GiB device" in line
