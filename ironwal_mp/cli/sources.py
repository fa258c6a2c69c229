"""Where ``ingest`` gets its records: JSON lines, CSV, raw lines, or a synthetic ledger.

Each source yields ``(key, value)`` byte pairs. JSON lines keep the line as the value; CSV rows
are stored as a JSON object of the row; raw lines are their own key and value.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
from typing import BinaryIO, Iterator, List, Optional, Tuple

from .output import UsageError

Record = Tuple[bytes, bytes]
FORMATS = ("jsonl", "csv", "raw")
CSV_FIELD_LIMIT = 1 << 30
_GUESS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


def guess_format(path: Optional[str]) -> str:
    if path in (None, "-"):
        return "raw"
    return _GUESS.get(os.path.splitext(path)[1].lower(), "raw")


def _key_bytes(value: object) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if value is None or isinstance(value, (dict, list)):
        raise ValueError("not a scalar")
    return json.dumps(value).encode("utf-8")


def read_jsonl(stream: BinaryIO, key_field: str) -> Iterator[Record]:
    for lineno, line in enumerate(stream, 1):
        line = line.rstrip(b"\r\n")
        if lineno == 1 and line.startswith(codecs.BOM_UTF8):  # (as for CSV: not the record's)
            line = line[len(codecs.BOM_UTF8):]
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"line {lineno}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or key_field not in obj:
            raise UsageError(f"line {lineno}: no field {key_field!r} to route by (see --key)")
        try:
            key = _key_bytes(obj[key_field])
        except ValueError:
            raise UsageError(f"line {lineno}: field {key_field!r} is not a string or number") from None
        yield key, line


class _Utf8Lines:
    """The lines of a binary stream as text, decoded one at a time, so that bytes that are not
    UTF-8 are reported at the line that holds them (a text wrapper decodes 8 KiB at once, and
    the error then surfaced hundreds of lines early). Lines end as with ``newline=""``, which
    csv expects: at \\n, \\r\\n or a lone \\r, the ending kept. A byte-order mark, as spreadsheets
    write, is dropped: it is not part of the first column's name."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pending: List[str] = []  # (the rest of a binary line that held lone \r endings)
        self._first = True
        self.line_num = 0  # lines handed out so far (after a decode error: those before it)

    def __iter__(self) -> "_Utf8Lines":
        return self

    def __next__(self) -> str:
        if not self._pending:
            raw = self._stream.readline()
            if not raw:
                raise StopIteration
            if self._first:
                self._first = False
                if raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:  # (counted on to the bad byte's line, for the error)
                self.line_num += len(io.StringIO(raw[:exc.start].decode("utf-8") + ".", newline="").readlines()) - 1
                raise
            body = text[:-2] if text.endswith("\r\n") else text[:-1]
            if "\r" not in body:
                self.line_num += 1
                return text
            self._pending = io.StringIO(text, newline="").readlines()[::-1]
        self.line_num += 1
        return self._pending.pop()


def read_csv(stream: BinaryIO, key_field: str) -> Iterator[Record]:
    text = _Utf8Lines(stream)
    reader = csv.DictReader(text)
    # a field may be as large as a record may be (the ring's limit says so at the append)
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    try:
        if reader.fieldnames is None:
            return
        if key_field not in reader.fieldnames:
            raise UsageError(f"CSV has no column {key_field!r} to route by (columns: {', '.join(reader.fieldnames)})")
        repeated = sorted({n for n in reader.fieldnames if reader.fieldnames.count(n) > 1})
        if repeated:  # (a row would keep only the last of them, silently)
            raise UsageError(f"CSV header names column(s) {', '.join(map(repr, repeated))} more than once")
        yield from _csv_rows(reader, key_field)
    except UnicodeDecodeError:
        raise UsageError(f"not UTF-8 text, near line {text.line_num + 1} (CSV input must be UTF-8)") from None
    except csv.Error as exc:
        raise UsageError(f"line {reader.line_num}: not valid CSV ({exc})") from None


def _csv_rows(reader: csv.DictReader, key_field: str) -> Iterator[Record]:
    for row in reader:
        if row[key_field] is None:  # a short row: DictReader fills missing columns with None
            raise UsageError(f"line {reader.line_num}: no value in column {key_field!r} to route by (see --key)")
        yield row[key_field].encode("utf-8"), json.dumps(row, separators=(",", ":")).encode("utf-8")


def read_raw(stream: BinaryIO) -> Iterator[Record]:
    for line in stream:
        line = line.rstrip(b"\r\n")
        if line:
            yield line, line


ACCOUNTS = 5000
KINDS = ("deposit", "withdrawal", "transfer_in", "transfer_out", "fee", "interest")


def synthetic_ledger(count: int, seed: int = 20261121) -> Iterator[Record]:
    """A deterministic stream of ledger events, keyed by account."""
    rng = random.Random(seed)
    accounts = [f"acct-{i:05d}" for i in range(ACCOUNTS)]
    t0 = 1_795_000_000_000
    for i in range(count):
        # a fifth of the traffic comes from 50 busy accounts, the rest from all of them
        account = accounts[rng.randrange(50) if rng.random() < 0.2 else rng.randrange(ACCOUNTS)]
        kind = KINDS[rng.randrange(len(KINDS))]
        amount = rng.randrange(1, 500_000)
        event = (
            '{"seq":%d,"ts_ms":%d,"account":"%s","kind":"%s","amount_cents":%d,"currency":"EUR","ref":"tx-%08x"}'
            % (i, t0 + i * 3, account, kind, amount, rng.getrandbits(32))
        )
        yield account.encode(), event.encode()


def open_source(path: Optional[str], fmt: Optional[str], key: Optional[str]) -> Tuple[Iterator[Record], str]:
    """(records, description) for the ingest arguments."""
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r} (choose from {', '.join(FORMATS)})")
    if path in (None, "-"):
        stream: BinaryIO = os.fdopen(os.dup(0), "rb")
        name = "standard input"
    else:
        try:
            stream = open(path, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        name = path
    if fmt == "raw":
        return read_raw(stream), f"{name} (raw lines)"
    if not key:
        raise UsageError(f"--key FIELD is required for {fmt} input (the field or column to route by)")
    reader = read_jsonl if fmt == "jsonl" else read_csv
    return reader(stream, key), f"{name} ({fmt}, key {key!r})"
