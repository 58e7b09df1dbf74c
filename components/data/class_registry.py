"""The class registry: which arrivals were ingested, which classes and images they brought,
and the fixed role of every image (train, query of a trained class, or unseen class).

Stored as one JSON file beside data/classes so DVC versions both together.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Role = Literal["train", "query", "unseen"]
ROLES: tuple[Role, ...] = ("train", "query", "unseen")


@dataclass(frozen=True)
class ImageRecord:
    id: str  # "<class>/<content-hash>.<ext>", relative to data/classes
    cls: str
    arrival: str
    role: Role


@dataclass
class ClassRegistry:
    path: Path
    arrivals: dict[str, dict] = field(default_factory=dict)
    classes: dict[str, dict] = field(default_factory=dict)  # name -> {"arrival", "split"}
    images: dict[str, dict] = field(default_factory=dict)  # id -> {"class", "arrival", "role"}

    @classmethod
    def load(cls, path: Path) -> ClassRegistry:
        if not path.exists():
            return cls(path=path)
        try:
            raw = json.loads(path.read_text())
            return cls(path=path, arrivals=raw["arrivals"], classes=raw["classes"], images=raw["images"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: class registry is unreadable ({exc})") from None

    def save(self) -> None:
        """Write atomically: readers see the old file or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"arrivals": self.arrivals, "classes": self.classes, "images": self.images}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def records(self, *roles: Role) -> list[ImageRecord]:
        """Images with the given roles (all when none given), in a stable order."""
        wanted = set(roles or ROLES)
        return [
            ImageRecord(id=image_id, cls=meta["class"], arrival=meta["arrival"], role=meta["role"])
            for image_id, meta in sorted(self.images.items())
            if meta["role"] in wanted
        ]

    def classes_with_split(self, split: Literal["train", "unseen"]) -> list[str]:
        return sorted(name for name, meta in self.classes.items() if meta["split"] == split)
