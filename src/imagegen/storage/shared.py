"""Does the output folder look shared by every node of a cluster? A start-up heuristic (docs/scale-out.md).

In a cluster the workers write images and the API replicas serve them, so SD_OUTPUT_DIR must be one
folder every node mounts. From inside one machine that cannot be proven, but it can be guessed from
the filesystem holding the folder (Linux: /proc/self/mountinfo):
- a network or FUSE filesystem (NFS, SMB, CephFS, GlusterFS, a bucket through FUSE...): shared;
- a folder on the root filesystem (of the host, or of a container: its overlay): local to this node,
  which is what a forgotten volume looks like, so it is said loudly;
- anything else (its own mount: a Docker volume or bind mount, a dedicated disk): may be shared (a
  volume shared by the containers of one host is), said once at info level.
Without /proc (macOS), a folder on the same device as / counts as the root filesystem.
The replicas also check for real that they see each worker's probe file (engine/distributed/).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "9p",
        "virtiofs",
        "afs",
        "ocfs2",
        "gfs2",
        "orangefs",
        "davfs",
        "efs",
    }
)


@dataclass(frozen=True)
class Sharing:
    #: True: looks shared; False: looks local to this node; None: cannot tell.
    shared: bool | None
    mount_point: str
    fstype: str

    def message(self, path: Path, name: str = "SD_OUTPUT_DIR") -> str:
        if self.shared:
            return (
                f"{name}={path} is on a {self.fstype} filesystem ({self.mount_point}): shared by the nodes mounting it"
            )
        if self.shared is False:
            return (
                f"{name}={path} is on the root filesystem of this machine or container: it looks local to this "
                "node. In a cluster every node (API replicas and workers) must use one shared folder (a network "
                "filesystem or a shared volume), or images stored by a worker are 404 on the replicas"
            )
        return (
            f"{name}={path} is on its own mount ({self.mount_point}, {self.fstype}): make sure every node of the "
            "cluster mounts the same storage there"
        )


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_of(path: Path, mountinfo: str | None = None) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding `path`, from /proc/self/mountinfo."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, right.split()[0])
    return best


def output_sharing(path: Path, mountinfo: str | None = None) -> Sharing:
    found = mount_of(path, mountinfo)
    if found is None:
        try:
            same = os.stat(path).st_dev == os.stat("/").st_dev
        except OSError:
            return Sharing(None, "?", "?")
        return Sharing(False if same else None, "/" if same else "?", "?")
    point, fstype = found
    # FUSE: a bucket, sshfs, JuiceFS... but not fuseblk (a local NTFS disk) nor a rootless container's overlay.
    if fstype in NETWORK_FILESYSTEMS or (fstype.startswith("fuse.") and "overlay" not in fstype):
        return Sharing(True, point, fstype)
    if point == "/":
        return Sharing(False, point, fstype)
    return Sharing(None, point, fstype)
