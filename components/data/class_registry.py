"""The class registry: which arrivals were ingested, which classes and images they brought,
and the fixed role of every image (train, query of a trained class, or unseen class).

A class that arrived with a single image can never form a positive pair: its image is
`pending` (stored and queryable, kept out of training and evaluation) until a later
arrival brings a second image, when the class gets its split like a new class.

Stored as one JSON file beside data/classes so DVC versions both together.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Role = Literal["train", "query", "unseen", "pending"]
ROLES: tuple[Role, ...] = ("train", "query", "unseen", "pending")
SCORED_ROLES: tuple[Role, ...] = ("train", "query", "unseen")  # what training and evaluation may see
Split = Literal["train", "unseen", "pending"]


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
    classes: dict[str, dict] = field(default_factory=dict)  # name -> {"arrival", "split"}, split: Split
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
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh, indent=1, sort_keys=True, ensure_ascii=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:  # a full disk: leave no half-written temporary file behind
            Path(tmp).unlink(missing_ok=True)
            raise

    def records(self, *roles: Role) -> list[ImageRecord]:
        """Images with the given roles (all, `pending` included, when none given), in a stable order.

        The index wants every stored image; training and evaluation ask for their roles by name
        (SCORED_ROLES for a whole gallery), so a pending image reaches neither.
        """
        wanted = set(roles or ROLES)
        return [
            ImageRecord(id=image_id, cls=meta["class"], arrival=meta["arrival"], role=meta["role"])
            for image_id, meta in sorted(self.images.items())
            if meta["role"] in wanted
        ]

    def classes_with_split(self, split: Split) -> list[str]:
        return sorted(name for name, meta in self.classes.items() if meta["split"] == split)
