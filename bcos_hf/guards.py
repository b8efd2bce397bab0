"""Checks at bcos_hf's boundaries with the file system: model references, output folders, file names, JSON.

Every folder bcos_hf writes is built in a staging folder beside its target and renamed into place only when
complete, so a killed or failed run never leaves a half-written folder under the target's name, and never
writes over a folder the user did not ask to replace (or over the checkpoint it reads from).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .modeling.modeling_bcos import INCOMPLETE_MARKER

STAGING_SUFFIX = ".bcos-partial"
"""Suffix of the staging folders (``.<target>.<pid>.<random>.bcos-partial``) that become the target."""

REPLACED_SUFFIX = ".bcos-replaced"
"""Suffix of a replaced target (``--overwrite``) between the two renames; removed right after."""

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
"""What a Hub model id looks like: ``name`` or ``owner/name``."""


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` has the form of a Hub model id (and no ``..``, which only paths use)."""
    return bool(HUB_ID.match(reference)) and ".." not in reference


def resolve_model_reference(reference: str | os.PathLike, what: str = "the model") -> str:
    """A local folder holding ``config.json``, or a Hub id; anything else raises an error that says what to pass.

    Transformers answers a mistyped local path with "Repo id must be in the form ..." or a failed connection to
    the Hub; this says the folder does not exist.
    """
    reference = str(reference)
    path = Path(reference).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"{reference} is a file; {what} must be a folder holding config.json (or a Hub model id)."
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{reference} has no config.json, so it is not a saved model: pass the folder that "
                "save_pretrained wrote (or a Hub model id)."
            )
        return str(path)
    if not is_hub_id(reference):
        raise FileNotFoundError(
            f"There is no folder {reference}, and it is not a Hub model id (owner/name): check the path."
        )
    return reference


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the staging folders of earlier runs into ``target`` whose process has ended (killed runs).

    Returns what was removed. Folders of a run still in progress are left alone.
    """
    removed = []
    for suffix in (STAGING_SUFFIX, REPLACED_SUFFIX):
        for leftover in target.parent.glob(f".{_glob_escape(target.name)}.*{suffix}"):
            pid = leftover.name[len(target.name) + 2 :].split(".", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


def _glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(
    target: str | os.PathLike, overwrite: bool, protected: Sequence[str | os.PathLike] = ()
) -> Path:
    """Refuse a target that would lose data: one holding (or being) a ``protected`` path such as the source
    checkpoint, whatever ``overwrite`` says, or one that exists and is not empty, unless ``overwrite``."""
    target = Path(target).expanduser()
    resolved = target.resolve()
    for path in protected:
        if Path(path).expanduser().exists() and _contains(resolved, Path(path).expanduser().resolve()):
            raise FileExistsError(
                f"The output folder {target} is (or holds) the source {path}: writing there would destroy the "
                "source. Choose another output folder."
            )
    if target.exists() and not target.is_dir():
        if not overwrite:
            raise FileExistsError(f"{target} exists and is a file: choose another output folder, or pass overwrite.")
    elif target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"The output folder {target} exists and is not empty: choose a new folder, or replace it with "
            "--overwrite (Python: overwrite=True). Nothing was written."
        )
    return target


@contextmanager
def atomic_folder(
    target: str | os.PathLike, overwrite: bool = False, protected: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a staging folder beside ``target`` that becomes ``target`` when the block ends without error.

    The staging folder holds ``INCOMPLETE_MARKER`` until the last moment, so loading it says it is an
    interrupted write; on an error it is removed, and leftovers of killed runs are removed on the next run
    into the same target. The checks of ``check_output_folder`` run first.
    """
    target = check_output_folder(target, overwrite, protected)
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.absolute())
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=parent))
    try:
        (staging / INCOMPLETE_MARKER).write_text(
            f"bcos_hf is writing this folder; it becomes {target.name} when complete. A folder still holding "
            "this file is an interrupted write: delete it.\n"
        )
        yield staging
        (staging / INCOMPLETE_MARKER).unlink()
        _move_into_place(staging, target.absolute(), overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``target``; an existing target (empty, or replaced on request) goes first. A target
    that another process filled meanwhile is kept (unless ``overwrite``)."""
    if not target.exists():
        staging.rename(target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        staging.rename(target)
        return
    if not overwrite:
        raise FileExistsError(f"{target} was created by someone else during the conversion: it was kept.")
    replaced = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=REPLACED_SUFFIX, dir=target.parent)
    )
    replaced.rmdir()
    target.rename(replaced)
    staging.rename(target)
    if replaced.is_dir():
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        replaced.unlink(missing_ok=True)


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` made distinct: a repeat gets ``_2``, ``_3``, ... (the first suffix not yet taken)."""
    taken: set[str] = set()
    result = []
    for name in names:
        candidate, number = name, 1
        while candidate in taken:
            number += 1
            candidate = f"{name}_{number}"
        taken.add(candidate)
        result.append(candidate)
    return result


def finite_or_none(value):
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def dump_json(value, indent: int = 2) -> str:
    """Strict JSON (no bare NaN or Infinity, which JSON does not have): non-finite numbers become null."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)
