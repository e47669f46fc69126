"""The operator and trainer Dockerfiles, checked as far as one can without building them.

No Docker engine here, so each Dockerfile is read instruction by instruction: base images
pinned to a version (never `latest` or a bare major), a numeric non-root USER matching the
uid the pods run as, an exec-form ENTRYPOINT that is the command the chart or the renderer
really runs, EXPOSEd ports matching the containers', COPY sources that exist and survive
the build's .dockerignore, and no torch in the operator image.
"""

from __future__ import annotations

import fnmatch
import json
import re
from importlib import metadata
from importlib.util import find_spec

import pytest
from chart_render import REPO, one, operator_container, parse_operator_args, render

from kubetrain.api import load_documents
from kubetrain.render import render_trainingrun

OPERATOR = REPO / "operator" / "Dockerfile"
TRAINER = REPO / "trainer_image" / "Dockerfile"
PINNED_TAG = re.compile(r"^[\w./-]+:(?=[^:@]*\d+\.\d+\.\d+)[\w.-]+$|@sha256:[0-9a-f]{64}$")


def instructions(path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuations joined."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def last(path, keyword: str) -> str:
    values = [arguments for key, arguments in instructions(path) if key == keyword]
    assert values, f"{path}: no {keyword}"
    return values[-1]


def exec_form(path, keyword: str) -> list[str]:
    arguments = last(path, keyword)
    assert arguments.startswith("["), f"{path}: {keyword} must be exec form (JSON)"
    return json.loads(arguments)


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_base_images_are_pinned(path):
    stages = set()
    for keyword, arguments in instructions(path):
        if keyword != "FROM":
            continue
        image, *alias = arguments.split()
        if image not in stages:
            assert PINNED_TAG.search(image), f"{path}: FROM {image} is not pinned to a version"
        if alias:
            stages.add(alias[-1])


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_runs_as_a_numeric_non_root_user(path):
    user, _, group = last(path, "USER").partition(":")
    assert user.isdigit() and int(user) != 0, f"{path}: USER {user}"
    assert not group or (group.isdigit() and int(group) != 0)


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_copied_sources_exist_and_survive_dockerignore(path):
    ignore = path.with_name(path.name + ".dockerignore")
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    includes = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    for keyword, arguments in instructions(path):
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        for source in arguments.split()[:-1]:
            assert (REPO / source).exists(), f"{path}: COPY {source}: no such path"
            if includes:
                kept = any(fnmatch.fnmatch(source.rstrip("/"), p) or
                           source.rstrip("/").startswith(p + "/") or source.rstrip("/") == p
                           for p in includes)  # fmt: skip
                assert kept, f"{ignore} excludes {source}"


def test_operator_image_is_the_cli_the_chart_runs():
    entrypoint = exec_form(OPERATOR, "ENTRYPOINT")
    (script,) = metadata.entry_points(group="console_scripts", name=entrypoint[0])
    assert script.value == "kubetrain.cli:main"
    parse_operator_args(exec_form(OPERATOR, "CMD"))
    objects = render()
    container = operator_container(objects)
    assert "command" not in container  # the chart passes args to the image's entrypoint
    parse_operator_args(container["args"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert last(OPERATOR, "USER") == f"{pod['securityContext']['runAsUser']}:" + str(
        pod["securityContext"]["runAsGroup"]
    )
    ports = sorted(p["containerPort"] for p in container["ports"])
    assert sorted(map(int, last(OPERATOR, "EXPOSE").split())) == ports


def test_operator_image_installs_no_torch():
    installs = [a for k, a in instructions(OPERATOR) if k == "RUN" and "pip install" in a]
    assert installs and all('".[operator]"' in a and "trainer" not in a for a in installs)
    # What `pip install ".[operator]"` pulls in: the base requirements and the operator extra.
    requirements = [
        r for r in metadata.requires("kubetrain") or []
        if "extra ==" not in r or 'extra == "operator"' in r
    ]  # fmt: skip
    heavy = {"torch", "transformers", "trl", "peft", "accelerate", "datasets"}
    assert requirements
    assert not {re.split(r"[<>=!~;\[ ]", r)[0] for r in requirements} & heavy


def test_trainer_image_runs_what_the_operator_renders():
    (run,) = load_documents(REPO / "examples" / "trainingrun-sft.yaml")
    job = next(o for o in render_trainingrun(run, 1, backend="job") if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image_command = exec_form(TRAINER, "ENTRYPOINT") + exec_form(TRAINER, "CMD")
    assert container["command"] == image_command
    python, flag, module = image_command[:3]
    assert (python, flag) == ("python", "-m") and find_spec(module) is not None
    assert last(TRAINER, "USER") == (
        f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    )
    ports = sorted(p["containerPort"] for p in container["ports"])
    assert sorted(map(int, last(TRAINER, "EXPOSE").split())) == ports
