"""Read a text corpus as a stream of sentences, in a fixed order.

Formats (``data.format``, ``auto`` picks by extension, ``.gz`` allowed for text/JSONL):
- plain text (``.txt``, ``.cor``, anything else): one sentence per line;
- JSONL (``.jsonl``, ``.json``): one JSON object per line, sentence in ``data.text_field``;
- Parquet (``.parquet``): column ``data.text_field`` (the LM1B parquet layout).
With a label field (``data.label_field``, JSONL / Parquet only) every item is (sentence, label): the
field / column holds the document's class label, an int in [0, 32767] (the shards' ``label`` field
is int16), checked on every non-blank row. Blank sentences are skipped (they are not samples and
get no index). The order is the files in
``assets.resolve_corpus`` order (sorted within each glob), then line/row order, so the global
sample index -- the shard key -- is stable across runs. Errors (``CorpusError``, an ``InputError``:
exit status 2, one line) name the file and line/row and what to change.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from typing import Iterator, Optional

from ..components.preflight import InputError


class CorpusError(InputError, ValueError):
    """A corpus file cannot be read as ``data.format`` (names the file, line or row, and the fix)."""


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(ext, "text")


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline). Decoded line by line (text-mode reads
    decode whole buffers ahead), so a decoding error names the right line."""
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            if b"\0" in raw:
                raise CorpusError(f"{path}: line {lineno}: NUL byte: a binary file, not text (data.corpus must "
                                  f"name text, JSONL or Parquet files; data.format picks the reader)")
            try:
                line = raw.decode("utf-8", errors="strict")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}: line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                  f"re-encode the file as UTF-8 or remove the line") from None
            yield lineno, line.rstrip("\r\n")


MAX_LABEL = 32767  # the shards store labels as int16


def check_label(val, path: str, where: str, label_field: str) -> int:
    """``val`` as a class label, or a ``CorpusError`` naming the file, the line / row and the field."""
    if val is None:
        raise CorpusError(f"{path}: {where}: no '{label_field}' label (data.label_field); every document needs "
                          f"an int class label")
    if isinstance(val, bool) or not isinstance(val, int):
        raise CorpusError(f"{path}: {where}: '{label_field}' is {val!r} ({type(val).__name__}), not an int class "
                          f"label (data.label_field)")
    if not 0 <= val <= MAX_LABEL:
        raise CorpusError(f"{path}: {where}: '{label_field}' is {val}; class labels must lie in [0, {MAX_LABEL}]")
    return val


def iter_file(path: str, fmt: str = "auto", text_field: str = "text",
              label_field: Optional[str] = None) -> Iterator:
    """Sentences of one file (stripped, blanks skipped); (sentence, label) with ``label_field``."""
    kind = detect_format(path, fmt)
    if label_field is not None and kind == "text":
        raise CorpusError(f"{path}: a plain-text corpus has no label column, but data.label_field is "
                          f"{label_field!r}: use JSONL or Parquet corpora (or data.label_field: null)")
    if kind == "text":
        for _, line in _iter_lines(path):
            s = line.strip()
            if s:
                yield s
    elif kind == "jsonl":
        for lineno, line in _iter_lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"{path}: line {lineno}: invalid JSON ({e}); fix or remove the line") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
                raise CorpusError(f"{path}: line {lineno}: no '{text_field}' field (has {keys}); set data.text_field "
                                  f"to the field that holds the text")
            val = obj[text_field]
            if not isinstance(val, str):
                raise CorpusError(f"{path}: line {lineno}: '{text_field}' is {type(val).__name__}, not a string")
            if val.strip():
                if label_field is None:
                    yield val.strip()
                else:
                    yield val.strip(), check_label(obj.get(label_field), path, f"line {lineno}", label_field)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a non-parquet file
            raise CorpusError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e).strip()[:200]}); check the file, or "
                              f"set data.format if it is not Parquet") from None
        names = pf.schema_arrow.names
        if text_field not in names:
            raise CorpusError(f"{path}: no column '{text_field}' (columns: {names}); set data.text_field to the "
                              f"column that holds the text")
        if label_field is not None and label_field not in names:
            raise CorpusError(f"{path}: no column '{label_field}' (columns: {names}); set data.label_field to the "
                              f"column that holds the class labels")
        cols = [text_field] if label_field is None else [text_field, label_field]
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=8192):
            labels = batch.column(1).to_pylist() if label_field is not None else None
            for j, val in enumerate(batch.column(0).to_pylist()):
                row += 1
                if val is None:
                    continue
                if not isinstance(val, str):
                    raise CorpusError(f"{path}: row {row}: '{text_field}' is {type(val).__name__}, not a string")
                if val.strip():
                    if labels is None:
                        yield val.strip()
                    else:
                        yield val.strip(), check_label(labels[j], path, f"row {row}", label_field)
    else:
        raise CorpusError(f"{path}: unknown corpus format {kind!r} (data.format)")


def iter_corpus(files: list[str], fmt: str = "auto", text_field: str = "text",
                limit: Optional[int] = None, label_field: Optional[str] = None) -> Iterator:
    n = 0
    for path in files:
        for s in iter_file(path, fmt, text_field, label_field):
            if limit is not None and n >= limit:
                return
            yield s
            n += 1


def files_identity(files: list[str]) -> list[dict]:
    """Content identity of the corpus files (recorded in the manifest; a changed corpus is a
    different shard set)."""
    out = []
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out.append({"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()})
    return out
