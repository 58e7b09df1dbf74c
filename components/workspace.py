"""The workspace: where one mnemo installation keeps its state, the URIs that point parts of it
at servers, the masking of the secrets those URIs carry, and mnemo's environment settings
(`Settings`, the one reader of the MNEMO_* variables)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from components.config import Params


@dataclass(frozen=True)
class Workspace:
    """Where one mnemo installation keeps its state; servers replace parts by URI.

    The URIs may carry credentials (`postgresql://user:password@host/db`): whatever mnemo
    prints, logs or returns shows them through `masked` / `redact`, never as they are.
    """

    root: Path
    tracking_uri: str
    lancedb_uri: str

    @property
    def masked_tracking_uri(self) -> str:
        return mask_uri(self.tracking_uri)

    @property
    def masked_lancedb_uri(self) -> str:
        return mask_uri(self.lancedb_uri)

    def redact(self, text: str) -> str:
        """`text` with every secret of the workspace's URIs replaced by ***."""
        return redact(text, self.tracking_uri, self.lancedb_uri)

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def classes_dir(self) -> Path:
        return self.root / "data" / "classes"

    @property
    def catalog(self) -> Path:
        """The catalog's database; its manifests (what DVC versions) are in data/arrivals/."""
        return self.root / "data" / "catalog.sqlite"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def artifact_root(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def mlflow_db(self) -> Path:
        """The embedded MLflow store (tracking and registry) of the workspace."""
        return self.root / "mlflow.db"

    @property
    def embedded_registry(self) -> bool:
        """True when MLflow is the workspace's own SQLite file, not a server or another database."""
        return self.tracking_uri == sqlite_uri(self.mlflow_db)

    @property
    def dvc_outputs(self) -> Path:
        """Where the DVC stages (python -m flows.stages <stage>) write their outputs."""
        return self.root / "dvc"


class Settings(BaseSettings):
    """What the environment says, read when asked (never at import), in one place.

    Secrets (the API key) stay `SecretStr`: printing the settings shows `**********`. An empty
    variable counts as unset.
    """

    model_config = SettingsConfigDict(env_prefix="MNEMO_", env_ignore_empty=True, extra="ignore", frozen=True)

    workspace: Path | None = None  # the state directory (else params paths.workspace)
    lancedb_uri: str | None = None  # a LanceDB URI (s3://...) instead of <workspace>/lancedb
    tracking_uri: str | None = Field(default=None, validation_alias="MLFLOW_TRACKING_URI")
    actor: str | None = None  # who acts, for the promotion log (else the login name)
    api_key: SecretStr | None = None  # the service's bearer key; never in params.yaml
    dask_address: str | None = None  # a Dask scheduler for re-index (else a LocalCluster)
    writer_limit: str | None = None  # a Prefect global concurrency limit every writer also holds
    failpoint: str | None = None  # tests only: the failpoint at which the process kills itself
    serve_params: Path | None = None  # set by `mnemo serve` for its worker processes
    # How long mnemo waits for a SQLite MLflow store another process holds locked, in seconds.
    registry_busy_timeout: float = Field(default=30.0, gt=0)


def settings() -> Settings:
    """The environment's settings as they are now."""
    return Settings()


_SECRET_QUERY_KEYS = re.compile(
    r"(?i)^(password|passwd|pwd|secret|token|access_?key|secret_?key|sig|signature|api_?key)$"
)


def uri_secrets(uri: str) -> set[str]:
    """The secrets a URI carries (raw and percent-decoded): its password, and the values of secret-like query keys."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return set()
    found = [parts.password or ""] + [v for k, v in parse_qsl(parts.query) if _SECRET_QUERY_KEYS.match(k)]
    return {v for f in found for v in (f, unquote(f)) if v}


def redact(text: str, *uris: str) -> str:
    """`text` with every secret of `uris` replaced by ***, longest first."""
    for secret in sorted({s for uri in uris for s in uri_secrets(uri)}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def mask_uri(uri: str) -> str:
    """The URI as it may be shown: `postgresql://user:***@host/db`, secret query values as ***."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact(uri, uri)
    if not uri_secrets(uri):
        return uri  # nothing to hide: left exactly as given (urlunsplit would drop sqlite:////'s empty host)
    netloc = parts.netloc
    if parts.password:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = "&".join(f"{k}={'***' if _SECRET_QUERY_KEYS.match(k) else v}" for k, v in parse_qsl(parts.query))
    return urlunsplit(parts._replace(netloc=netloc, query=query if parts.query else parts.query))


def sqlite_uri(path: Path) -> str:
    """The SQLAlchemy URI of a SQLite file (sqlite:////abs/path for an absolute one)."""
    return f"sqlite:///{path}"


def resolve_workspace(params: Params, override: Path | str | None = None) -> Workspace:
    """Workspace from (in order) the explicit override, MNEMO_WORKSPACE, params.paths.workspace.

    MLFLOW_TRACKING_URI and MNEMO_LANCEDB_URI point the same code at servers; an `s3://bucket/prefix`
    LanceDB URI takes its endpoint, region and credentials from the standard AWS_* variables,
    which LanceDB reads itself (README, "Object storage (S3)").
    """
    env = settings()
    root = Path(override or env.workspace or params.paths.workspace)
    root = root.expanduser().resolve()
    tracking = env.tracking_uri or sqlite_uri(root / "mlflow.db")
    lance = env.lancedb_uri or str(root / "lancedb")
    return Workspace(root=root, tracking_uri=tracking, lancedb_uri=lance)
