"""Where a run-time adapter path may point.

With `lora_roots` set, an adapter folder must lie inside one of them after every symlink is
resolved, and so must the adapter files in it that are links; relative paths are taken
relative to each root in turn. Hub ids (`org/name`) are
fetched only when `lora_allow_hub` is on. A folder read again later (its host copy was dropped,
or a tensor-parallel worker reads it for an upload) is checked again first
(`recheck_adapter_folder`). Blocking (filesystem, maybe network): call
these from a worker thread.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from runtime.adapters.peft_format import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, AdapterError

_FORBIDDEN = ("/proc", "/sys", "/dev")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_forbidden(real: str) -> bool:
    return any(_inside(real, f) for f in _FORBIDDEN)


def _is_hub_id(path: str) -> bool:
    return _HUB_ID_RE.fullmatch(path) is not None and ".." not in path


@dataclass(frozen=True)
class AdapterFolder:
    """An adapter's real local folder, and the lora_roots it was checked against (empty: none,
    as for an operator's startup adapter or a hub snapshot): what a re-read repeats."""

    real: str
    roots: tuple[str, ...]


def resolve_adapter_path(path: str, roots: tuple[str, ...], allow_hub: bool) -> str:
    """The real local folder for adapter `path`, or AdapterError saying why it is refused.

    roots: folders the adapter must lie in (empty: any local folder). A string that is not a
    local folder is a hub id, fetched with huggingface_hub only when `allow_hub`.
    """
    return resolve_adapter_folder(path, roots, allow_hub).real


def resolve_adapter_folder(path: str, roots: tuple[str, ...], allow_hub: bool) -> AdapterFolder:
    """`resolve_adapter_path`, with the roots the folder was checked against."""
    if not path:
        raise AdapterError("lora_path: must be a non-empty path")
    if "\x00" in path:
        raise AdapterError("lora_path: must not contain a NUL character")
    if roots:
        real = _resolve_under_roots(path, roots)
        if real is not None:
            _check_files(path, real, [os.path.realpath(r) for r in roots])
            return AdapterFolder(real, roots)
    elif os.path.isdir(path):
        real = os.path.realpath(path)
        if _is_forbidden(real):
            raise AdapterError(f"lora_path: {path!r} points into a system folder")
        _check_files(path, real, [])
        return AdapterFolder(real, ())
    if not _is_hub_id(path):
        where = f"inside lora_roots {list(roots)}" if roots else "a local folder"
        raise AdapterError(f"lora_path: {path!r} is not {where}")
    if not allow_hub:
        raise AdapterError(
            f"lora_path: {path!r} is not a local adapter folder, and hub ids are refused "
            "(start the server with --lora-allow-hub to fetch them)"
        )
    return AdapterFolder(_download(path), ())


def recheck_adapter_folder(folder: AdapterFolder) -> None:
    """The checks the first load made of `folder`, made again before it is read again (its
    host copy was dropped; on a tensor-parallel worker, at every upload): whoever can write
    inside a root could otherwise swap the folder, or a file in it, for a link after that
    load, and have any file read.

    It is the folder the first load checked that is read again, never the path it was asked
    for resolved afresh: that would follow whatever links lie along the path now, to another
    folder than the one loaded (and fetch a hub id from the network again). A folder whose
    real path is no longer itself (a link, or a folder moved away and a link put in its
    place, somewhere along it) is refused; its files are checked as at the first load, and a
    folder checked against no roots is still refused the system folders. (A file swapped
    between this check and the read has another stat signature than the first load's read:
    the manager's re-read and a worker's read compare it.)"""
    real = os.path.realpath(folder.real)
    if real != folder.real:
        raise AdapterError(f"lora_path: {folder.real!r} is no longer the folder that was "
                           f"loaded (it now leads to {real!r})")
    if _is_forbidden(real):
        raise AdapterError(f"lora_path: {real!r} points into a system folder")
    real_roots = [os.path.realpath(r) for r in folder.roots]
    if real_roots and not any(_inside(real, r) for r in real_roots):
        raise AdapterError(f"lora_path: {real!r} escapes lora_roots {list(folder.roots)}")
    _check_files(real, real, real_roots)


def _check_files(path: str, folder: str, real_roots: list[str]) -> None:
    """Refuse adapter files in `folder` that are links to files outside `real_roots` (when
    given) or into a system folder: the folder alone being inside the roots would let whoever
    can write there make the server read any file it can."""
    for name in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE):
        file = os.path.join(folder, name)
        if not os.path.islink(file):
            continue
        real = os.path.realpath(file)
        if _is_forbidden(real):
            raise AdapterError(f"lora_path: {path!r}: {name} points into a system folder")
        if real_roots and not any(_inside(real, r) for r in real_roots):
            raise AdapterError(f"lora_path: {path!r}: {name} links outside lora_roots")


def _resolve_under_roots(path: str, roots: tuple[str, ...]) -> str | None:
    """The real folder for `path` inside a root; None when `path` is no local path at all."""
    real_roots = [os.path.realpath(r) for r in roots]
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in real_roots]
    parts = path.replace("\\", "/").split("/")
    for cand in candidates:
        real = os.path.realpath(cand)
        if _is_forbidden(real):
            raise AdapterError(f"lora_path: {path!r} points into a system folder")
        if not any(_inside(real, r) for r in real_roots):
            if os.path.isabs(path) or ".." in parts or os.path.lexists(cand):
                raise AdapterError(f"lora_path: {path!r} escapes lora_roots {list(roots)}")
            continue
        if os.path.isdir(real):
            return real
    if os.path.isabs(path) or ".." in parts:
        raise AdapterError(f"lora_path: {path!r} is not an adapter folder inside lora_roots")
    return None


def _download(repo_id: str) -> str:
    """The local snapshot of hub repository `repo_id`, with only an adapter's files: a repo
    may hold anything else (a whole model, checkpoints), which would all be downloaded."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(repo_id=repo_id,
                                     allow_patterns=[CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: one clear error
        raise AdapterError(f"lora_path: cannot fetch hub adapter {repo_id!r}: {e}") from None
    return os.path.realpath(snapshot)  # real, as a local folder's: a re-read expects it


def resolve_on_demand(name: str, roots: tuple[str, ...]) -> str | None:
    """The folder `<root>/<name>` holding an adapter config, for on-demand loading of an
    unknown adapter name; None when no root has one. `name` must be a plain folder name."""
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        return None
    if not name.isprintable():  # a NUL (which os.path refuses) or other control character
        return None
    for root in roots:
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(real_root, name))
        if _inside(real, real_root) and os.path.isfile(os.path.join(real, CONFIG_FILE)):
            return real
    return None
