"""The model repository: one folder per model with model.json, the ONNX graph
and the tokenizer. Loads what the settings ask for and hands models out by name."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument, ModelLoadError, ModelNotFound, quote
from .onnx_model import ArenaMode, OnnxModel
from .roles import load_or_compute
from .tokenizer import TextTokenizer
from .types import LoadedModel, ModelMetadata

log = logging.getLogger(__name__)

METADATA_FILE = "model.json"
# What a model may be called in requests and on disk.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_model_name(name: str) -> None:
    """InvalidArgument unless `name` is a model name (which can never be a path)."""
    if not MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument("model_name", f"{quote(name)} is not a model name: 1 to 64 of A-Z a-z 0-9 _ . -, "
                              "starting with a letter or digit")


def inside(folder: Path, name: str, what: str) -> Path:
    """folder/name, resolved, when it stays inside `folder` (links included); else ModelLoadError."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ModelLoadError(f"{folder / name}: the {what} resolves outside the model folder ({folder.name}); "
                             "every file a model uses must be inside its own folder")
    return path
# Called with (model name, loaded?) after a model is loaded or unloaded while serving,
# on whichever thread did it (load_one runs in a worker thread).
Listener = Callable[[str, bool], None]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_shapes(onnx_path: Path, meta: ModelMetadata, shapes: dict[str, list[int | str | None]]) -> None:
    """The per-layer outputs model.json names have the shapes it promises (where the graph fixes
    a dimension): hidden states [batch, seq, hidden_size], queries and keys [batch, num_heads,
    seq, head_dim]. Else ModelLoadError: a wrong name or head_dim would be an INTERNAL error on
    every query_key call, or a wrong response size estimate."""
    expected: list[tuple[str, str, list[int | None]]] = [
        *(("hidden_states_outputs", name, [None, None, meta.hidden_size]) for name in meta.hidden_states_outputs),
        *(("query_outputs", name, [None, meta.num_heads, None, meta.head_dim]) for name in meta.query_outputs),
        *(("key_outputs", name, [None, meta.num_heads, None, meta.head_dim]) for name in meta.key_outputs),
    ]
    for field_name, name, want in expected:
        got = shapes.get(name, [])
        if len(got) != len(want) or any(w is not None and isinstance(g, int) and g != w
                                        for g, w in zip(got, want, strict=True)):
            shown = ", ".join("*" if w is None else str(w) for w in want)
            raise ModelLoadError(f"{onnx_path}: output {name!r} ({field_name} of {METADATA_FILE}) has shape {got}; "
                                 f"model.json promises [{shown}] (num_heads, head_dim, hidden_size); "
                                 "re-export the model")


def load_model(folder: Path, intra_op_threads: int = 0, verify_checksum: bool = True,
               instances: int = 1, memory_arena: ArenaMode = "shrink") -> LoadedModel:
    """Load one model folder; raises ModelLoadError with the reason."""
    metadata = ModelMetadata.from_file(inside(folder, METADATA_FILE, "model metadata"))
    onnx_path = inside(folder, metadata.onnx_file, "onnx_file of model.json")
    if not onnx_path.is_file():
        raise ModelLoadError(f"{onnx_path}: missing ONNX file; re-export the model (make model)")
    if verify_checksum and sha256_file(onnx_path) != metadata.sha256:
        raise ModelLoadError(f"{onnx_path}: sha256 does not match {METADATA_FILE}; re-export the model")
    tokenizer = TextTokenizer(inside(folder, metadata.tokenizer_file, "tokenizer_file of model.json"), metadata)
    if metadata.word_start_prefix is None and tokenizer.word_start is not None:  # model.json predates the field
        metadata = dataclasses.replace(metadata, word_start_prefix=tokenizer.word_start)
    runtime = OnnxModel(onnx_path, metadata.inputs, [*metadata.outputs, *metadata.extra_outputs],
                        intra_op_threads=intra_op_threads,
                        memory_arena=memory_arena,
                        instances=instances)
    check_output_shapes(onnx_path, metadata, runtime.output_shapes)
    roles = load_or_compute(folder, runtime, tokenizer, metadata)
    log.info("loaded model %s (%d layers x %d heads) from %s", metadata.name, metadata.num_layers,
             metadata.num_heads, folder)
    return LoadedModel(metadata, tokenizer, runtime, folder, roles)


@dataclass(frozen=True)
class LoadOptions:
    intra_op_threads: int = 0
    verify_checksums: bool = True
    instances: int = 1
    memory_arena: ArenaMode = "shrink"


@dataclass(frozen=True)
class IndexEntry:
    name: str
    state: str  # READY or UNAVAILABLE
    reason: str = ""


class ModelRepository:
    """The model folders under `root`; the loaded ones by name. Models can be
    loaded and unloaded while serving (RepositoryModelLoad/Unload)."""

    def __init__(self, root: Path, models: dict[str, LoadedModel], default_model: str,
                 options: LoadOptions | None = None) -> None:
        self.root = root
        self._models = models
        self.default_model = default_model
        self.options = options or LoadOptions()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(name, loaded)` after every load_one/unload (health follows
        the default model this way); returns a function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _changed(self, name: str, loaded: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(name, loaded)
            except Exception:  # a listener's bug must not turn a good load into a failed call
                log.exception("repository listener failed for %s", name)

    @classmethod
    def load(cls, root: Path, names: list[str], default_model: str, intra_op_threads: int = 0,
             verify_checksums: bool = True, instances: int = 1,
             memory_arena: ArenaMode = "shrink") -> ModelRepository:
        options = LoadOptions(intra_op_threads, verify_checksums, instances, memory_arena)
        if not root.is_dir():
            raise ModelLoadError(f"model repository {root} does not exist; export a model first (make model)")
        available = cls._folders(root)
        wanted = names or list(available)
        missing = [n for n in wanted if n not in available]
        if missing:
            raise ModelLoadError(f"models {missing} not in {root} (found: {sorted(available)}); check --models")
        models = {name: cls._load_folder(available[name], options) for name in wanted}
        if not models:
            raise ModelLoadError(f"no models in {root}; export one first (make model)")
        if default_model not in models:
            raise ModelLoadError(f"default model {default_model!r} is not loaded (loaded: {sorted(models)}); "
                                 "check --default-model and --models")
        return cls(root, models, default_model, options)

    @staticmethod
    def _folders(root: Path) -> dict[str, Path]:
        """Model folders by name: sub-folders with a model.json whose name is a model name and
        which resolve inside the repository (a link to a folder elsewhere is not a model)."""
        top = root.resolve()
        found = {}
        for p in sorted(root.iterdir()):
            if not (p / METADATA_FILE).is_file() or not MODEL_NAME.fullmatch(p.name):
                continue
            if not p.resolve().is_relative_to(top):
                log.warning("%s links outside the model repository; not served", p)
                continue
            found[p.name] = p
        return found

    @staticmethod
    def _load_folder(folder: Path, options: LoadOptions) -> LoadedModel:
        model = load_model(folder, options.intra_op_threads, options.verify_checksums, options.instances,
                           options.memory_arena)
        if model.name != folder.name:
            raise ModelLoadError(f"{folder}: model.json names the model {model.name!r}; the folder must carry "
                                 "the same name")
        return model

    def get(self, name: str) -> LoadedModel:
        """The model called `name` ('' for the default); raises ModelNotFound."""
        model = self._models.get(name or self.default_model)
        if model is None:
            raise ModelNotFound(name or self.default_model, list(self._models))
        return model

    def names(self) -> list[str]:
        return sorted(self._models)

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models[n] for n in self.names())

    def index(self) -> list[IndexEntry]:
        """Every model folder, loaded or not."""
        folders = self._folders(self.root) if self.root.is_dir() else {}
        names = sorted(set(folders) | set(self._models))
        return [IndexEntry(n, "READY") if n in self._models else IndexEntry(n, "UNAVAILABLE", "unloaded")
                for n in names]

    def load_one(self, name: str) -> LoadedModel:
        """Load (or reload) the folder `name`; blocking (call it off the event loop).
        The previous instance, if any, stays in service until the new one is ready."""
        folder = self._folders(self.root).get(name) if self.root.is_dir() else None
        if folder is None:
            raise ModelNotFound(name, list(self._folders(self.root)) if self.root.is_dir() else [])
        model = self._load_folder(folder, self.options)
        self._models[name] = model
        self._changed(name, True)
        return model

    def unload(self, name: str) -> LoadedModel:
        model = self._models.pop(name, None)
        if model is None:
            raise ModelNotFound(name, list(self._models))
        self._changed(name, False)
        return model
