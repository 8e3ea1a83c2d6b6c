"""Dataset layouts on disk -> one canonical table (id, path, label, split); nothing downstream knows layouts."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath

import pandas as pd

from .decode import IMAGE_SUFFIXES
from .errors import FeatstackError

LAYOUTS = ("dog-breed", "cats-dogs", "stanford-dogs", "folders", "manifest")
COLUMNS = ["id", "path", "label", "split"]
CATS_DOGS_NAME = re.compile(r"^(cat|dog)\.\d+$")
WORDNET_FOLDER = re.compile(r"^n\d{8}-(.+)$")  # Stanford Dogs / ImageNet: n02085620-Chihuahua
TEST_FOLDERS = ("test", "test1")
# Folder names that are a split or an image store, never a class guessed by auto-detection (test/ and test1/ are
# read as the test split): test_images, test2019, test-jpg, images, jpeg...
NOT_A_CLASS = re.compile(r"^(test(ing)?([\d_\-. ].*)?|images?|imgs?|jpe?g|png|photos|pictures)$", re.IGNORECASE)
SAMPLE_SUBMISSION = re.compile(r"^sample_?submission", re.IGNORECASE)
STANFORD_LISTS = ("train_list.mat", "test_list.mat")
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
NUMBER_WORDS = {w: k for k, w in enumerate(_UNITS)} | {w: 20 + 10 * k for k, w in enumerate(_TENS)}


def _number_value(name: str) -> float | None:
    """The number a class name spells ("seven", "Twenty-one", "3", "2.5"), or None when it is not one."""
    text = str(name).strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    words = re.split(r"[-_ ]+", text)
    if len(words) == 1 and words[0] in NUMBER_WORDS:
        return float(NUMBER_WORDS[words[0]])
    if len(words) == 2 and words[0] in _TENS and words[1] in _UNITS[1:10]:  # twenty-one ... ninety-nine
        return float(NUMBER_WORDS[words[0]] + NUMBER_WORDS[words[1]])
    return None


def class_order(labels) -> list[str]:
    """The one order of a dataset's classes (dataset.json, CSV columns, charts): by number when every class name is
    a number or a number word (zero, one, ..., nine: the demo's digits), else alphabetical."""
    classes = sorted({str(l) for l in labels if l is not None and not (isinstance(l, float) and l != l)})
    values = [_number_value(c) for c in classes]
    if classes and all(v is not None for v in values):
        return [c for _, c in sorted(zip(values, classes))]
    return classes


def scan_images(data: Path) -> list[str]:
    """Every entry under ``data`` that looks like an image by its name (not a folder), as sorted relative paths.

    Dangling links, unreadable files and pipes are included: they either join the table (and the decoder says
    why they fail) or are reported as left out, never dropped in silence. Linked folders are followed once.
    """
    found, seen = [], set()
    for root, dirs, files in os.walk(data, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        rel = Path(root).relative_to(data)
        found += [(rel / name).as_posix() for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


class Reader:
    """Collects a layout's rows, and the reason for every scanned image the layout does not take."""

    def __init__(self, data: Path, layout: str, files: list[str], source: Path | None = None):
        self.data, self.layout, self.files = data, layout, files
        self.source = source or data  # what messages name: the folder, or the manifest file
        self.rows: list[tuple[str, str, str | None, str | None]] = []
        self.reasons: dict[str, str] = {}

    def add(self, image_id: str, rel: str, label: str | None, split: str | None) -> None:
        self.rows.append((image_id, rel, label, split))

    def leave_out(self, rel: str, reason: str) -> None:
        self.reasons[rel] = reason

    def add_test_folder(self, id_of) -> None:
        """Unlabelled images directly in test/ (or test1/), the first of them that exists."""
        folder = next((t for t in TEST_FOLDERS if (self.data / t).is_dir()), None)
        for rel in self.files:
            parts = PurePosixPath(rel).parts
            if folder and parts[0] == folder:
                if len(parts) == 2:
                    self.add(id_of(rel), rel, None, "test")
                else:
                    self.leave_out(rel, f"in a subfolder of {folder}/ (test images go directly in it)")

    def table(self, where: str) -> pd.DataFrame:
        """The canonical table; every scanned image not taken gets a reason (``where`` says where images go)."""
        if not self.rows:
            raise FeatstackError(f"{self.source}: no images found; put the images there or pass another --data")
        table = pd.DataFrame(self.rows, columns=COLUMNS)
        # Folders are resolved, the file itself is not: a dangling link stays a link the decoder can name.
        table["path"] = [str((self.data / rel).parent.resolve() / PurePosixPath(rel).name) for rel in table["path"]]
        if not any(os.path.exists(p) for p in table["path"]):
            # Not one image to read: every one would be a "file not found" in bad_images.csv and the run would
            # look done. A few missing ones are the decoder's to report; all of them is a wrong path.
            raise FeatstackError(f"{self.source}: none of its {len(table)} images can be opened (first: "
                                 f"{table['path'].iloc[0]}, a broken link or a wrong path); fix the paths or "
                                 "pass another --data")
        dup = table["id"].duplicated(keep=False)
        if dup.any():
            first = table.loc[dup, "id"].iloc[0]
            raise FeatstackError(f"{self.source}: duplicate image id {first!r} ({int(dup.sum())} rows share ids); "
                                 "ids must be unique")
        used = {rel for _, rel, _, _ in self.rows}
        left_out = []
        for rel in self.files:
            if rel in used:
                continue
            reason = self.reasons.get(rel)
            if reason is None:
                hidden = any(part.startswith(".") for part in PurePosixPath(rel).parts[:-1])
                reason = "in a hidden folder" if hidden else f"not part of the {self.layout} layout ({where})"
            left_out.append((rel, reason))
        table.attrs.update(layout=self.layout, left_out=left_out)
        return table


def plain_class_names(folders: list[str], every: bool) -> dict[str, str]:
    """Class folder -> class name without its WordNet id (``n02085620-Chihuahua`` -> ``Chihuahua``).

    With ``every``, names are plain only when every folder has the ``n########-`` form. Two folders whose
    plain names collide keep their folder names, so classes never merge.
    """
    plain = {f: (m.group(1) if (m := WORDNET_FOLDER.match(f)) else f) for f in folders}
    if every and any(p == f for f, p in plain.items()):
        return {f: f for f in folders}
    counts = Counter(plain.values())
    return {f: (p if counts[p] == 1 else f) for f, p in plain.items()}


def _name_classes(table: pd.DataFrame, folder_of_row: list[str | None], every: bool) -> pd.DataFrame:
    folders = sorted({f for f in folder_of_row if f is not None})
    names = plain_class_names(folders, every)
    table["label"] = [names[f] if f is not None else None for f in folder_of_row]
    if any(names[f] != f for f in folders):
        table.attrs["class_folders"] = {names[f]: f for f in folders}
        table.attrs["kept_folder_names"] = sorted(f for f in folders if names[f] == f and WORDNET_FOLDER.match(f))
    return table


def read_dog_breed(data: Path, files: list[str]) -> pd.DataFrame:
    labels_csv = data / "labels.csv"
    if not labels_csv.is_file():
        raise FeatstackError(f"{data}: --layout dog-breed needs labels.csv (columns id,breed) beside train/, and "
                             f"there is none; add it, or leave --layout out: auto-detection is the default "
                             f"(--layout auto){_detected_hint(data, files)}")
    try:
        labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise FeatstackError(f"{labels_csv}: cannot read it as CSV ({exc})") from None
    missing_cols = {"id", "breed"} - set(labels.columns)
    if missing_cols:
        raise FeatstackError(f"{labels_csv}: needs columns id,breed; missing {', '.join(sorted(missing_cols))}")
    dup = labels["id"].duplicated(keep="first")
    if dup.any():
        row = int(dup.idxmax()) + 2  # +1 for the header, +1 for 1-based lines
        raise FeatstackError(f"{labels_csv}: row {row}: duplicate id {labels.loc[dup.idxmax(), 'id']!r}; "
                             "each id must appear once")
    reader = Reader(data, "dog-breed", files)
    present: dict[str, str] = {}
    for rel in files:
        parts = PurePosixPath(rel)
        if len(parts.parts) == 2 and parts.parts[0] == "train":
            if parts.stem in present:
                reader.leave_out(rel, f"same id {parts.stem!r} as {present[parts.stem]}")
            else:
                present[parts.stem] = rel
    train = data / "train"
    labelled = set()
    for i, (image_id, breed) in enumerate(zip(labels["id"], labels["breed"])):
        rel = present.get(image_id)
        if rel is None:
            raise FeatstackError(
                f"{labels_csv}: row {i + 2}: id {image_id!r} has no image {train / (image_id + '.jpg')}; "
                "restore the image or remove the row")
        if not breed:
            raise FeatstackError(f"{labels_csv}: row {i + 2}: id {image_id!r} has an empty breed")
        reader.add(image_id, rel, breed, None)
        labelled.add(image_id)
    for stem, rel in present.items():
        if stem not in labelled:
            reader.leave_out(rel, f"not in {labels_csv.name}")
    reader.add_test_folder(lambda rel: PurePosixPath(rel).stem)
    return reader.table("images go in train/ and test/")


def _detected_hint(data: Path, files: list[str]) -> str:
    """", which reads this folder as X" when auto-detection knows the folder, else nothing."""
    try:
        return f", which would read this folder as the {detect_layout(data, files)} layout"
    except FeatstackError:
        return ""


def read_cats_dogs(data: Path, files: list[str]) -> pd.DataFrame:
    reader = Reader(data, "cats-dogs", files)
    for rel in files:
        parts = PurePosixPath(rel)
        if len(parts.parts) == 2 and parts.parts[0] == "train":
            if CATS_DOGS_NAME.match(parts.stem):
                reader.add(parts.stem, rel, parts.stem.split(".")[0], None)
            else:
                reader.leave_out(rel, "name is not cat.<n> or dog.<n>")
    reader.add_test_folder(lambda rel: PurePosixPath(rel).stem)
    return reader.table("images go in train/ and test/ or test1/")


def _class_root(data: Path, files: list[str]) -> Path:
    """Where the class folders are: Images/ (Stanford Dogs), train/ when it holds only class folders and no loose
    images (train/<class>/*.png beside test/*.png, as plant-seedlings), else the data folder itself."""
    if (data / "Images").is_dir():
        return data / "Images"
    in_train = [f.count("/") for f in files if f.startswith("train/")]
    if in_train and min(in_train) >= 2:
        return data / "train"
    return data


def read_folders(data: Path, files: list[str]) -> pd.DataFrame:
    root = _class_root(data, files)
    prefix = root.relative_to(data).parts
    reader = Reader(data, "folders", files)
    folder_of_row = []
    for rel in files:
        parts = PurePosixPath(rel).parts
        inner = parts[len(prefix):]
        if parts[:len(prefix)] != prefix or not inner or inner[0] in TEST_FOLDERS:
            continue
        if len(inner) == 1:
            reader.leave_out(rel, "not inside a class folder")
        elif not inner[0].startswith("."):
            reader.add(rel, rel, inner[0], None)
            folder_of_row.append(inner[0])
    reader.add_test_folder(lambda rel: rel)
    table = reader.table(f"class folders go in {root.name}/" if prefix else "one folder per class")
    return _name_classes(table, folder_of_row + [None] * (len(table) - len(folder_of_row)), every=True)


def _stanford_lists(data: Path) -> Path | None:
    """The folder holding the official split lists: lists/ (as the issue's tree) or the data folder (lists.tar)."""
    return next((d for d in (data / "lists", data) if all((d / n).is_file() for n in STANFORD_LISTS)), None)


def _read_file_list(mat: Path) -> list[str]:
    from scipy.io import loadmat
    try:
        content = loadmat(mat)
    except Exception as exc:
        raise FeatstackError(f"{mat}: cannot read it as a MATLAB file ({str(exc)[:200]}); restore it from the "
                             "official lists.tar") from None
    if "file_list" not in content:
        raise FeatstackError(f"{mat}: no file_list in it; restore it from the official lists.tar")
    # A MATLAB cell array: an (N, 1) object array whose elements are 1-element string arrays.
    entries = [str(x.ravel()[0]) if hasattr(x, "ravel") else str(x) for x in content["file_list"].ravel()]
    labels = content.get("labels")
    if labels is not None and labels.size != len(entries):
        raise FeatstackError(f"{mat}: {labels.size} labels for {len(entries)} files; "
                             "restore it from the official lists.tar")
    return entries


def read_stanford_dogs(data: Path, files: list[str]) -> pd.DataFrame:
    lists = _stanford_lists(data)
    if lists is None:
        raise FeatstackError(f"{data}: --layout stanford-dogs needs Images/ and lists/train_list.mat, "
                             "lists/test_list.mat (the official lists.tar)")
    available = set(files)
    reader = Reader(data, "stanford-dogs", files)
    folder_of_row = []
    for mat_name, split in zip(STANFORD_LISTS, ("train", "holdout")):
        mat = lists / mat_name
        for k, entry in enumerate(_read_file_list(mat)):
            rel = f"Images/{entry}"
            if rel not in available:
                raise FeatstackError(f"{mat}: entry {k + 1}: {entry} has no image {data / rel}; restore the image "
                                     "(the official images.tar has it)")
            reader.add(rel, rel, None, split)
            folder_of_row.append(PurePosixPath(entry).parts[0])
    for rel in files:
        if rel.startswith("Images/"):
            reader.leave_out(rel, f"in neither {STANFORD_LISTS[0]} nor {STANFORD_LISTS[1]}")
    reader.add_test_folder(lambda rel: rel)
    table = reader.table("images go in Images/<breed>/")
    table = _name_classes(table, folder_of_row + [None] * (len(table) - len(folder_of_row)), every=False)
    table.attrs["holdout_source"] = f"the official test list, {(lists / STANFORD_LISTS[1]).relative_to(data)}"
    return table


def read_manifest(manifest: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise FeatstackError(f"{manifest}: cannot read it as CSV ({exc})") from None
    if "path" not in table.columns or "label" not in table.columns:
        raise FeatstackError(f"{manifest}: needs columns path,label[,split]; found {','.join(table.columns)}")
    base = manifest.parent
    # A manifest names its images; other files beside it are not part of it, so there is nothing to scan.
    reader = Reader(base, "manifest", [], source=manifest)
    for i, rec in enumerate(table.to_dict("records")):
        path = Path(rec["path"]) if Path(rec["path"]).is_absolute() else base / rec["path"]
        if not os.path.lexists(path):
            raise FeatstackError(f"{manifest}: row {i + 2}: image {rec['path']!r} not found; "
                                 "fix the path or remove the row")
        split = (rec.get("split") or "").strip().lower() or None
        label = rec["label"] or None
        if split not in (None, "train", "holdout", "test"):
            raise FeatstackError(f"{manifest}: row {i + 2}: split {split!r} is not one of train, holdout, test")
        if label is None:
            split = "test"
        elif split == "test":
            label = None
        # The path as written: the reader joins it to the manifest's folder once (an absolute path stays itself).
        reader.add(rec["path"], rec["path"], label, split)
    table = reader.table("")
    if table["split"].eq("holdout").any():
        table.attrs["holdout_source"] = f"the split column of {manifest.name}"
    return table


def _refuse_guessed_classes(data: Path, root: Path, classes: list[str]) -> None:
    """Auto-detection reads folders as classes only where nothing says otherwise: a CSV beside them most likely
    holds the labels (cassava: train.csv + train_images/ + test_images/), and a folder named like a split or an
    image store (test_images/, test2019/, images/, jpeg/) is not a class. Each is one line naming the flag to pass."""
    where = f" in {root.relative_to(data).as_posix()}/" if root != data else ""
    shown = ", ".join(f"{c}/" for c in classes[:4]) + (f" ... ({len(classes)} folders)" if len(classes) > 4 else "")
    csvs = sorted(p.name for p in data.glob("*") if p.suffix.lower() == ".csv" and p.is_file()
                  and not SAMPLE_SUBMISSION.match(p.stem))
    if csvs:
        raise FeatstackError(
            f"{data}: {csvs[0]} lies beside the image folders {shown}{where}, so their names are not taken as the "
            f"classes; if {csvs[0]} holds the labels, write a manifest.csv (path,label[,split]) from it and pass "
            f"--data that manifest (--layout manifest); if the folders are the classes, pass --layout folders")
    named = [c for c in classes if NOT_A_CLASS.match(c)]
    if named:
        raise FeatstackError(
            f"{data}: the folder {named[0]}/{where} is named like a test split or an image store, not a class; "
            f"put unlabelled test images directly in test/, or give the labels in a manifest.csv (path,label[,split]) "
            f"and pass --layout manifest; if {named[0]}/ really is a class, pass --layout folders")


def detect_layout(data: Path, files: list[str]) -> str:
    """The layout of a dataset folder, judged from all of its image files, not a sample of names."""
    if data.is_file() and data.suffix.lower() == ".csv":
        return "manifest"
    if (data / "Images").is_dir() and _stanford_lists(data) is not None:
        return "stanford-dogs"
    if (data / "labels.csv").is_file() and (data / "train").is_dir():
        return "dog-breed"
    train = [PurePosixPath(f) for f in files if f.startswith("train/") and f.count("/") == 1]
    named = sum(bool(CATS_DOGS_NAME.match(p.stem)) for p in train)
    if train and named * 2 > len(train):  # most of train/ is cat.<n> / dog.<n>; the rest is reported, not a class
        return "cats-dogs"
    if (data / "manifest.csv").is_file():
        return "manifest"
    root = _class_root(data, files)
    prefix = root.relative_to(data).as_posix() + "/" if root != data else ""
    classes = set()
    for f in files:
        inner = PurePosixPath(f[len(prefix):]).parts if f.startswith(prefix) else ()
        if len(inner) >= 2 and inner[0] not in TEST_FOLDERS and not inner[0].startswith("."):
            classes.add(inner[0])
    if classes:
        _refuse_guessed_classes(data, root, sorted(classes))
        return "folders"
    raise FeatstackError(
        f"{data}: unknown dataset layout; expected one of: dog-breed (labels.csv + train/), cats-dogs "
        "(train/cat.<n>.jpg, train/dog.<n>.jpg), stanford-dogs (Images/ + lists/*.mat), folders (one folder of "
        "images per class), manifest (a CSV with path,label[,split]); "
        f"image types: {', '.join(sorted(IMAGE_SUFFIXES))}")


def read_layout(data: str | Path, layout: str = "auto") -> tuple[pd.DataFrame, str]:
    """The canonical table of a dataset folder, and the layout it was read as.

    ``table.attrs`` carries what the detection summary shows: ``layout``, ``detected``, ``left_out`` (relative
    path, reason), ``class_folders`` (class name -> original folder, when WordNet ids were dropped) and
    ``holdout_source`` (when the data itself fixes the holdout).
    """
    data = Path(data)
    if not data.exists():
        raise FeatstackError(f"--data {data}: no such file or folder")
    if data.is_dir() and not any(data.iterdir()):
        raise FeatstackError(f"--data {data}: the folder is empty; put a dataset there")
    if layout != "auto" and layout not in LAYOUTS:
        raise FeatstackError(f"--layout {layout}: unknown; choose auto or one of {', '.join(LAYOUTS)}")
    files = scan_images(data) if data.is_dir() else []
    detected = layout == "auto"
    if detected:
        layout = detect_layout(data, files)
    if layout == "manifest":
        if data.is_dir() and not (data / "manifest.csv").is_file():
            raise FeatstackError(f"{data}: --layout manifest needs manifest.csv (columns path,label[,split]) in the "
                                 "folder, or --data naming the manifest CSV itself, and there is none; add it, or "
                                 f"leave --layout out: auto-detection is the default (--layout auto)"
                                 f"{_detected_hint(data, files)}")
        table = read_manifest(data if data.is_file() else data / "manifest.csv")
    else:
        readers = {"dog-breed": read_dog_breed, "cats-dogs": read_cats_dogs, "stanford-dogs": read_stanford_dogs,
                   "folders": read_folders}
        table = readers[layout](data, files)
    table.attrs["detected"] = detected
    classes = table["label"].dropna().unique()
    if len(classes) == 1:
        left = table.attrs["left_out"]
        hint = f"; {len(left)} file(s) left out, e.g. {left[0][0]} ({left[0][1]})" if left else ""
        raise FeatstackError(
            f"{data}: read as the {layout} layout, every labelled image has the one class {classes[0]!r}{hint}. "
            "A classifier needs at least 2 classes: check the folder, or name the layout with --layout")
    return table, layout


def describe(table: pd.DataFrame, holdout: float | None = None, examples: int = 3) -> str:
    """What was detected, for the user to check before the long work starts: layout, classes, split sizes,
    and every left-out file's reason (a few examples per reason)."""
    attrs = table.attrs
    how = "detected" if attrs.get("detected") else "as asked with --layout"
    lines = [f"layout: {attrs.get('layout', '?')} ({how})"]
    classes = class_order(table["label"].dropna())
    shown = ", ".join(classes[:5]) + (f", ... ({len(classes) - 5} more)" if len(classes) > 5 else "")
    lines.append(f"classes: {len(classes)}" + (f" ({shown})" if classes else ""))
    renamed = [(folder, name) for name, folder in attrs.get("class_folders", {}).items() if name != folder]
    if renamed:
        lines.append(f"class names: WordNet ids dropped from the folder names (e.g. {renamed[0][0]} -> "
                     f"{renamed[0][1]}); the folder names are kept in dataset.json")
    if attrs.get("kept_folder_names"):
        lines.append(f"  kept the full folder name where plain names collide: {', '.join(attrs['kept_folder_names'])}")
    labelled = table["label"].notna()
    free = int((labelled & table["split"].isna()).sum())
    parts = []
    for split in ("train", "holdout"):
        n = int((labelled & table["split"].eq(split)).sum())
        if n or (split == "holdout" and attrs.get("holdout_source")):
            parts.append(f"{n} {split}" + (f" ({attrs['holdout_source']})" if split == "holdout" else ""))
    if free and holdout is None:
        parts.append(f"{free} labelled (train, less the stratified --holdout share)")
    elif free and not 0 <= holdout < 1:  # refused before any split is made; nan has no share to show
        parts.append(f"{free} labelled (--holdout {holdout} is refused)")
    elif free and holdout == 0:
        parts.append(f"{free} labelled, all train (--holdout 0)")
    elif free:
        parts.append(f"{free} labelled: about {round(free * holdout)} holdout (--holdout {holdout}, stratified), "
                     "the rest train")
    parts.append(f"{int((~labelled).sum())} test (unlabelled)")
    lines.append("images: " + ", ".join(parts))
    if not free and attrs.get("holdout_source"):
        lines.append("  the holdout is fixed by the data: --holdout applies to nothing here")
    left = attrs.get("left_out", [])
    lines.append(f"left out: {len(left)} file{'s' if len(left) != 1 else ''} named like images, with the reason"
                 if left else "left out: none")
    by_reason: dict[str, list[str]] = {}
    for rel, reason in left:
        by_reason.setdefault(reason, []).append(rel)
    for reason, rels in by_reason.items():
        more = f" and {len(rels) - examples} more" if len(rels) > examples else ""
        lines.append(f"  {len(rels)} {reason}: {', '.join(rels[:examples])}{more}")
    return "\n".join(lines)
