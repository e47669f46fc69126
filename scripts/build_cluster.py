"""Build the control plane the cluster tests run on, from Go modules, into .tools/.

Run as: python scripts/build_cluster.py            (prints the folder with the binaries)

Three small Go modules under tests/cluster/ pin what is built: kubernetes/ (kube-apiserver,
kube-controller-manager, kube-scheduler, kubectl of k8s.io/kubernetes, its staging modules
replaced by the matching v0.x releases), etcd/ (go.etcd.io/etcd/server/v3) and jobset/
(sigs.k8s.io/jobset). Each is its own module so minimal version selection never moves one
project's dependencies for another. The binaries land in `.tools/k8s-<version>/` with the
versions stamped the way Kubernetes' own build stamps them (hack/lib/version.sh), so
`/version` says e.g. v1.36.3 and Helm's kubeVersion checks pass. A stamp of the go.mod/go.sum
contents and the flags skips a build that is already there; otherwise Go's build cache
makes a rebuild take seconds (the first, cold build takes many minutes on 2 cores).

A fourth module, s3/, pins the S3 server the storage tests run against: versitygw
(github.com/versity/versitygw, Apache-2.0; it checks SigV4 signatures, so a wrong secret is
refused), built into `.tools/versitygw-<version>/` with a stamp of its own, so neither pin
rebuilds the other. Not MinIO: its server is AGPL.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / "tests" / "cluster"
TOOLS = ROOT / ".tools"
# The flags of Kubernetes' own release build (hack/lib/golang.sh).
GO_FLAGS = ["-p", "2", "-trimpath", "-tags", "selinux,notest"]
KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
BINARIES = (*KUBERNETES_COMMANDS, "etcd", "jobset-controller")
CONTROL_PLANE_MODULES = ("kubernetes", "etcd", "jobset")
S3_SERVER_MODULE = "github.com/versity/versitygw"


def required_version(module_dir: Path, module: str) -> str:
    """The version `module_dir/go.mod` requires of `module`."""
    text = (module_dir / "go.mod").read_text()
    found = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)(\s+//.*)?$", text, re.M)
    if not found:
        raise SystemExit(f"{module_dir}/go.mod: it does not require {module}")
    return found.group(1)


def kubernetes_version() -> str:
    return required_version(MODULES / "kubernetes", "k8s.io/kubernetes")


def tools_dir() -> Path:
    """Where the binaries of the pinned Kubernetes version live."""
    return TOOLS / f"k8s-{kubernetes_version()}"


def s3_server_version() -> str:
    return required_version(MODULES / "s3", S3_SERVER_MODULE)


def s3_server_binary() -> Path:
    """The pinned versitygw binary (it may not be built yet)."""
    return TOOLS / f"versitygw-{s3_server_version()}" / "versitygw"


def kubernetes_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    fields = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    stamps = [
        f"-X '{package}.{key}={value}'"
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in fields.items()
    ]
    return " ".join(["-s", "-w", *stamps])


def stamp(modules: tuple[str, ...] = CONTROL_PLANE_MODULES) -> str:
    digest = hashlib.sha256(" ".join(GO_FLAGS).encode())
    for name in modules:
        for file in ("go.mod", "go.sum"):
            digest.update((MODULES / name / file).read_bytes())
    return digest.hexdigest()


def go_build(module: str, out: Path, packages: list[str], ldflags: str) -> None:
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=readonly -buildvcs=false",
    }
    command = ["go", "build", *GO_FLAGS, "-ldflags", ldflags, "-o", str(out), *packages]
    started = time.monotonic()
    subprocess.run(command, cwd=MODULES / module, env=env, check=True)
    print(f"built {module}: {time.monotonic() - started:.0f}s", file=sys.stderr)


def build(force: bool = False) -> Path:
    """Build every binary into tools_dir() unless the stamp says they are current."""
    out = tools_dir()
    stamp_file = out / ".stamp"
    current = stamp_file.is_file() and stamp_file.read_text() == stamp()
    if not force and current and all((out / binary).is_file() for binary in BINARIES):
        return out
    out.mkdir(parents=True, exist_ok=True)
    version = kubernetes_version()
    go_build(
        "kubernetes",
        out,
        [f"k8s.io/kubernetes/cmd/{command}" for command in KUBERNETES_COMMANDS],
        kubernetes_ldflags(version),
    )
    go_build("etcd", out / "etcd", ["go.etcd.io/etcd/server/v3"], "-s -w")
    jobset = required_version(MODULES / "jobset", "sigs.k8s.io/jobset")
    go_build(
        "jobset",
        out / "jobset-controller",
        ["sigs.k8s.io/jobset"],
        f"-s -w -X 'sigs.k8s.io/jobset/pkg/version.GitVersion={jobset}'",
    )
    stamp_file.write_text(stamp())
    return out


def build_s3_server(force: bool = False) -> Path:
    """Build versitygw unless its stamp says it is current; returns the binary."""
    binary = s3_server_binary()
    stamp_file = binary.parent / ".stamp"
    current = stamp_file.is_file() and stamp_file.read_text() == stamp(("s3",))
    if not force and current and binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    version = s3_server_version()
    go_build(
        "s3",
        binary,
        [f"{S3_SERVER_MODULE}/cmd/versitygw"],
        f"-s -w -X 'main.Version={version}'",
    )
    stamp_file.write_text(stamp(("s3",)))
    return binary


def jobset_source() -> Path:
    """JobSet's module in Go's module cache (its config/ folder holds the manifests)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
    found = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/jobset"],
        cwd=MODULES / "jobset", env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return Path(found.stdout.strip())


def jobset_manifests() -> dict[str, list[dict]]:
    """JobSet's CRDs and webhook configurations as its kustomization renders them
    (config/components): the `jobset-` name prefix and the pod webhooks' objectSelector."""
    import yaml  # the venv's; building needs only the standard library

    config = jobset_source() / "config" / "components"
    crds = [
        yaml.safe_load(path.read_text())
        for path in sorted((config / "crd" / "bases").glob("*.yaml"))
    ]
    webhooks = [
        d for d in yaml.safe_load_all((config / "webhook" / "manifests.yaml").read_text()) if d
    ]
    patches = {
        "MutatingWebhookConfiguration": "mutating-patch.yaml",
        "ValidatingWebhookConfiguration": "validating-patch.yaml",
    }
    for document in webhooks:
        document["metadata"]["name"] = f"jobset-{document['metadata']['name']}"
        for patch in yaml.safe_load(
            (config / "webhook" / "patches" / patches[document["kind"]]).read_text()
        ):
            index = int(patch["path"].rsplit("/", 1)[1])
            document["webhooks"][index] = patch["value"]
    return {"crds": crds, "webhooks": webhooks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build even if the stamp matches")
    args = parser.parse_args()
    started = time.monotonic()
    out = build(force=args.force)
    s3_server = build_s3_server(force=args.force)
    print(f"control plane binaries in {out}, S3 server {s3_server} "
          f"({time.monotonic() - started:.0f}s)", file=sys.stderr)  # fmt: skip
    print(out)


if __name__ == "__main__":
    main()
