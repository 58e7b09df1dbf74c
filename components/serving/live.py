"""The live pair: the champion's model and its table, resolved together and swapped as one.

Readers call `LiveIndex.current()` once per request and use that pair throughout, so a
promotion or rollback landing mid-request never mixes one version's model with another's
table. A swap replaces the pair in one assignment; whoever still holds the previous pair
finishes on it (its table is among the retained ones, see index.cleanup_tables).

A pair is proved readable where it is opened (every data file of its table, its model's
artifacts) and wherever it reads (LivePair's methods): what is damaged raises DamagedPair,
one line naming it, which the service answers with a 503 and the CLI with `error: ...`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from PIL import Image

from components.config import IndexParams, RegistryParams, Runtime, ServeParams
from components.modeling.embedder import Embedder
from components.modeling.runtime import Forward, make_forward
from components.registry.mlflow_registry import CHALLENGER, CHAMPION, ModelRegistry, ModelVersionInfo
from components.vectors.graph import ServingGraph
from components.vectors.search import AsyncLoop, Hit, TableReader
from components.vectors.tables import TableDamaged, authorship_problem, check_readable, connect, open_table
from components.workspace import Workspace

log = logging.getLogger(__name__)

GRAPHS_KEPT = 2  # the serving pair's graph and the one before it: ~0.8 GB per million rows each


class NoChampionError(LookupError):
    """No version carries the champion alias yet: there is nothing to answer with."""


class DamagedPair(RuntimeError):
    """The champion's table or model cannot answer (missing, a file cut short, artifacts gone, rows
    written by another model): the message names what is damaged."""


class LivePairMismatch(DamagedPair):
    """The champion's table was written by another version's model, or carries no mark saying whose:
    serving it could mix embeddings."""


@dataclass(frozen=True)
class LivePair:
    """One champion version, its model and its opened table: everything a query needs, immutable."""

    version: str
    table_name: str
    model: Embedder
    table: TableReader
    since: datetime  # when this reader switched to the pair (UTC)
    forward: Forward  # the model's forward as serve.runtime runs it (ONNX Runtime or PyTorch)
    graph: ServingGraph | None = None  # the table's rows in memory (serve.search: graph); None: LanceDB searches

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.forward(images)

    def query(self, images: Sequence[Image.Image], k: int) -> list[list[Hit]]:
        """The k nearest stored images for each RGB image, by this pair's model in this pair's table."""
        return self.nearest(self.embed(images), k)

    def nearest(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """The k nearest stored images for each vector, in this pair's graph or table."""
        if self.graph is not None:
            return self.graph.search(vectors, k)
        with self._reading():
            return self.table.search(vectors, k)

    async def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """`nearest`, awaitable from any event loop: the graph answers in well under a millisecond,
        on the caller's loop; the table is searched on its own loop."""
        if self.graph is not None:
            return self.graph.search(vectors, k)
        with self._reading():
            return await self.table.search_async(vectors, k)

    def rows(self) -> int:
        with self._reading():
            return self.table.count_rows()

    def older_rows(self) -> int:
        """Rows of the table still embedded by an older, compatible model (a backfill re-embeds them)."""
        with self._reading():
            return self.table.older_rows(self.version)

    def row(self, image_id: str) -> dict[str, Any] | None:
        """The table's row of one stored image (TableReader.row); None when the table lacks it."""
        with self._reading():
            return self.table.row(image_id)

    def row_at(self, offset: int) -> dict[str, Any]:
        """The table's row at a position in storage order (0 <= offset < rows())."""
        with self._reading():
            return self.table.row_at(offset)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except TableDamaged as exc:  # a file cut short or gone since the pair was opened
            raise DamagedPair(f"champion v{self.version}: {exc}") from exc


class LiveIndex:
    """Holds the current LivePair; re-resolves the champion alias on demand or every `refresh_seconds`.

    Loaded models and opened tables are cached per version, so swapping back (a rollback)
    costs an alias lookup, not a model load; the background refresh also loads the
    challenger's model ahead of its promotion.

    With `graph` (serve params whose `search` is graph), every pair carries a ServingGraph of
    its table, built before the pair goes live (the previous pair answers meanwhile); each
    refresh adds the rows catch-ups appended, so they are found within refresh_seconds, as
    LanceDB's reader finds them. The serving graph and the one before it (the likely rollback
    target) stay in memory; a challenger's graph is not built ahead (memory: one more graph).
    """

    def __init__(
        self,
        ws: Workspace,
        registry: RegistryParams,
        index: IndexParams,
        *,
        refresh_seconds: float,
        runtime: Runtime = "torch",
        graph: ServeParams | None = None,
        models_kept: int = 2,
    ) -> None:
        self.ws = ws
        self.index = index
        self.refresh_seconds = refresh_seconds
        self.runtime = runtime
        self.models_kept = models_kept  # serve.models_kept
        self._graph_params = graph if graph is not None and graph.search == "graph" else None
        self._graphs: OrderedDict[str, ServingGraph] = OrderedDict()
        self._registry = ModelRegistry(ws, registry)
        self._loop: AsyncLoop | None = None
        self._pair: LivePair | None = None
        self._models: OrderedDict[str, Forward] = OrderedDict()
        self._tables: dict[str, TableReader] = {}
        self._aliases: dict[str, str] = {}
        self._challenger: tuple[tuple[str, str], LivePair] | None = None  # (version, table), its pair
        self._resolving = threading.Lock()  # one resolver at a time; readers never wait on it
        self.damage: str | None = None  # why the champion could not be opened at the last refresh
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def registry(self) -> ModelRegistry:
        return self._registry

    @property
    def pair(self) -> LivePair | None:
        """The pair readers get now, without resolving anything (None before the first champion)."""
        return self._pair

    def current(self) -> LivePair:
        """The pair to answer one request with; resolved first when there is none yet."""
        pair = self._pair or self.refresh()
        if pair is None:
            raise NoChampionError(f"no champion model in {self.ws.masked_tracking_uri}; run `mnemo retrain` first")
        return pair

    def refresh(self) -> LivePair | None:
        """Resolve champion -> version -> table now; swap in a new pair when the alias moved."""
        with self._resolving:
            # One cheap call while nothing moved (this runs every refresh_seconds in every replica).
            self._aliases = self._registry.aliases()
            version = self._aliases.get(CHAMPION)
            current = self._pair
            if version is None:
                return current  # an alias never removed in normal operation: keep answering
            if current is not None and current.version == version:
                if current.graph is not None:
                    current.graph.catch_up()  # rows catch-ups appended since the last refresh
                return current  # a version's table is named after it: nothing else can have moved
            champion = self._registry.get(version, with_metrics=False)
            if not champion.table:
                return current
            if current is not None and (current.version, current.table_name) == (champion.version, champion.table):
                return current
            try:
                pair = self._open(champion.version, champion.table)
            except DamagedPair as exc:
                self.damage = str(exc)
                raise
            self.damage = None
            self._pair = pair  # the swap: one assignment; in-flight readers keep the pair they hold
            log.info("live pair: v%s with table %s", pair.version, pair.table_name)
            return pair

    def challenger_version(self) -> tuple[ModelVersionInfo | None, str]:
        """The version a promotion would bring in: the `challenger` alias's when it is not the champion
        and has a table, else the newest other version with a table; (None, why) when there is none.
        Registry reads only: nothing is opened or loaded."""
        champion = self.current()
        named = self._registry.aliases().get(CHALLENGER)
        found = self._registry.get(named, with_metrics=False) if named and named != champion.version else None
        if found is None or not found.table:
            others = [v for v in self._registry.versions() if v.version != champion.version and v.table]
            found = others[-1] if others else None
        if found is None or not found.table:
            return None, f"no challenger: no version but the champion v{champion.version} has a table"
        return found, ""

    def challenger(self) -> tuple[LivePair | None, str]:
        """The challenger's pair (challenger_version), opened as the champion's is (proved readable, its
        model loaded), cached while it stays the challenger; (None, why) when there is none."""
        found, why = self.challenger_version()
        if found is None or not found.table:
            return None, why
        key = (found.version, found.table)
        if self._challenger is None or self._challenger[0] != key:
            with self._resolving:
                self._challenger = (key, self._open(found.version, found.table, graph=False))
        return self._challenger[1], ""

    def _open(self, version: str, name: str, *, graph: bool = True) -> LivePair:
        """The champion's pair (its version, its table's name), or DamagedPair naming what cannot
        answer: the table missing or a data file unreadable (tables.check_readable: each file's
        footer and first page, not every row), its rows written by another model, its model's
        artifacts gone from the model store."""
        try:
            table = self._table(name)
            check_readable(open_table(connect(self.ws), self.ws, name))
            problem = authorship_problem(name, table.schema(), version)
        except (FileNotFoundError, TableDamaged) as exc:
            raise DamagedPair(f"champion v{version}: {exc}") from exc
        if problem is not None:
            raise LivePairMismatch(f"champion v{version}: {problem}")
        try:
            forward = self._model(version)
        except (MlflowException, OSError) as exc:
            if isinstance(exc, MlflowException) and exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # the registry itself failing (busy, away) is no damage to the pair
            raise DamagedPair(f"champion v{version}'s model cannot be loaded, its artifacts are gone: {exc}") from exc
        return LivePair(
            version=version,
            table_name=name,
            model=forward.model,
            table=table,
            since=datetime.now(UTC),
            forward=forward,
            graph=self._graph(name) if graph else None,
        )

    def _model(self, version: str) -> Forward:
        """The version's model, loaded once and ready to run as serve.runtime says."""
        if version in self._models:
            self._models.move_to_end(version)
        else:
            model = self._registry.load_embedder(version).eval()
            self._models[version] = make_forward(model, self.runtime, version=version)
            while len(self._models) > self.models_kept:  # the live one and the latest before it
                self._models.popitem(last=False)
        return self._models[version]

    def _graph(self, table: str) -> ServingGraph | None:
        """The table's serving graph, caught up with its rows (built on first use); None without graphs."""
        if self._graph_params is None:
            return None
        if table in self._graphs:
            self._graphs.move_to_end(table)
            self._graphs[table].catch_up()
        else:
            self._graphs[table] = ServingGraph.build(self.ws, table, self._graph_params, self.index)
            while len(self._graphs) > GRAPHS_KEPT:
                self._graphs.popitem(last=False)
        return self._graphs[table]

    def _table(self, name: str) -> TableReader:
        if name not in self._tables:
            if self._loop is None:
                self._loop = AsyncLoop()
            # catch-ups by other processes become visible within refresh_seconds
            self._tables[name] = TableReader.open(
                self.ws, name, self._loop, self.index, refresh_seconds=self.refresh_seconds
            )
        return self._tables[name]

    def start(self) -> None:
        """Refresh in a background thread every refresh_seconds until stop()."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_forever, name="mnemo-live-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.refresh_seconds))
            self._thread = None

    def warm(self) -> None:
        """Load the challenger's model ahead of its promotion, so the swap to it costs no model load."""
        challenger = self._aliases.get(CHALLENGER)
        if challenger is None or challenger in self._models:
            return
        with self._resolving:
            self._model(challenger)
            if self._pair is not None and self._pair.version in self._models:  # the serving one stays newest
                self._models.move_to_end(self._pair.version)

    def _refresh_forever(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            damage = self.damage
            try:
                self.refresh()
                self.warm()
            except DamagedPair as exc:  # one line, once per new damage: it is in every answer already
                if str(exc) != damage:
                    log.warning("live pair damaged: %s", exc)
            except Exception:  # the registry or the store may be briefly away: keep the pair, retry
                log.exception("live pair refresh failed; still serving v%s", getattr(self._pair, "version", None))
