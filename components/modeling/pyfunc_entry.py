"""Entry point MLflow executes when it loads a logged embedder ("models from code").

Logging a file instead of a pickled object means loading a model runs only this code,
never deserialised bytes. Do not import this module anywhere else.
"""

from mlflow.models import set_model

from components.modeling.pyfunc import EmbedderModel

set_model(EmbedderModel())
