"""Local files the harness reads from or writes into places others can write (results roots,
caches, data folders), with no torch and no Ray so every layer can use it.

Reading: :func:`open_regular` opens without blocking (a FIFO or a device never hangs a read),
refuses anything but a regular file and anything over a size bound, so ``/dev/zero`` or a
planted FIFO is a clear error instead of a hang.

Writing: :func:`write_inside` writes a new temp file beside the target and renames it into
place. It never writes through a link: the rename replaces a planted symlink instead of
following it, and a root whose folders are links that leave it is refused, so a copied results
folder cannot make ``harness figures`` overwrite a file elsewhere.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile


class UnsafePathError(ValueError):
    """A path the harness will not read or write: the message names it and the fix."""


def open_regular(path: str, max_bytes: int, what: str = "file"):
    """A binary file object for ``path``, a regular file of at most ``max_bytes`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UnsafePathError(f"cannot read the {what} {path!r}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else \
            f"{st.st_size} bytes, more than the {max_bytes} a {what} may have"
        raise UnsafePathError(f"the {what} {path!r} is {why}; point at the real file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (:func:`open_regular`)."""
    with open_regular(path, max_bytes, what) as f:
        return f.read(max_bytes + 1)


def check_inside(root: str, path: str) -> str:
    """``path`` (inside ``root``) with every existing folder between them checked: a folder that
    is a symlink leading outside ``root`` is refused. Returns the absolute path."""
    root = os.path.abspath(root)
    path = os.path.abspath(path)
    if os.path.commonpath([root, path]) != root:
        raise UnsafePathError(f"{path!r} is outside {root!r}; the harness writes only inside it")
    real_root = os.path.realpath(root)
    folder = os.path.dirname(path)
    while True:
        if os.path.islink(folder):
            target = os.path.realpath(folder)
            if os.path.commonpath([real_root, target]) != real_root:
                raise UnsafePathError(
                    f"{folder!r} is a symlink to {target!r}, outside the results folder "
                    f"{root!r}; the harness never writes through links that leave it. Replace "
                    f"the link with a real folder (or remove it) and run again.")
        if folder == root or len(folder) <= len(root):
            return path
        folder = os.path.dirname(folder)


def write_inside(root: str, path: str, data: bytes | None = None, write=None) -> str:
    """Write ``data`` (or call ``write(binary file)``) to ``path`` inside ``root``: a new temp
    file in the target's folder, fsynced, then renamed over the target, so a symlink or hard
    link planted at ``path`` is replaced, never written through. Returns ``path``."""
    path = check_inside(root, path)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UnsafePathError(f"cannot create the folder {folder!r}: a file of that name is in "
                              f"the way; move it aside and run again") from None
    check_inside(root, path)  # makedirs may have met a link created meanwhile
    return replace_atomic(path, write if write is not None else (lambda fh: fh.write(data)))


def replace_atomic(path: str, write, before_rename=None) -> str:
    """Call ``write(binary file)`` on a new temp file in ``path``'s (existing) folder, fsync it,
    call ``before_rename(temp path)`` if given, then rename it over ``path``: a crash never leaves
    a half file under the final name, and a link planted at ``path`` is replaced, not followed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def prepare_output(root: str, out_dir: str, log=print) -> str:
    """Make ``out_dir`` (inside ``root``) ready for writers that open files by name: its folders
    are checked (:func:`check_inside`), it is created (a file or a read-only folder in the way is
    a clear error), and any symlink directly inside it is removed (the link, never its target)
    so that the writers create regular files instead of writing through it."""
    check_inside(root, os.path.join(out_dir, "x"))
    if os.path.islink(out_dir):
        raise UnsafePathError(f"the output folder {out_dir!r} is a symlink; the harness never "
                              f"writes through links. Replace it with a real folder.")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UnsafePathError(f"cannot use {out_dir!r} as the output folder: a file is in the "
                              f"way; move it aside and run again") from None
    except PermissionError:
        raise UnsafePathError(f"cannot create the output folder {out_dir!r}: permission "
                              f"denied. Pass a writable folder or fix the permissions.") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UnsafePathError(f"the output folder {out_dir!r} is not writable; pass a writable "
                              f"folder or fix its permissions")
    for entry in os.scandir(out_dir):
        if entry.is_symlink():
            os.unlink(entry.path)
            log(f"note: removed the symlink {entry.path} (the harness writes a new file there "
                f"instead of writing through it)")
    return out_dir


NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs",
              "beegfs", "9p", "afs", "panfs", "wekafs", "juicefs", "fuse")


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem that holds ``path`` (Linux ``/proc/mounts``), or None."""
    path, best = os.path.realpath(path), (-1, None)
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return None
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > best[0]:
            best = (len(point), kind)
    return best[1]
