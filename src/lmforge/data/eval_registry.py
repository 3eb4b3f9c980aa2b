"""The registry of evaluation sets that training data is decontaminated against.

Every held-out set and task the project evaluates on is registered here, by name, with
its items; each item is identified by its content hash and each set by a hash over its
items, so a manifest records exactly which versions of which eval sets the training data
was checked against. Three ways in:

* code: ``register_eval_set("task/my-cloze", loader, role="task")`` at import time of the
  module that defines the task (the eval layer; it sits above ``data`` and calls down);
* config: ``decontamination.eval_sets`` in a DataConfig names files read like sources;
* the preparation itself: its own held-out split is registered as ``heldout/<source>``
  (see ``decontamination.heldout_split``), so no training document shares a 13-gram with
  a held-out document, not just no identical document.

Registration is per process: whatever prepares data (the CLI) must import the modules that
register tasks before it calls ``prepare_data``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Union

from lmforge.core.errors import DataError
from lmforge.data.config import DataConfig, EvalSetConfig, SourceConfig
from lmforge.data.documents import content_hash

EvalRole = Literal["task", "heldout"]


@dataclass(frozen=True)
class EvalItem:
    item_id: str
    text: str

    @property
    def sha256(self) -> str:
        return content_hash(self.text)


@dataclass
class EvalSet:
    name: str
    role: EvalRole
    items: list[EvalItem]
    _sha256: str = field(default="", repr=False, compare=False)

    @property
    def sha256(self) -> str:
        """Identifies the set's exact contents: a hash over its items' ids and content hashes."""
        if not self._sha256:
            body = "\n".join(f"{item.item_id}\t{item.sha256}" for item in self.items)
            self._sha256 = hashlib.sha256(f"{self.name}\n{self.role}\n{body}".encode()).hexdigest()
        return self._sha256

    def summary(self) -> dict:
        return {"name": self.name, "role": self.role, "items": len(self.items), "sha256": self.sha256}

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role,
                "items": [{"id": item.item_id, "text": item.text} for item in self.items]}

    @classmethod
    def from_dict(cls, data: dict) -> "EvalSet":
        return cls(data["name"], data["role"], [EvalItem(i["id"], i["text"]) for i in data["items"]])


def eval_sets_digest(eval_sets: list[EvalSet]) -> str:
    """Identifies which versions of which eval sets a preparation was checked against."""
    return hashlib.sha256("\n".join(f"{s.name}\t{s.sha256}" for s in eval_sets).encode()).hexdigest()


ItemLike = Union[EvalItem, str, tuple]
Loader = Callable[[], Iterable[ItemLike]]
_REGISTRY: dict[str, tuple[EvalRole, Loader]] = {}


def register_eval_set(name: str, items: Loader | Iterable[ItemLike], *, role: EvalRole = "task",
                      replace: bool = False) -> None:
    """Register an eval set: ``items`` is a list (or a function returning one, called at
    prepare time) of :class:`EvalItem`, ``(item_id, text)`` pairs or plain strings."""
    if role not in ("task", "heldout"):
        raise ValueError(f"eval set {name!r}: role must be 'task' or 'heldout', got {role!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"eval set {name!r} is already registered (pass replace=True to replace it)")
    if not callable(items):
        items = list(items)
        frozen = items
        items = lambda: frozen  # noqa: E731 - a loader that returns the list given
    _REGISTRY[name] = (role, items)


def unregister_eval_set(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def _as_item(value: ItemLike, index: int, set_name: str) -> EvalItem:
    if isinstance(value, EvalItem):
        return value
    if isinstance(value, str):
        return EvalItem(str(index), value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        return EvalItem(str(value[0]), value[1])
    raise DataError(f"eval set {set_name!r}: item {index} is {type(value).__name__}, expected an EvalItem, "
                    "an (id, text) pair or a string")


def load_registered(name: str) -> EvalSet:
    if name not in _REGISTRY:
        raise DataError(f"no eval set {name!r} is registered (registered: {', '.join(registered_names()) or 'none'})")
    role, loader = _REGISTRY[name]
    try:
        values = list(loader())
    except DataError:
        raise
    except Exception as exc:  # a task's loader is user code: name it in the error
        raise DataError(f"eval set {name!r}: its loader failed ({type(exc).__name__}: {exc})") from exc
    return EvalSet(name, role, [_as_item(v, i, name) for i, v in enumerate(values)])


def load_configured(spec: EvalSetConfig) -> EvalSet:
    """An eval set declared in the config, read with the source readers."""
    from lmforge.data.sources import iter_documents

    source = SourceConfig(name="eval", kind=spec.kind, path=spec.path, text_field=spec.text_field,
                          split=spec.split, max_documents=spec.max_items)
    items = [EvalItem(doc.doc_id, doc.text) for doc in iter_documents(source)]
    if not items:
        raise DataError(f"eval set {spec.name!r} ({spec.kind} {spec.path}): no items")
    return EvalSet(spec.name, spec.role, items)


def collect_eval_sets(cfg: DataConfig) -> list[EvalSet]:
    """Every registered set plus those the config declares (the held-out split is added later)."""
    sets = [load_registered(name) for name in registered_names()]
    sets += [load_configured(spec) for spec in cfg.decontamination.eval_sets]
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"eval sets registered twice (in code and in the config?): {', '.join(repeated)}")
    if cfg.decontamination.heldout_split:
        reserved = {f"heldout/{source.name}" for source in cfg.sources} & set(names)
        if reserved:
            raise DataError(f"eval set names {sorted(reserved)} are taken by the prepared held-out split")
    return sets
