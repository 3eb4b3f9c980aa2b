"""The output steps: the tokenizer (trained on the training split only) and the token shards.

Both have the shape of every other step. The tokenizer is one global unit whose marker
is ``tokenizer.done``; it also writes ``doc_hashes/`` and checks that no held-out document
is in the training split, since the documents are final from here on. With
``data.tokenizer_from`` it trains nothing and copies that tokenizer instead (byte for byte,
so the new data's token ids are the parent's). The shards step
has one unit per shard (planned from byte counts, see shards.py); a shard's ``.done``
record (its sha256, documents and tokenizer) is its completion marker. Both are keyed by
the documents they are made of, not by the keys of the steps before them.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.core.errors import DataError
from lmforge.core.io import atomic_write_bytes
from lmforge.core.logging import RateProgress, get_logger
from lmforge.data.config import DataConfig
from lmforge.data.image_records import text_for_tokenizer
from lmforge.data.shards import ShardTask, check_isolation, finished_record, plan_shards, write_shard
from lmforge.data.pipeline import SPLITS
from lmforge.data.stages import Context, Stage, key_of, load_marker, register_step
from lmforge.data.tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_file

if TYPE_CHECKING:
    from lmforge.data.executors import LocalExecutor

log = get_logger(__name__)
_SHARD_FILE = re.compile(r"^(shard_\d{5})\.(bin|idx\.npy|done)$")


def parent_tokenizer(cfg: DataConfig) -> tuple[Path, Tokenizer] | None:
    """The tokenizer ``data.tokenizer_from`` names (its file, loaded), or None when it is unset.

    A DataError naming ``data.tokenizer_from`` when the path is missing, is a directory
    without a tokenizer.json, is not a tokenizer, is not byte-level (bits-per-byte needs every
    token to stand for exact bytes), or is the tokenizer this preparation writes itself.
    """
    if cfg.tokenizer_from is None:
        return None
    given = Path(cfg.tokenizer_from)
    path = tokenizer_file(given)
    if not given.exists():
        raise DataError(f"data.tokenizer_from: {given} does not exist (expected a tokenizer.json or a "
                        "prepared data directory)")
    if not path.is_file():
        raise DataError(f"data.tokenizer_from: {given} is a directory without {TOKENIZER_FILE} "
                        "(not a prepared data directory)")
    if path.resolve() == (Path(cfg.out_dir) / TOKENIZER_FILE).resolve():
        raise DataError(f"data.tokenizer_from: {given} is this preparation's own out_dir ({cfg.out_dir}); "
                        "name the data directory (or tokenizer.json) whose tokenizer to reuse")
    try:
        tokenizer = Tokenizer.load(path)
        tokenizer.token_byte_lengths()
    except DataError as exc:
        raise DataError(f"data.tokenizer_from: {path} is not a usable byte-level tokenizer ({exc})") from exc
    return path, tokenizer


@register_step
class TokenizerStage(Stage):
    """Train the byte-level BPE tokenizer on the training split of the final documents, or
    copy the one ``data.tokenizer_from`` names."""

    name = "tokenizer"
    single = True

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.out / "tokenizer.done"

    def _parent(self, ctx: Context) -> tuple[Path, Tokenizer] | None:
        if "parent_tokenizer" not in ctx.cache:
            ctx.cache["parent_tokenizer"] = parent_tokenizer(ctx.cfg)
        return ctx.cache["parent_tokenizer"]

    def key(self, ctx: Context, unit: str) -> str | None:
        # The final documents themselves rather than the keys before: a change upstream that
        # leaves them as they were (a new eval set that hits nothing) does not retrain.
        parent = self._parent(ctx)
        if parent is not None:  # a changed parent tokenizer is copied again (and the shards redone)
            return key_of(self.name, ctx.corpus_digest(), {"tokenizer_from": parent[1].sha256})
        return key_of(self.name, ctx.corpus_digest(), ctx.cfg.vocab_size)

    def finished(self, ctx: Context, unit: str) -> dict | None:
        found = load_marker(self.marker(ctx, unit), self.key(ctx, unit))
        if found is None or not all((ctx.out / "doc_hashes" / f"{s}.txt").is_file() for s in SPLITS):
            return None
        try:
            sha256 = Tokenizer.load(ctx.out / "tokenizer.json").sha256
        except (DataError, OSError):
            return None
        return found if sha256 == found.get("sha256") else None

    def compute(self, ctx: Context, unit: str) -> dict:
        cfg, corpus = ctx.cfg, ctx.corpus()
        ctx.write_doc_hashes()
        isolation = check_isolation(ctx.out)
        if isolation["overlap"]:
            raise DataError(f"{ctx.out}: {isolation['overlap']} held-out documents also appear in the training "
                            f"split (e.g. {isolation['overlapping_hashes'][:3]})")
        train_hashes = [h for s in cfg.sources for h in corpus[(s.name, "train")][1]]
        parent = self._parent(ctx)
        if not train_hashes:
            raise DataError("the training split is empty: nothing to " +
                            ("tokenize" if parent else "train the tokenizer on"))
        train_digest = hashlib.sha256("\n".join(train_hashes).encode()).hexdigest()
        if parent is not None:
            return self._copy(ctx, *parent) | {"documents": len(train_hashes), "train_digest": train_digest}
        start = time.perf_counter()
        # An image record's captions only (data/image_records.py); other documents as they are.
        texts = (text_for_tokenizer(t) for s in cfg.sources for t in corpus[(s.name, "train")][0])
        tokenizer = Tokenizer.train(texts, cfg.vocab_size, length=len(train_hashes))
        tokenizer.save(ctx.out / "tokenizer.json")
        log.info("trained a %d-token byte-level BPE tokenizer on %d training documents in %.1f s",
                 tokenizer.vocab_size, len(train_hashes), time.perf_counter() - start)
        return {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "documents": len(train_hashes),
                "train_digest": train_digest}

    def _copy(self, ctx: Context, source: Path, parent: Tokenizer) -> dict:
        """Copy the parent's tokenizer.json byte for byte (its file digest, which runs and
        checkpoints compare, stays the parent's) and check that the copy is that tokenizer."""
        if ctx.cfg.vocab_size != parent.vocab_size:
            log.warning("data.vocab_size (%d) is ignored: the tokenizer from data.tokenizer_from (%s) has %d tokens",
                        ctx.cfg.vocab_size, source, parent.vocab_size)
        target = atomic_write_bytes(ctx.out / TOKENIZER_FILE, source.read_bytes())
        copied = Tokenizer.load(target)
        if copied.sha256 != parent.sha256:
            raise DataError(f"data.tokenizer_from: {source} changed while it was being copied; prepare again")
        log.info("copied the %d-token tokenizer %s (sha256 %s) from data.tokenizer_from",
                 copied.vocab_size, source, copied.sha256[:12])
        return {"sha256": copied.sha256, "vocab_size": copied.vocab_size,
                "tokenizer_from": {"path": str(source.resolve()), "sha256": parent.sha256}}

    def report(self, ctx: Context, manifest: dict) -> None:
        """Where the tokenizer came from, when it was copied rather than trained here."""
        source = ctx.record(self, "all").get("tokenizer_from")
        if source is not None:
            manifest["tokenizer"]["tokenizer_from"] = source


@register_step
class ShardsStage(Stage):
    """Tokenize the final documents into shards per (split, source), in parallel."""

    name = "shards"
    after = ("tokenizer",)

    def _plan(self, ctx: Context) -> dict[str, ShardTask]:
        """{stem: task} of every planned shard, in (source, split, index) order; planned once per process."""
        if "shard_plan" not in ctx.cache:
            ctx.cache["shard_plan"] = {task.stem: task for (source, split), (texts, hashes) in ctx.corpus().items()
                                       for task in plan_shards(split, source, texts, hashes, ctx.cfg.shard_tokens)}
        return ctx.cache["shard_plan"]

    def tasks(self, ctx: Context) -> list[ShardTask]:
        return list(self._plan(ctx).values())

    def units(self, ctx: Context) -> list[str]:
        return list(self._plan(ctx))

    def marker(self, ctx: Context, unit: str) -> Path:
        return ctx.out / f"{unit}.done"

    def tokenizer_sha256(self, ctx: Context) -> str:
        return ctx.record("tokenizer", "all")["sha256"]

    def finished(self, ctx: Context, unit: str) -> dict | None:
        return finished_record(self._task(ctx, unit), ctx.out, self.tokenizer_sha256(ctx))

    def done_key(self, record: dict) -> str:
        return record["sha256"]

    def run(self, ctx: Context, unit: str) -> dict:
        return write_shard(self._task(ctx, unit), str(ctx.out), self.tokenizer_sha256(ctx))

    def _task(self, ctx: Context, unit: str) -> ShardTask:
        plan = self._plan(ctx)
        if unit not in plan:
            raise DataError(f"{ctx.out}: no shard {unit!r} in this preparation's plan")
        return plan[unit]

    def tidy(self, ctx: Context) -> None:
        """Drop shard files (and crash leftovers) beyond this plan, so nothing unlisted lingers."""
        planned = set(self.units(ctx))
        root = ctx.out / "shards"
        for path in root.glob("*/*/*") if root.is_dir() else []:
            match = _SHARD_FILE.match(path.name)
            stem = f"{path.parent.relative_to(ctx.out).as_posix()}/{match.group(1)}" if match else None
            if (path.name.startswith(".") and path.name.endswith(".tmp")) or (stem and stem not in planned):
                path.unlink()

    def dispatch(self, ctx: Context, pending: list[str], executor: "LocalExecutor") -> None:
        tasks = sorted((self._task(ctx, unit) for unit in pending), key=lambda t: -t.token_bound)  # largest first
        sha256 = self.tokenizer_sha256(ctx)
        with RateProgress("writing shards", total=len(tasks), unit="tokens") as bar:
            def done(args: tuple, record: dict) -> None:
                ctx.remember(self, args[0].stem, record)
                bar.advance(1, record["tokens"])

            executor.map(write_shard, [(task, str(ctx.out), sha256) for task in tasks], on_done=done)
