"""The embedder as an MLflow pyfunc model that stands on its own.

`mlflow.pyfunc.load_model(uri).predict(df)` takes a DataFrame with an `image` column of
encoded image bytes (PNG, JPEG, ...) and returns an N x D float32 array of L2-normalised
embeddings. Decoding and preprocessing live inside the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema, TensorSpec

from components.data.transforms import open_rgb
from components.modeling.embedder import Embedder, embed_images, load_embedder, pick_device

IMAGE_COLUMN = "image"
WEIGHTS_ARTIFACT = "embedder"
DEVICE_CONFIG = "device"  # model_config key: auto (CUDA when present), cpu or cuda; train.device when logged
ENTRY_POINT = Path(__file__).with_name("pyfunc_entry.py")  # what MLflow logs and runs on load


class EmbedderModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        device = (context.model_config or {}).get(DEVICE_CONFIG, "auto")
        self.embedder = load_embedder(Path(context.artifacts[WEIGHTS_ARTIFACT])).to(pick_device(device))

    @classmethod
    def around(cls, embedder: Embedder) -> EmbedderModel:
        """The wrapper around an in-memory embedder (what load_context would build)."""
        model = cls()
        model.embedder = embedder
        return model

    def predict(
        self, context: PythonModelContext | None, model_input: pd.DataFrame, params: dict | None = None
    ) -> np.ndarray:
        if IMAGE_COLUMN not in model_input:
            raise ValueError(f"input needs a column {IMAGE_COLUMN!r} of encoded image bytes")
        images = []
        for row, data in enumerate(model_input[IMAGE_COLUMN]):
            try:
                images.append(open_rgb(bytes(data)))
            except Exception as exc:  # any decoder failure is the caller's bad input
                raise ValueError(f"row {row}: not a decodable image ({exc})") from None
        return embed_images(self.embedder, images)


def signature(embedding_dim: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedding_dim))]),
    )
