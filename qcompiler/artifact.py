"""The artifact folder on disk: writing it safely, deciding what may be replaced, and checking
what is read back.

Writing: files go to a staging folder beside the destination, are fsynced, and the folder
takes the destination's place in one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``;
two renames where the file system lacks it), so the path always holds a complete artifact.
Only an empty folder or an artifact whose manifest lists exactly the files it holds may be
replaced: a folder that merely contains a ``manifest.json`` is someone else's. Staging
folders left by a killed process are removed by the next save to the same place.

Reading: the manifest names plain files inside the folder (no paths, links or devices), every
file present is listed, every listed file matches its sha256. The artifact's *digest* is the
sha256 of ``manifest.json``; since the manifest carries every file's hash, pinning the digest
pins the whole artifact (``load(dir, expect_digest=...)``). Checksums are integrity, not trust:
loading an artifact runs its native code."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, QCompilerError
from .files import as_umask_allows, fsync_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 8 << 30  # no artifact file is larger; a bigger one is not ours
_STAGING = "qcompiler-staging"
_OLD = "qcompiler-old"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_of(manifest_bytes: bytes) -> str:
    return "sha256:" + sha256_bytes(manifest_bytes)


def artifact_digest(directory: str | os.PathLike) -> str:
    """The digest that pins an artifact: ``sha256:`` and the hash of its manifest."""
    return digest_of(_read_regular(Path(directory) / MANIFEST))


# ---- writing --------------------------------------------------------------------------------------
def write(directory: str | os.PathLike, fill: Callable[[Path], dict[str, Any]]) -> str:
    """Create the artifact at ``directory``: ``fill(staging)`` writes the files into the staging
    folder and returns the manifest (without its ``files``); returns the artifact's digest."""
    directory = Path(directory)
    if directory.name in ("", ".", ".."):
        raise QCompilerError(f"{directory}: name a new folder for the artifact, not '{directory}'")
    parent = directory.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    refusal = why_not_replaceable(directory)
    if refusal:
        raise QCompilerError(f"{directory}: {refusal}; refusing to replace it (choose another output folder)")
    _remove_stale(parent, directory.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.{_STAGING}-{os.getpid()}-", dir=parent))
    try:
        manifest = fill(staging)
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        (staging / MANIFEST).write_bytes(manifest_bytes)
        _finish(staging)
        refusal = why_not_replaceable(directory)  # the path may have changed while we built
        if refusal:
            raise QCompilerError(f"{directory}: {refusal}; refusing to replace it")
        _swap_in(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return digest_of(manifest_bytes)


def why_not_replaceable(directory: Path) -> str | None:
    """None when ``directory`` is absent, an empty folder, or a qcompiler artifact holding exactly
    the files its manifest lists; otherwise why it must be left alone."""
    if not os.path.lexists(directory):
        return None
    if directory.is_symlink() or not directory.is_dir():
        return "exists and is not a folder"
    entries = {p.name for p in directory.iterdir()}
    if not entries:
        return None
    if MANIFEST not in entries:
        return "exists, is not empty and is not a qcompiler artifact"
    try:
        manifest = parse_manifest(_read_regular(directory / MANIFEST), directory / MANIFEST)
    except ModelLoadError:
        return "holds a manifest.json that is not a qcompiler manifest"
    extra = entries - set(manifest["files"]) - {MANIFEST}
    if extra:
        return f"holds files the artifact's manifest does not list ({', '.join(sorted(extra)[:3])})"
    return None


def _finish(staging: Path) -> None:
    """Permissions as the umask says (mkdtemp makes 0700), and everything on disk."""
    as_umask_allows(staging)
    for path in staging.iterdir():
        as_umask_allows(path, executable=path.suffix == ".so")
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(staging)


def _swap_in(staging: Path, directory: Path) -> None:
    if not os.path.lexists(directory):
        os.rename(staging, directory)
    elif _exchange(staging, directory):
        shutil.rmtree(staging)  # it now holds the old artifact
    else:  # no atomic exchange here: two renames, the old one kept until the new one is in place
        old = directory.with_name(f".{directory.name}.{_OLD}-{os.getpid()}")
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(directory.absolute().parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale(parent: Path, name: str) -> None:
    """Staging and old folders that a killed save to ``parent/name`` left behind."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:{_STAGING}|{_OLD})-(\d+)(?:-.*)?$")
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- reading --------------------------------------------------------------------------------------
def parse_manifest(data: bytes, where: Path) -> dict[str, Any]:
    """The manifest, its format and file list checked: plain file names only."""
    try:
        manifest = json.loads(data)
        files, target = manifest["files"], manifest["target"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{where}: corrupt manifest ({type(e).__name__}: {e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{where}: artifact format {manifest.get('format_version')!r} is not {FORMAT_VERSION}")
    if not isinstance(files, dict) or not isinstance(target, str):
        raise ModelLoadError(f"{where}: corrupt manifest (files must map names to sha256 digests)")
    for name, digest in files.items():
        if not _plain_name(name) or name == MANIFEST:
            raise ModelLoadError(f"{where}: file name {name!r} is not a plain name inside the artifact")
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ModelLoadError(f"{where}: {name}: {digest!r} is not a sha256 digest")
    return manifest


def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not name.startswith("."))


def read_checked(directory: Path, expect_digest: str | None = None) -> tuple[dict[str, Any], dict[str, bytes], str]:
    """The manifest, the bytes of every file, each checked (see the module docstring), and the
    artifact's digest.
    Files are read once, into memory, and used from there: what was checked is what is used."""
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: not a qcompiler artifact (no such folder)")
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise ModelLoadError(f"{directory}: not a qcompiler artifact (no manifest.json)")
    manifest_bytes = _read_regular(manifest_path)
    got = digest_of(manifest_bytes)
    if expect_digest is not None and expect_digest.removeprefix("sha256:") != got.removeprefix("sha256:"):
        raise ModelLoadError(f"{directory}: digest {got} is not the expected {expect_digest}: "
                                 f"not the artifact you pinned")
    manifest = parse_manifest(manifest_bytes, manifest_path)
    present = {p.name for p in directory.iterdir()} - {MANIFEST}
    unlisted = present - set(manifest["files"])
    if unlisted:
        raise ModelLoadError(f"{directory}: holds files its manifest does not list ({', '.join(sorted(unlisted))})")
    contents = {}
    for name, digest in manifest["files"].items():
        path = directory / name
        if not os.path.lexists(path):
            raise ModelLoadError(f"{path}: missing from the artifact")
        data = _read_regular(path)
        if sha256_bytes(data) != digest:
            raise ModelLoadError(f"{path}: checksum mismatch (the file changed after the artifact was written)")
        contents[name] = data
    return manifest, contents, got


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes; links, devices, pipes and oversized files are refused unread."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing from the artifact") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{path}: not a regular file (a link, device or folder): refused")
    if info.st_size > MAX_FILE_BYTES:
        raise ModelLoadError(f"{path}: {info.st_size} bytes, larger than any artifact file: refused")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()
