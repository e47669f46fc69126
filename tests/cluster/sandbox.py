"""A pod's container, set up inside its own network and mount namespaces, then exec'd.

Run as: ip netns exec <pod-netns> python sandbox.py <container.json>   (by kubelet.py)

`ip netns exec` enters the pod's network namespace and a fresh mount namespace (mounts made
here never reach the host). This bind-mounts the pod's volumes, its /etc/hosts and its
termination log over the host's paths, as a container runtime would, then replaces itself
with the container's command. Every source is opened before anything is mounted, so a
volume on /tmp cannot hide the sources of the mounts after it; the project folder (the
stand-in for the image) is mounted back where a volume would hide it.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
CLONE_NEWUTS = 0x04000000

libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    if libc.mount(source.encode(), target.encode(), (fstype or "").encode() or None, flags, None):
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def make_target(target: Path, is_file: bool) -> None:
    """A mount point: an empty file or folder (on the host's filesystem if nothing above it
    is a volume; the kubelet's module doc says so)."""
    if is_file:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()
    else:
        target.mkdir(parents=True, exist_ok=True)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    # The pod's own hostname, in a UTS namespace of its own.
    hostname = spec["hostname"].encode()
    if libc.unshare(CLONE_NEWUTS) or libc.sethostname(hostname, len(hostname)):
        raise OSError(ctypes.get_errno(), "cannot set the pod's hostname")
    image_root = Path(spec["imageRoot"])
    mounts = sorted(spec["mounts"], key=lambda m: len(Path(m["target"]).parts))
    # Hold every source open first: a later mount may cover the path it lives at.
    held = {m["source"]: os.open(m["source"], os.O_PATH) for m in mounts if not m.get("tmpfs")}
    folders = {source: os.path.isdir(source) for source in held}
    image_fd = os.open(image_root, os.O_PATH | os.O_DIRECTORY)
    hidden_image = False
    for m in mounts:
        target = Path(m["target"])
        if image_root.is_relative_to(target):
            hidden_image = True
        if m.get("tmpfs"):
            make_target(target, is_file=False)
            mount("tmpfs", str(target), "tmpfs", 0)
            continue
        source_fd = held[m["source"]]
        make_target(target, is_file=not folders[m["source"]])
        mount(f"/proc/self/fd/{source_fd}", str(target), None, MS_BIND | MS_REC)
        if m.get("readOnly"):
            mount("none", str(target), None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    if hidden_image:
        make_target(image_root, is_file=False)
        mount(f"/proc/self/fd/{image_fd}", str(image_root), None, MS_BIND | MS_REC)
    for fd in [*held.values(), image_fd]:
        os.close(fd)
    os.chdir(spec["workingDir"])
    env = spec["env"]
    os.environ.clear()
    os.environ.update(env)
    os.execvpe(spec["argv"][0], spec["argv"], env)


if __name__ == "__main__":
    main()
