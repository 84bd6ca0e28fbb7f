"""Text sources: every corpus is an iterator of documents (strings).

Accepted sources: a ``.txt`` file (one document) or a folder of text files (one document
each; ``.jsonl`` and ``.parquet`` inside are read as below), a ``.jsonl`` file (one
document per line, in ``field``), a ``.parquet`` file (one per row, in column ``field``),
a Hugging Face dataset saved with ``save_to_disk`` or a hub dataset name (online only),
``-`` for standard input (one document), and ``default``: the embedded default corpus.

The default corpus is real English that no one on this project wrote: the Python
language and library help topics that ship with every CPython (``pydoc_data.topics``),
plus, when Debian's ``fortunes`` package is installed (the set-up does this where it
can), its ~15k quotations, each a document. Documents are shuffled with a fixed seed so
any prefix mixes both.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from dictlens.errors import InputError

DEFAULT_TEXT = "default"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Pictures and word lists rather than prose.
_FORTUNE_SKIP = {"art", "ascii-art"}
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


def default_documents(seed: int = 0) -> list[str]:
    """The embedded default corpus (see the module docstring)."""
    import pydoc_data.topics

    docs = [t.strip() for t in pydoc_data.topics.topics.values() if t.strip()]
    if FORTUNES_DIR.is_dir():
        for path in sorted(FORTUNES_DIR.iterdir()):
            if path.suffix or path.name in _FORTUNE_SKIP or not path.is_file():
                continue
            docs.extend(split_fortunes(path.read_text(encoding="utf-8", errors="replace")))
    random.Random(seed).shuffle(docs)
    return docs


def split_fortunes(text: str) -> list[str]:
    """The entries of a file in the fortune format (entries separated by lines of ``%``)."""
    return [q.strip() for q in text.split("\n%\n") if q.strip()]


def describe_default() -> str:
    fortunes = "with" if FORTUNES_DIR.is_dir() else "without (install Debian's `fortunes` for more text)"
    return f"pydoc topics {fortunes} Debian fortunes"


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise InputError(f"{path}:{lineno}: no field {field!r} (found {keys}); set --text-field")
            yield str(record[field])


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise InputError(f"{path}: no column {field!r} (found {pf.schema_arrow.names}); set --text-field")
    for batch in pf.iter_batches(columns=[field]):
        yield from (str(v) for v in batch.column(0).to_pylist() if v is not None)


def _hf_dataset(ds: object, name: str, field: str) -> Iterator[str]:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: take train
        splits = list(ds.keys())
        ds = ds["train" if "train" in splits else splits[0]]  # type: ignore[index]
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise InputError(f"dataset {name}: no column {field!r} (found {columns}); set --text-field")
    for row in ds:  # type: ignore[attr-defined]
        yield str(row[field])


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
        or (path / "state.json").is_file()


def _file(path: Path, field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path, field)
    elif suffix == ".parquet":
        yield from _parquet(path, field)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _folder(path: Path, field: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and p.suffix.lower() in _TEXT_SUFFIXES | {".jsonl", ".parquet"})
    if not files:
        raise InputError(f"text folder {path} holds no .txt, .md, .jsonl or .parquet files")
    for p in files:
        yield from _file(p, field)


def _iter(source: str, field: str) -> Iterator[str]:
    if source == DEFAULT_TEXT:
        yield from default_documents()
        return
    if source == "-":
        yield sys.stdin.read()
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            import datasets

            yield from _hf_dataset(datasets.load_from_disk(str(path)), source, field)
        else:
            yield from _folder(path, field)
    elif path.is_file():
        yield from _file(path, field)
    elif "/" in source and not source.startswith((".", "/", "~")) and not path.parent.is_dir():
        yield from _hub_dataset(source, field)
    else:
        raise InputError(f"text source {source} does not exist")


def _hub_dataset(name: str, field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # offline, unknown name, gated...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"text source {name}: not a local path, and loading it from the hub failed: {first}") from None
    yield from _hf_dataset(ds, name, field)


def iter_documents(source: str, field: str = "text") -> Iterator[str]:
    """Documents of ``source`` (see the module docstring); empty documents are skipped.

    A source that yields no non-empty document raises :class:`InputError` when exhausted.
    """
    count = 0
    for doc in _iter(source, field):
        if doc.strip():
            count += 1
            yield doc
    if count == 0:
        raise InputError(f"text source {source} is empty: it holds no non-empty document")
