"""Subject lists: data.root (HCP, BIDS, flat folder or CSV list) -> the subjects to preprocess.

Where it sits: the head of the data flow for real data; `data.preprocess.build_cache`
preprocesses the subjects `find_subjects` lists, in its order (sorted by id), and splits
them into train and val unless the list fixes the split itself (a CSV `split` column),
keeping a participant's volumes (BIDS sessions and runs) on one side.
"""

import csv
import dataclasses
import os
import re

from slicevae_jax.data.nifti import NIFTI_SUFFIXES
from slicevae_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Subject:
  """One volume to preprocess: id (unique), image path, labels path or None.

  `split` is 'train' or 'val' when the list fixes it (a CSV's split column), else None.
  `group` names the participant when several volumes are one person's (BIDS sessions and
  runs): the split keeps a participant's volumes together. None: the volume is its own.
  """
  id: str
  image: str
  labels: str | None = None
  split: str | None = None
  group: str | None = None


def _strip_nifti(name: str) -> str | None:
  low = name.lower()
  for suffix in NIFTI_SUFFIXES:
    if low.endswith(suffix) and len(name) > len(suffix):
      return name[: -len(suffix)]
  return None


def _hcp_subjects(root: str, hcp_image: str, hcp_labels: str) -> list[Subject]:
  out = []
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    image = os.path.join(folder, hcp_image)
    if not (os.path.isdir(folder) and os.path.isfile(image)):
      continue
    labels = os.path.join(folder, hcp_labels) if hcp_labels else None
    # HCP labels are optional (the default names aparc+aseg, which not every
    # download has): absent files mean an unlabelled subject.
    out.append(Subject(name, image, labels if labels and os.path.isfile(labels) else None))
  return out


def _flat_subjects(root: str, labels_dir: str) -> list[Subject]:
  out, seen = [], {}
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name)
    sid = _strip_nifti(name)
    if sid is None or not os.path.isfile(path):
      continue
    if sid in seen:
      raise DataError(f"{root}: {seen[sid]} and {name} give the same subject id {sid!r}")
    seen[sid] = name
    # With labels_dir set, labels are expected for every subject: the path is kept
    # even if the file is missing, so that subject fails with a clear error.
    labels = os.path.join(labels_dir, name) if labels_dir else None
    out.append(Subject(sid, path, labels))
  if labels_dir and out and not any(os.path.isfile(s.labels) for s in out):
    # Every subject would fail on its own missing label file: say it once, here.
    raise DataError(f"{labels_dir}: no label file matches an image in {root} (expected the "
                    f"image's file name, e.g. {os.path.join(labels_dir, os.path.basename(out[0].image))}); "
                    f"rename the label files or fix data.labels_dir")
  return out


CSV_COLUMNS = ("path", "labels", "split")


def _csv_subjects(csv_path: str) -> list[Subject]:
  """Rows of a CSV list: a header naming `path` and optionally `labels`, `split`.

  Relative paths are taken from the CSV's folder; an empty `labels` cell means no
  labels for that subject; `split` cells, when the column is there, must all be
  'train' or 'val'. The id is the image's file name without its NIfTI extension, or,
  where two rows share a file name (`<subject>/T1w/T1w.nii.gz`), the path as written.
  """
  folder = os.path.dirname(csv_path)
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f, skipinitialspace=True)
      columns = [c.strip() for c in (reader.fieldnames or [])]
      rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{csv_path}: cannot read the subject list ({e})") from e
  if "path" not in columns or set(columns) - set(CSV_COLUMNS):
    raise DataError(f"{csv_path}: the header must name the column 'path' and optionally "
                    f"'labels' and 'split' (found {columns})")
  rows = [(line, row) for line, row in enumerate(rows, start=2)  # line 1: the header
          if any(row.values())]
  names = [os.path.basename(row["path"]) for _, row in rows]
  out, seen = [], {}
  for line, row in rows:
    where = f"{csv_path}, line {line}"
    image = row["path"]
    name = os.path.basename(image)
    sid = _strip_nifti(name if names.count(name) == 1 else image.replace(os.sep, "/"))
    if sid is None:
      raise DataError(f"{where}: path {image!r} is not a .nii or .nii.gz file")
    if sid in seen:
      raise DataError(f"{where}: {image!r} is also on line {seen[sid]}; list each volume once")
    seen[sid] = line
    split = row.get("split") or None
    if "split" in columns and split not in ("train", "val"):
      raise DataError(f"{where}: split is {row.get('split')!r}; write 'train' or 'val'")
    labels = row.get("labels") or None
    out.append(Subject(sid, os.path.join(folder, image),
                       os.path.join(folder, labels) if labels else None, split))
  if not out:
    raise DataError(f"{csv_path}: the subject list has no rows")
  return out


# A BIDS T1w file name: its entities (sub-<label>[_ses-<label>][_acq-...][_run-...]) and suffix.
_BIDS_T1W = re.compile(r"^(sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")
BIDS_PATTERN = "<root>/sub-*/[ses-*/]anat/sub-*_T1w.nii[.gz]"


def _bids_anat_folders(root: str, participant: str) -> list[str]:
  folder = os.path.join(root, participant)
  sessions = sorted(n for n in os.listdir(folder)
                    if n.startswith("ses-") and os.path.isdir(os.path.join(folder, n)))
  return [os.path.join(participant, "anat")] + [
      os.path.join(participant, ses, "anat") for ses in sessions]


def _bids_labels(labels_dir: str, rel_folder: str, entities: str, desc: str) -> str:
  """The derivative segmentation with the T1w's entities: <entities>_[...]_dseg.nii[.gz]."""
  folder = os.path.join(labels_dir, rel_folder)
  names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  found = [n for n in names if n.startswith(entities + "_")
           and re.search(r"_dseg\.nii(\.gz)?$", n)
           and (not desc or f"_desc-{desc}_" in n)]
  if len(found) > 1:
    raise DataError(f"{folder}: {len(found)} segmentations match {entities} ({', '.join(found)}); "
                    f"set data.bids_desc to the desc-<label> of the one to use")
  # None found: the expected name is kept, so the subject fails naming the missing file.
  return os.path.join(folder, found[0] if found else
                      f"{entities}{'_desc-' + desc if desc else ''}_dseg.nii.gz")


def _bids_subjects(root: str, labels_dir: str, desc: str) -> list[Subject]:
  """Every T1w volume of a BIDS dataset: one per participant, session and run.

  The id is the file's entities (`sub-01_ses-2_run-1`); `group` is the participant, so
  the split holds out whole participants. Labels (with `labels_dir`, a derivatives folder
  with the same sub-/ses-/anat tree) are the `*_dseg.nii[.gz]` file carrying the T1w's
  entities, narrowed by `desc` (a `desc-<label>` entity) when there are several.
  """
  out = []
  for participant in sorted(os.listdir(root)):
    if not (participant.startswith("sub-") and os.path.isdir(os.path.join(root, participant))):
      continue
    for rel in _bids_anat_folders(root, participant):
      folder = os.path.join(root, rel)
      if not os.path.isdir(folder):
        continue
      for name in sorted(os.listdir(folder)):
        match = _BIDS_T1W.match(name)
        if match is None or not os.path.isfile(os.path.join(folder, name)):
          continue
        entities = match.group(1)
        labels = _bids_labels(labels_dir, rel, entities, desc) if labels_dir else None
        out.append(Subject(entities, os.path.join(folder, name), labels, group=participant))
  if labels_dir and out and not any(os.path.isfile(s.labels) for s in out):
    raise DataError(f"{labels_dir}: no segmentation matches a T1w volume of {root} (expected "
                    f"e.g. {out[0].labels}: the same sub-/ses-/anat folders, a name starting "
                    f"with the T1w's entities and ending _dseg.nii.gz); fix data.labels_dir")
  return out


def find_subjects(root: str, layout: str = "auto", *,
                  hcp_image: str = "T1w/T1w_acpc_dc_restore_brain.nii.gz",
                  hcp_labels: str = "T1w/aparc+aseg.nii.gz",
                  labels_dir: str = "", bids_desc: str = "") -> list[Subject]:
  """Lists the subjects under `root`, sorted by id.

  Layouts:
    'hcp': `<root>/<subject>/<hcp_image>`; labels `<root>/<subject>/<hcp_labels>`
      when that file exists (hcp_labels '' = no labels).
    'flat': every `*.nii` / `*.nii.gz` file in `root`; id = file name without
      extension; labels `<labels_dir>/<same file name>` when labels_dir is set.
      A subject whose label file is missing is listed anyway and fails at
      preprocessing time with an error naming the missing file (skipped, or
      fatal with data.strict).
    'bids': `<root>/sub-*/[ses-*/]anat/sub-*_T1w.nii[.gz]`, one volume per participant,
      session and run; labels from a derivatives folder `labels_dir` with the same tree
      (see `_bids_subjects`); the split keeps each participant's volumes together.
    'csv': `root` is a CSV file listing `path[,labels][,split]` (see `_csv_subjects`).
    'auto': 'csv' if `root` is a .csv file, else 'hcp' if any subfolder holds
      `hcp_image`, else 'bids' if any `sub-*` folder holds a T1w volume, else 'flat'.
  Raises:
    DataError naming the folder: root (or labels_dir) missing / not a folder,
    no volumes found.
  """
  root = os.path.abspath(os.fspath(root))
  if not os.path.exists(root):
    raise DataError(f"{root}: data folder does not exist (data.root)")
  if layout == "csv" or (layout == "auto" and root.lower().endswith(".csv")):
    if not os.path.isfile(root):
      raise DataError(f"{root}: data.layout 'csv' needs data.root to be a CSV file")
    return _csv_subjects(root)
  if not os.path.isdir(root):
    raise DataError(f"{root}: data.root is not a folder (nor a .csv subject list)")
  if labels_dir:
    labels_dir = os.path.abspath(labels_dir)
    if not os.path.isdir(labels_dir):
      raise DataError(f"{labels_dir}: labels folder does not exist (data.labels_dir)")
  hcp = _hcp_subjects(root, hcp_image, hcp_labels) if layout in ("auto", "hcp") else []
  if hcp:
    return hcp
  if layout == "hcp":
    raise DataError(f"{root}: no volumes found (layout 'hcp': looked for "
                    f"<root>/<subject>/{hcp_image})")
  bids = _bids_subjects(root, labels_dir, bids_desc) if layout in ("auto", "bids") else []
  if bids:
    return bids
  if layout == "bids":
    raise DataError(f"{root}: no volumes found (layout 'bids': looked for {BIDS_PATTERN})")
  flat = _flat_subjects(root, labels_dir)
  if not flat:
    searched = (f"layout 'auto': looked for <root>/<subject>/{hcp_image}, {BIDS_PATTERN} and "
                f"<root>/*.nii, *.nii.gz" if layout == "auto"
                else "layout 'flat': looked for <root>/*.nii, *.nii.gz")
    raise DataError(f"{root}: no volumes found ({searched})")
  return flat
