"""Command line for collections: ``python -m service.cli --help``.

Builds work directly on the data directory (stop the server first, or build into a fresh data dir and
restart it: a running server reads the catalogue on start).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from service.embedding import gallery_vectors_and_states
from service.errors import ApiError
from service.registry import ModelRegistry
from service.settings import Settings
from service.store import CollectionStore, NewItem

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}


def folder_records(folder: Path) -> Iterator[dict[str, Any]]:
    """Every image below ``folder``; the key is the relative path, metadata holds it as ``source_path``."""
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(folder).as_posix()
        yield {"path": path, "key": rel, "metadata": {"source_path": rel}}


def split_records(root: Path, dataset: str, split: str) -> Iterator[dict[str, Any]]:
    """Gallery images of one split of an official person-search dataset (``<root>/<dataset>/`` holding the
    annotation file and ``imgs/``), one item per image with its person id and captions as metadata."""
    from training.datasets import PERSON_DATASETS, read_person_annotations

    spec = PERSON_DATASETS[dataset]
    annotations = read_person_annotations(root, dataset)
    for record in annotations.records[split]:
        rel = record[spec.image_key]
        yield {"path": root / dataset / "imgs" / rel, "key": rel,
               "metadata": {"person_id": int(record["id"]), "source_path": rel, "split": split,
                            "captions": record.get("captions", [])}}


def build_collection(store: CollectionStore, registry: ModelRegistry, name: str, methods: list[str],
                     records: list[dict[str, Any]], batch_size: int = 32, progress: bool = True) -> int:
    """Create (or extend) ``name`` and add every record in batches; records already present are skipped."""
    try:
        collection = store.get(name)
    except ApiError:
        collection = store.create(name, methods)
    entries = {m: registry.get(m, "search") for m in collection.methods}
    added = 0
    bar = tqdm(total=len(records), desc=f"indexing {name}", unit="img", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        fresh = []
        for record in chunk:
            try:
                store.item_by_key(name, record["key"])
            except ApiError:
                fresh.append(record)
        if fresh:
            items, images = [], []
            for record in fresh:
                data = Path(record["path"]).read_bytes()
                image = Image.open(io.BytesIO(data)).convert("RGB")
                images.append(image)
                fmt = Path(record["path"]).suffix.lstrip(".").lower() or "bin"
                items.append(NewItem(data, fmt, image.width, image.height, record["metadata"], record["key"]))
            for method, entry in entries.items():
                vectors, blobs = gallery_vectors_and_states(entry, images)
                for item, vector, blob in zip(items, vectors, blobs, strict=True):
                    item.vectors[method] = vector
                    if blob is not None:
                        item.states[method] = blob
            store.add_items(name, items, {m: e.version for m, e in entries.items()})
            added += len(items)
        bar.update(len(chunk))
    bar.close()
    store.snapshot(name)
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.cli", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, help="defaults to VLS_DATA_DIR or ./data")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build or extend a collection from a folder or an official split")
    build.add_argument("name")
    build.add_argument("--method", action="append", required=True, help="irra, ivt or laps (repeatable)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="index every image below this folder")
    source.add_argument("--dataset", choices=["CUHK-PEDES", "ICFG-PEDES", "RSTPReid"],
                        help="an official person-search split (reid_raw.json / ICFG-PEDES.json / data_captions.json)")
    build.add_argument("--root", type=Path, help="with --dataset: the folder holding <dataset>/")
    build.add_argument("--split", default="test", choices=["train", "val", "test"])
    build.add_argument("--batch-size", type=int, default=32)
    sub.add_parser("list", help="list collections")
    describe = sub.add_parser("describe", help="statistics of one collection")
    describe.add_argument("name")
    drop = sub.add_parser("delete", help="delete a collection and its images")
    drop.add_argument("name")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {}
    settings = Settings(**overrides)
    store = CollectionStore(settings.data_dir, settings.snapshot_every, settings.ivf_threshold)
    try:
        if args.command == "list":
            print(json.dumps([store.stats(c.name) for c in store.list()], indent=2))
        elif args.command == "describe":
            print(json.dumps(store.stats(args.name), indent=2))
        elif args.command == "delete":
            store.drop(args.name)
        elif args.command == "build":
            if args.dataset:
                if not args.root:
                    parser.error("--dataset needs --root")
                records = list(split_records(args.root, args.dataset, args.split))
            else:
                records = list(folder_records(args.folder))
            registry = ModelRegistry(settings.model_copy(update={"methods": ",".join(args.method), "warmup": False}))
            registry.load_all()
            if registry.errors:
                print(f"cannot load: {registry.errors}", file=sys.stderr)
                return 2
            added = build_collection(store, registry, args.name, args.method, records, args.batch_size)
            print(json.dumps({"collection": args.name, "added": added, **store.stats(args.name)}, indent=2))
            registry.close()
    except ApiError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
