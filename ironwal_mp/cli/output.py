"""Human output for the CLI: aligned tables, sizes, rates and a progress line (no dependencies).

A table and a progress line take a few dozen lines; a library (rich, tqdm) would add an install
step and a dependency to the storage engine's package for no capability the CLI needs.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, TextIO

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or input: one clear line on stderr and exit 2."""


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def rate(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def table(rows: Sequence[Sequence[Any]], header: Optional[Sequence[str]] = None,
          out: Optional[TextIO] = None) -> None:
    """Rows under an optional header and rule, on ``out`` (the current ``sys.stdout``)."""
    out = out or sys.stdout
    cells = [[str(c) for c in r] for r in ([header] if header else []) + list(rows)]
    if not cells:
        return
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]

    def line(r: List[str]) -> str:
        parts = []
        for i, c in enumerate(r):
            # numbers right-aligned, text left-aligned
            numeric = c.replace(",", "").replace(".", "", 1).replace("%", "").replace("x", "").strip().isdigit()
            parts.append(c.rjust(widths[i]) if numeric else c.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    if header:
        out.write(line(cells[0]) + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        cells = cells[1:]
    for r in cells:
        out.write(line(r) + "\n")


def emit_json(obj: Any, out: Optional[TextIO] = None, line: bool = False) -> None:
    """One JSON document; ``line``: on one line (a stream of them is JSON lines)."""
    out = out or sys.stdout
    out.write(json.dumps(obj, indent=None if line else 2, sort_keys=True, default=_json_default) + "\n")


def bytes_field(name: str, value: Optional[bytes]) -> Dict[str, Any]:
    """``{name: text}`` for UTF-8 bytes, else ``{name + "_hex": hex}``: two ids never print alike."""
    if value is None:
        return {name: None}
    try:
        return {name: value.decode("utf-8")}
    except UnicodeDecodeError:
        return {name + "_hex": value.hex()}


def shown_field(doc: Dict[str, Any], name: str) -> str:
    """A :func:`bytes_field` as text: itself if UTF-8, else as Python writes bytes; '-' if none."""
    if doc.get(name) is not None:
        return doc[name]
    if name + "_hex" in doc:
        return repr(bytes.fromhex(doc[name + "_hex"]))
    return "-"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class Progress:
    """A live progress line on a terminal; plain periodic lines otherwise."""

    def __init__(self, label: str, total: Optional[float] = None, out: Optional[TextIO] = None,
                 unit: str = "records", every: float = 2.0) -> None:
        self.label = label
        self.total = total
        self.out = out = out or sys.stderr  # (the current one: a caller may have redirected it)
        self.unit = unit
        self.tty = out.isatty()
        self.every = 0.1 if self.tty else every
        self.start = time.monotonic()
        self._last = 0.0 if self.tty else self.start  # plain output: first line after `every`
        self.count = 0
        self.bytes = 0

    def update(self, count: int = 0, nbytes: int = 0, force: bool = False) -> None:
        self.count += count
        self.bytes += nbytes
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        text = f"{self.label}: {self.count:,} {self.unit}"
        if self.total:
            frac = min(1.0, self.count / self.total)
            bar = "#" * int(frac * 24)
            text = f"{self.label} [{bar:<24}] {frac * 100:5.1f}%  {self.count:,}/{int(self.total):,} {self.unit}"
        text += f"  {rate(self.count / elapsed)}/s"
        if self.bytes:
            text += f"  {self.bytes / elapsed / 1048576:.1f} MB/s"
        text += f"  {elapsed:.1f}s"
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.update(force=True)
            self.out.write("\n")
            self.out.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def lines(items: Iterable[str], out: Optional[TextIO] = None) -> None:
    out = out or sys.stdout
    for item in items:
        out.write(item + "\n")
