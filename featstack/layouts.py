"""Dataset layouts on disk -> one canonical table (id, path, label, split); nothing downstream knows layouts."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .decode import IMAGE_SUFFIXES, is_image_file
from .errors import FeatstackError

LAYOUTS = ("dog-breed", "cats-dogs", "folders", "manifest")
COLUMNS = ["id", "path", "label", "split"]
CATS_DOGS_NAME = re.compile(r"^(cat|dog)\.\d+$")
TEST_FOLDERS = ("test", "test1")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def _test_folder(data: Path) -> Path | None:
    return next((data / t for t in TEST_FOLDERS if (data / t).is_dir()), None)


def _table(rows: list[tuple[str, Path, str | None, str | None]], source: Path) -> pd.DataFrame:
    if not rows:
        raise FeatstackError(f"{source}: no images found; put the images there or pass another --data")
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["path"] = table["path"].map(lambda p: str(Path(p).resolve()))
    dup = table["id"].duplicated(keep=False)
    if dup.any():
        first = table.loc[dup, "id"].iloc[0]
        raise FeatstackError(f"{source}: duplicate image id {first!r} ({int(dup.sum())} rows share ids); ids must be unique")
    return table


def _test_rows(data: Path, id_of) -> list[tuple[str, Path, None, str]]:
    folder = _test_folder(data)
    return [(id_of(p), p, None, "test") for p in _images_in(folder)] if folder else []


def read_dog_breed(data: Path) -> pd.DataFrame:
    labels_csv = data / "labels.csv"
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
        raise FeatstackError(f"{labels_csv}: row {row}: duplicate id {labels.loc[dup.idxmax(), 'id']!r}; each id must appear once")
    train = data / "train"
    present = {p.stem: p for p in _images_in(train)}
    rows = []
    for i, (image_id, breed) in enumerate(zip(labels["id"], labels["breed"])):
        path = present.get(image_id)
        if path is None:
            raise FeatstackError(
                f"{labels_csv}: row {i + 2}: id {image_id!r} has no image {train / (image_id + '.jpg')}; "
                "restore the image or remove the row")
        if not breed:
            raise FeatstackError(f"{labels_csv}: row {i + 2}: id {image_id!r} has an empty breed")
        rows.append((image_id, path, breed, None))
    unlabelled = len(present) - len(rows)
    if unlabelled:
        print(f"warning: {unlabelled} images in {train} are not in {labels_csv.name} and are left out")
    return _table(rows + _test_rows(data, lambda p: p.stem), data)


def read_cats_dogs(data: Path) -> pd.DataFrame:
    rows = []
    other = 0
    for p in _images_in(data / "train"):
        if CATS_DOGS_NAME.match(p.stem):
            rows.append((p.stem, p, p.stem.split(".")[0], None))
        else:
            other += 1
    if other:
        print(f"warning: {other} images in {data / 'train'} are not named cat.<n> or dog.<n> and are left out")
    return _table(rows + _test_rows(data, lambda p: p.stem), data)


def read_folders(data: Path) -> pd.DataFrame:
    root = data / "Images" if (data / "Images").is_dir() else data  # Stanford Dogs keeps classes under Images/
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in TEST_FOLDERS and not p.name.startswith(".")):
        for img in sorted(q for q in folder.rglob("*") if is_image_file(q)):
            rows.append((img.relative_to(data).as_posix(), img, folder.name, None))
    return _table(rows + _test_rows(data, lambda p: p.relative_to(data).as_posix()), data)


def read_manifest(manifest: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise FeatstackError(f"{manifest}: cannot read it as CSV ({exc})") from None
    if "path" not in table.columns or "label" not in table.columns:
        raise FeatstackError(f"{manifest}: needs columns path,label[,split]; found {','.join(table.columns)}")
    base = manifest.parent
    rows = []
    for i, rec in enumerate(table.to_dict("records")):
        path = Path(rec["path"]) if Path(rec["path"]).is_absolute() else base / rec["path"]
        if not path.is_file():
            raise FeatstackError(f"{manifest}: row {i + 2}: image {rec['path']!r} not found; fix the path or remove the row")
        split = (rec.get("split") or "").strip().lower() or None
        label = rec["label"] or None
        if split not in (None, "train", "holdout", "test"):
            raise FeatstackError(f"{manifest}: row {i + 2}: split {split!r} is not one of train, holdout, test")
        if label is None:
            split = "test"
        elif split == "test":
            label = None
        rows.append((rec["path"], path, label, split))
    return _table(rows, manifest)


def detect_layout(data: Path) -> str:
    if data.is_file() and data.suffix.lower() == ".csv":
        return "manifest"
    if (data / "labels.csv").is_file() and (data / "train").is_dir():
        return "dog-breed"
    train = _images_in(data / "train")
    if train and all(CATS_DOGS_NAME.match(p.stem) for p in train[:50]):
        return "cats-dogs"
    if (data / "manifest.csv").is_file():
        return "manifest"
    root = data / "Images" if (data / "Images").is_dir() else data
    if any(p.is_dir() and p.name not in TEST_FOLDERS and any(is_image_file(q) for q in p.iterdir()) for p in root.iterdir()):
        return "folders"
    raise FeatstackError(
        f"{data}: unknown dataset layout; expected one of: dog-breed (labels.csv + train/), cats-dogs "
        "(train/cat.<n>.jpg, train/dog.<n>.jpg), folders (one folder of images per class), manifest "
        f"(a CSV with path,label[,split]); image types: {', '.join(sorted(IMAGE_SUFFIXES))}")


def read_layout(data: str | Path, layout: str = "auto") -> tuple[pd.DataFrame, str]:
    """The canonical table of a dataset folder, and the layout it was read as."""
    data = Path(data)
    if not data.exists():
        raise FeatstackError(f"--data {data}: no such file or folder")
    if data.is_dir() and not any(data.iterdir()):
        raise FeatstackError(f"--data {data}: the folder is empty; put a dataset there")
    if layout == "auto":
        layout = detect_layout(data)
    elif layout not in LAYOUTS:
        raise FeatstackError(f"--layout {layout}: unknown; choose auto or one of {', '.join(LAYOUTS)}")
    readers = {"dog-breed": read_dog_breed, "cats-dogs": read_cats_dogs, "folders": read_folders}
    if layout == "manifest":
        return read_manifest(data if data.is_file() else data / "manifest.csv"), layout
    return readers[layout](data), layout
