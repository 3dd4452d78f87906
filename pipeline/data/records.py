"""What a user holds, as a list of records: an image folder or a CSV manifest.

- ``folder``: ``root/<class_name>/**/*.{png,jpg,jpeg,tif,tiff,dcm,nii,nii.gz}``; classes are
  the sub-folder names in sorted order (or ``data.class_names``, which must name the same
  folders). Hidden files (``.DS_Store``) are ignored. With ``data.dicom.series`` every folder
  holding ``.dcm`` files is one record, a volume, rather than each file an image.
- ``csv``: columns ``path`` and ``label``, optional ``patient_id``, ``split`` and the
  ``data.group_column``; paths are relative to the manifest's folder and may not leave it;
  labels are class names or integer indices; with ``data.dicom.series`` a path may name a
  series folder. A multi-label manifest (CheXpert's layout) has no ``label`` column but one
  column per finding, named by ``data.class_names``: 1 present, 0 absent, -1 or empty not
  assessed.

Every problem is collected, and reported at once by :func:`fail` as one error naming the
first 10 offending entries and their count.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from pipeline.core.dataset import SPLITS
from pipeline.core.errors import PipelineError
from pipeline.data.dicom import is_dicom
from pipeline.data.images import SUPPORTED, is_supported
from pipeline.data.labels import UNKNOWN


@dataclasses.dataclass(frozen=True)
class Record:
    path: Path
    label: int | np.ndarray  # class index; multi-label: 1/0/-1 per finding
    patient: str | None = None  # raw id; prepare pseudonymises it before anything is saved
    split: str | None = None
    group: str | None = None


def fail(source: str | Path, problem: str, items: list[str]) -> None:
    """Raise one PipelineError listing the first 10 of ``items`` and their count (if any)."""
    if items:
        shown = "; ".join(items[:10]) + (f"; … ({len(items) - 10} more)" if len(items) > 10 else "")
        raise PipelineError(f"{source}: {problem}: {len(items)} file(s): {shown}")


def scan_folder(root: Path, class_names: tuple[str, ...], on_error: str, series: bool = False,
                subset: bool = False) -> tuple[list[Record], list[str], list[str]]:
    """Records, class names, and the files skipped because their type is not supported.
    ``subset``: the folders may be some of ``class_names`` (an external site need not hold every
    class); labels are always positions in ``class_names``."""
    if not root.is_dir():
        raise PipelineError(f"{root}: image folder not found")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(class_names) or folders
    if (not set(folders) <= set(names) or not folders) if subset else sorted(names) != folders:
        raise PipelineError(f"{root}: class folders {folders} do not match data.class_names {list(class_names)}")
    if len(names) < 2:
        raise PipelineError(f"{root}: found {len(names)} class folder(s) {names}; at least 2 are needed")
    records, unsupported, empty = [], [], []
    for label, name in enumerate(names):
        if name not in folders:
            continue
        files = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if series:  # each folder of .dcm files is one item
            files = sorted({p.parent if is_dicom(p) else p for p in files})
        kept = []
        for p in files:  # series folders, and the files prepare reads
            if p.is_dir() or is_supported(p.name):
                kept.append(p)
            else:
                unsupported.append(str(p.relative_to(root)))
        if not kept:
            empty.append(name + "/")
        records += [Record(path=p, label=label) for p in kept]
    fail(root, "empty class folder(s), no image in", empty)
    if on_error != "skip":
        fail(root, f"not an image (supported: {', '.join(SUPPORTED)}; data.on_error: skip ignores them)", unsupported)
    return records, names, unsupported


def read_manifest(path: Path, class_names: tuple[str, ...], group_column: str | None,
                  series: bool = False) -> tuple[list[Record], list[str]]:
    """Records and class names from a CSV manifest; every path checked before any image is read."""
    if not path.is_file():
        raise PipelineError(f"{path}: manifest not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = list(reader)
    # Multi-label: no label column, one column per finding named by data.class_names.
    findings = "label" not in columns and bool(class_names) and all(name in columns for name in class_names)
    required = ["path"] + ([] if findings else ["label"]) + ([group_column] if group_column else [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {missing} (has: {columns}); a multi-label manifest has a "
                            "column per finding, named by data.class_names, instead of label")
    if not rows:
        raise PipelineError(f"{path}: manifest has no rows")
    base = path.parent.resolve()
    names = list(class_names) if findings else _class_names([r["label"].strip() for r in rows], class_names, path)
    records, escaping, absent, unknown, seen, duplicates, bad_split = [], [], [], [], set(), [], []
    for line, row in enumerate(rows, start=2):
        rel = row["path"].strip()
        target = (base / rel).resolve()
        where = f"line {line}: {rel}"
        if not target.is_relative_to(base):
            escaping.append(where)
            continue
        if not (target.is_file() or series and target.is_dir()):
            absent.append(where)
            continue
        if target in seen:
            duplicates.append(where)
        seen.add(target)
        if findings:
            index = _finding_row([row[name] for name in names])
            if index is None:
                unknown.append(f"line {line}: findings {[row[name] for name in names]}")
                continue
        else:
            index = _label_index(row["label"].strip(), names)
            if index is None:
                unknown.append(f"line {line}: label '{row['label'].strip()}'")
                continue
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            bad_split.append(f"line {line}: split '{split}'")
        records.append(Record(path=target, label=index, patient=(row.get("patient_id") or "").strip() or None,
                              split=split, group=(row.get(group_column) or "").strip() or None if group_column else None))
    fail(path, "path leaves the manifest's folder", escaping)
    fail(path, "file does not exist", absent)
    fail(path, "duplicate path", duplicates)
    fail(path, "finding values must be 1, 0, -1 or empty (not assessed)" if findings
         else f"label not in the class list {names}", unknown)
    fail(path, f"split must be one of {SPLITS}", bad_split)
    given = [r.split is not None for r in records]
    if any(given) and not all(given):
        raise PipelineError(f"{path}: the split column is filled for {sum(given)} of {len(given)} rows; fill all or none")
    return records, names


def _class_names(labels: list[str], class_names: tuple[str, ...], source: Path) -> list[str]:
    if class_names:
        return list(class_names)
    if all(label.lstrip("-").isdigit() for label in labels):
        return [str(i) for i in range(max(int(label) for label in labels) + 1)]
    return sorted(set(labels))


# A finding column's cells: present, absent, or not assessed (CheXpert's -1 "uncertain" and its
# blank "not mentioned" both count as unknown, left out of the loss and of every metric).
FINDING_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": UNKNOWN, "-1.0": UNKNOWN, "": UNKNOWN}


def _finding_row(cells: list[str]) -> np.ndarray | None:
    values = [FINDING_VALUES.get((cell or "").strip()) for cell in cells]
    return None if any(v is None for v in values) else np.array(values, dtype=np.int64)


def _label_index(label: str, names: list[str]) -> int | None:
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < len(names):
        return int(label)
    return None
