"""Every on-disk location featstack reads or writes, derived from one place."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FEATURES_DIR = Path("features")
MODELS_DIR = Path("models")
SUBMISSIONS_DIR = Path("submissions")
DEMO_DATA_DIR = Path("data") / "demo"
DEMO_NAME = "demo"


@dataclass(frozen=True)
class DatasetPaths:
    """Files of one dataset's feature store: ``<features-dir>/<name>/``."""

    root: Path

    @classmethod
    def of(cls, features_dir: str | Path, name: str) -> DatasetPaths:
        return cls(Path(features_dir) / name)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def split_csv(self) -> Path:
        return self.root / "split.csv"

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def bad_images_csv(self) -> Path:
        return self.root / "bad_images.csv"

    @property
    def photo_stats_csv(self) -> Path:
        return self.root / "photo_stats.csv"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def entry_file(self, entry: str) -> Path:
        return self.root / f"{entry}.h5"

    def entry_shards(self, entry: str) -> Path:
        return self.root / ".shards" / entry

    def entry_files(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*.h5"))


@dataclass(frozen=True)
class RunPaths:
    """Files of one stacker run: ``<models-dir>/<run-id>/``."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    config_json = property(lambda self: self.root / "config.json")
    model_joblib = property(lambda self: self.root / "model.joblib")
    oof_csv = property(lambda self: self.root / "oof_predictions.csv")
    holdout_csv = property(lambda self: self.root / "holdout_predictions.csv")
    test_csv = property(lambda self: self.root / "test_predictions.csv")
    report_json = property(lambda self: self.root / "report.json")
    report_md = property(lambda self: self.root / "report.md")
    confusion_png = property(lambda self: self.root / "confusion.png")
    audit_dir = property(lambda self: self.root / "audit")


@dataclass(frozen=True)
class AuditPaths:
    """Files of one run's data audit: ``<run>/audit/``."""

    root: Path

    label_issues_csv = property(lambda self: self.root / "label_issues.csv")
    duplicates_csv = property(lambda self: self.root / "duplicates.csv")
    outliers_csv = property(lambda self: self.root / "outliers.csv")
    audit_md = property(lambda self: self.root / "audit.md")
    image_sizes_png = property(lambda self: self.root / "image_sizes.png")
    class_balance_png = property(lambda self: self.root / "class_balance.png")
    label_issues_png = property(lambda self: self.root / "label_issues.png")
    duplicates_png = property(lambda self: self.root / "duplicates.png")


def safe_name(text: str) -> str:
    """A file-name-safe rendering of a backbone or dataset name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"
