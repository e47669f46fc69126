"""report.html as a person sees it: a real tiny run's report, opened in headless Chromium.

A short from_scratch run through `kubetrain run`'s runner leaves metrics.json,
trainer_state.json and report.html; Debian's chromium (`apt-get install chromium`), driven
by Playwright (which downloads no browser of its own here), loads the report from disk.
The test checks that every plot decodes, that nothing is fetched from the network, and that
each number on the page is the one in metrics.json, then saves a full-page screenshot into
the test's tmp folder and prints its path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from example_specs import example, with_spec

from kubetrain.api import parse_document
from kubetrain.local import run_locally
from kubetrain_trainer.contract import (
    METRICS_FILE,
    REPORT_FILE,
    REPORT_PLOTS_DIR,
    TRAINER_STATE_FILE,
)

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium on PATH (apt-get install chromium)"
)
STEPS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The output of an 8-step from_scratch run: logs every 2 steps, evaluates every 4."""
    output = tmp_path_factory.mktemp("report") / "from-scratch"
    doc = with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        training={"maxSteps": STEPS, "loggingSteps": 2, "evalSteps": 4, "saveSteps": STEPS},
        output=str(output),
    )
    result = run_locally(parse_document(doc, "test"), metrics_port=0)
    assert result.exit_code == 0, f"trainer exited {result.exit_code}"
    return output


def test_the_trainer_leaves_its_final_history_beside_the_report(trained: Path):
    final = json.loads((trained / TRAINER_STATE_FILE).read_text())["log_history"]
    # transformers' own copy in the last checkpoint (the same file name: older outputs are
    # read from there) misses the evaluation after training.
    saved = json.loads((trained / f"checkpoint-{STEPS}" / TRAINER_STATE_FILE).read_text())
    assert [e["step"] for e in final if "loss" in e] == [1, 2, 4, 6, 8]
    evaluations = [e for e in final if "eval_loss" in e]
    assert len(evaluations) == len([e for e in saved["log_history"] if "eval_loss" in e]) + 1
    metrics = json.loads((trained / METRICS_FILE).read_text())
    assert metrics["eval_loss"] == evaluations[-1]["eval_loss"]
    assert (trained / REPORT_FILE).is_file()


def shown_number(key: str, text: str) -> float:
    """A value as the page shows it, back as a number (H:MM:SS as seconds, 1,234 as 1234)."""
    if ":" in text:
        hours, minutes, seconds = (int(part) for part in text.split(":"))
        return hours * 3600 + minutes * 60 + seconds
    return float(text.replace(",", ""))


def assert_shows(key: str, text: str, value: object) -> None:
    if isinstance(value, str):
        assert text == value, key
    elif ":" in text or key == "tokens_per_second" or isinstance(value, int):
        assert shown_number(key, text) == pytest.approx(value, abs=0.5), key  # rounded
    else:
        assert shown_number(key, text) == pytest.approx(value, rel=5e-4), key  # 4 digits


@needs_chromium
def test_the_report_of_a_real_run_renders_in_chromium(trained: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    metrics = json.loads((trained / METRICS_FILE).read_text())
    screenshot = tmp_path / "report.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto((trained / REPORT_FILE).as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight])"
            )
            shown = page.evaluate(
                "Object.fromEntries(Array.from(document.querySelectorAll('td[data-metric]'),"
                " td => [td.dataset.metric, td.innerText]))"
            )
            heading = page.inner_text("h1")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {screenshot}")

    assert heading == "from-scratch-tiny"
    plots = sorted(p.name for p in (trained / REPORT_PLOTS_DIR).iterdir())
    assert plots == ["learning_rate.png", "loss.png", "tokens_per_second.png"]
    assert len(images) == len(plots)
    assert all(complete and width > 0 and height > 0 for complete, width, height in images)
    # The page alone: the file itself and its data: URIs, nothing from anywhere else.
    assert [url for url in requested if not url.startswith(("file:", "data:"))] == []
    # Every number metrics.json holds is on the page, as the file has it (its lists are not
    # table rows: the evaluation history is the eval loss curve).
    assert set(shown) == set(metrics) - {"replica_checksums", "eval_history"}
    for key, text in shown.items():
        assert_shows(key, text, metrics[key])
    assert screenshot.stat().st_size > 10_000
