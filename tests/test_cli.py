"""The ``ironwal-mp`` command line, always through its real entry point in a subprocess.

Every command runs as ``python -m ironwal_mp ...`` (the console script is checked once), with a
timeout. Tests that start a sharded WAL use the ``wal_root`` fixture, which fails a test that
leaves a coordinator, a worker or an IPC object behind.

A note on the machine: Linux charges POSIX message queues to the user against RLIMIT_MSGQUEUE
(about nine of the library's queues per user, machine-wide, and every process here runs as
root). When other jobs hold that budget, starting a WAL fails with "cannot create message
queue" before anything is written; ``cli`` waits and retries that case only (bounded).
Most WALs here use ``--workers 1`` and 4 shards to need few queues.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from typing import Dict, List, Optional

import pytest

from ironwal_mp import CompressionType, ShardedWal, SyncMode, Wal, WalOptions
from ironwal_mp.cli.main import main as cli_main
from ironwal_mp.errors import ManifestError
from ironwal_mp.engine import layout
from ironwal_mp.engine.frame import HEADER_SIZE
from ironwal_mp.engine.scanner import scan_frames

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sharded layer needs Linux")

PY = sys.executable
CMD = [PY, "-m", "ironwal_mp"]
CONSOLE_SCRIPT = os.path.join(os.path.dirname(PY), "ironwal-mp")
TIMEOUT = 120
MQ_BUSY = "cannot create message queue"


# --- helpers ------------------------------------------------------------------------------------


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("IRONWAL_MP_LOG", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # (a process that hangs is sent SIGABRT and shows where it was)
    return env


def cli(*args: str, expect: Optional[int] = 0, stdin: Optional[bytes] = None, cwd: Optional[str] = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m ironwal_mp ARGS``; check the exit code (unless ``expect`` is None)."""
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run(CMD + [str(a) for a in args], input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=timeout, cwd=cwd, env=_env())
        proc.stdout_text = proc.stdout.decode("utf-8", "replace")
        proc.stderr_text = proc.stderr.decode("utf-8", "replace")
        if proc.returncode == 1 and MQ_BUSY in proc.stderr_text and time.monotonic() < deadline:
            time.sleep(1.0)  # the machine's message-queue budget is held by other jobs: nothing was written
            continue
        break
    if expect is not None:
        assert proc.returncode == expect, (
            f"ironwal-mp {' '.join(map(str, args))}: exit {proc.returncode}, expected {expect}\n"
            f"--- stdout\n{proc.stdout_text[-4000:]}\n--- stderr\n{proc.stderr_text[-4000:]}"
        )
    return proc


def cli_json(*args: str, **kw):
    proc = cli(*args, "--json", **kw)
    return json.loads(proc.stdout)


def one_line(text: str) -> str:
    """The one non-empty line of ``text`` (an error report must be exactly one line)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line, got {len(lines)}:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def usage_error(*args: str, **kw) -> str:
    """Run a command that must fail with exit 2 and one clear line on stderr; return that line."""
    proc = cli(*args, expect=2, **kw)
    line = one_line(proc.stderr_text)
    assert line.startswith("ironwal-mp "), line
    return line


def replay_json(root: str, *extra: str) -> List[dict]:
    proc = cli("replay", "--root", root, "--json", *extra)
    return [json.loads(ln) for ln in proc.stdout.splitlines()]


def route(key: bytes, shards: int) -> int:
    """The documented router of new directories (MANIFEST: crc32-v1)."""
    return zlib.crc32(key) % shards


def write_jsonl(path: str, rows: List[dict]) -> List[bytes]:
    lines = [json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode() for r in rows]
    with open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    return lines


def check_replay_matches(entries: List[dict], values: List[bytes], keys: List[bytes], shards: int) -> None:
    """Each input value is stored exactly once, on its key's shard, in input order, with ids 0.. per shard."""
    per_shard: Dict[int, List[dict]] = defaultdict(list)
    for e in entries:
        per_shard[e["shard"]].append(e)
    expected: Dict[int, List[bytes]] = defaultdict(list)
    for k, v in zip(keys, values):
        expected[route(k, shards)].append(v)
    assert set(per_shard) == set(expected)
    for s, got in per_shard.items():
        assert [e["id"] for e in got] == list(range(len(got)))
        assert [e["data"].encode() for e in got] == expected[s], f"shard {s}"


def ingest_synthetic(root: str, records: int, *extra: str, shards: int = 4) -> dict:
    return cli_json("ingest", "--root", root, "--shards", str(shards), "--workers", "1",
                    "--records", str(records), *extra)


def segment_paths(stream_dir: str) -> List[str]:
    return [os.path.join(stream_dir, layout.segment_name(s)) for s in layout.list_segments(stream_dir)]


def frame_offsets(path: str) -> List[tuple]:
    """(offset, entry count) of every frame of a segment file."""
    size = os.path.getsize(path)
    start = layout.parse_segment_name(os.path.basename(path))
    with open(path, "rb") as fh:
        fd = fh.fileno()
        return [(off, h.count) for off, h, _ in scan_frames(lambda o, n: os.pread(fd, n, o), 0, start, end=size)]


def write_engine_wal(root: str, stream: str = "events", count: int = 200) -> List[bytes]:
    """A plain engine root (no sharding) with several segments of raw frames."""
    values = [b"event-%05d-" % i + b"x" * (i % 90) for i in range(count)]
    opts = WalOptions(root_path=root, max_segment_size=4096, compression=CompressionType.NONE)
    with Wal(opts) as wal:
        for v in values:
            wal.append(stream, v)
    return values


class Background:
    """A long-running ironwal-mp subprocess with stdout and stderr going to files."""

    def __init__(self, tmp_path, name: str, *args: str) -> None:
        self.out_path = os.path.join(str(tmp_path), f"{name}.out")
        self.err_path = os.path.join(str(tmp_path), f"{name}.err")
        self.args = [str(a) for a in args]
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Background":
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(CMD + self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=_env())
        return self

    @property
    def stdout(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    @property
    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_for(self, predicate, what: str, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while not predicate():
            assert self.proc.poll() is None, (
                f"ironwal-mp {' '.join(self.args)} exited ({self.proc.returncode}) before {what}\n"
                f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.stdout}\n{self.stderr}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            where = _kernel_wait(self.proc.pid)
            self.proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            raise AssertionError(f"ironwal-mp {' '.join(self.args)} did not stop within {timeout} s of signal "
                                 f"{sig} ({where})\n--- stdout (end)\n{self.stdout[-2000:]}\n--- stderr\n{self.stderr}")


def _kernel_wait(pid: int) -> str:
    """Where the kernel has a process waiting (its state and wait channel), for a hang's report."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/wchan") as fh:
            return f"state {state}, wchan {fh.read() or '-'}"
    except OSError as exc:
        return f"no /proc entry: {exc}"


def start_serve(tmp_path, root: str, shards: int = 4, *extra: str) -> Background:
    """``serve`` in the background, ready to accept connect() (retrying a busy queue budget)."""
    deadline = time.monotonic() + 90
    while True:
        bg = Background(tmp_path, "serve", "serve", "--root", root, "--shards", str(shards), "--workers", "1",
                        *extra).start()
        ready = time.monotonic() + 60
        while bg.proc.poll() is None and not _control_block_ready(root):
            if time.monotonic() > ready:
                bg.stop(signal.SIGKILL)
                pytest.fail(f"serve did not become ready\n{bg.stdout}\n{bg.stderr}")
            time.sleep(0.1)
        if bg.proc.poll() is None:
            return bg
        if MQ_BUSY in bg.stderr and time.monotonic() < deadline:
            time.sleep(1.0)
            continue
        pytest.fail(f"serve exited with {bg.proc.returncode}\n{bg.stdout}\n{bg.stderr}")


def _control_block_ready(root: str) -> bool:
    """True once a job can connect() to root (checked by a short-lived child, never in-process)."""
    code = ("import sys, ironwal_mp\n"
            "try:\n"
            "    w = ironwal_mp.connect(sys.argv[1])\n"
            "except ironwal_mp.WalClosedError:\n"
            "    sys.exit(3)\n"
            "w.close()\n")
    proc = subprocess.run([PY, "-c", code, root], capture_output=True, timeout=TIMEOUT, env=_env())
    return proc.returncode == 0


# --- help and the entry points ----------------------------------------------------------------------

SUBCOMMANDS = [
    [], ["ingest"], ["serve"], ["checkpoint"], ["checkpoint", "create"], ["checkpoint", "list"],
    ["checkpoint", "show"], ["checkpoint", "prune"], ["checkpoint", "compact"], ["replay"], ["inspect"],
    ["verify"], ["repair"], ["stats"],
]


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=lambda s: "-".join(s) or "top")
def test_help_for_every_subcommand(sub, tmp_path):
    proc = cli(*sub, "--help", cwd=str(tmp_path))
    assert proc.stdout_text.startswith("usage: ironwal-mp")
    assert proc.stderr_text == ""
    assert not os.path.exists(os.path.join(str(tmp_path), "wal_data")), "--help must not touch ./wal_data"


def test_console_script_is_the_same_command(tmp_path):
    assert os.path.exists(CONSOLE_SCRIPT), CONSOLE_SCRIPT
    proc = subprocess.run([CONSOLE_SCRIPT, "--help"], capture_output=True, timeout=TIMEOUT, cwd=str(tmp_path))
    assert proc.returncode == 0
    assert proc.stdout.decode() == cli("--help").stdout_text
    for name in ("ingest", "serve", "checkpoint", "replay", "inspect", "verify", "repair", "stats"):
        assert name in proc.stdout.decode()


def test_no_command_is_a_usage_error(tmp_path):
    proc = cli(expect=2, cwd=str(tmp_path))
    assert "required" in proc.stderr_text


# --- ingest ------------------------------------------------------------------------------------------


def test_ingest_jsonl_routes_by_key_and_replays(wal_root, tmp_path):
    rows = []
    for i in range(300):
        user = f"user-{i % 37}" if i % 5 else i % 11  # string and numeric keys
        rows.append({"user": user, "seq": i, "note": "é" if i % 7 == 0 else "plain"})
    path = os.path.join(str(tmp_path), "events.jsonl")
    lines = write_jsonl(path, rows)
    keys = [r["user"].encode() if isinstance(r["user"], str) else str(r["user"]).encode() for r in rows]

    summary = cli_json("ingest", path, "--root", wal_root, "--key", "user", "--shards", "4", "--workers", "1",
                       "--batch", "64")
    assert summary["records"] == 300
    assert summary["bytes_ingested"] == sum(len(ln) for ln in lines)
    assert summary["root"] == os.path.abspath(wal_root)
    assert summary["interrupted"] is False
    expected_counts = Counter(route(k, 4) for k in keys)
    assert summary["per_shard"] == {str(s): expected_counts.get(s, 0) for s in range(4)}
    assert summary["shard_next_ids"] == [expected_counts.get(s, 0) for s in range(4)]
    assert len(summary["checkpoints"]) == 1 and summary["checkpoints"][0].endswith("-end")
    assert summary["compression_ratio"] is not None and summary["compression_ratio"] > 0
    assert summary["segment_files"] >= len(expected_counts)

    entries = replay_json(wal_root)
    assert len(entries) == 300
    check_replay_matches(entries, lines, keys, 4)
    # every key on exactly one shard
    shard_of_key = defaultdict(set)
    for e in entries:
        shard_of_key[json.loads(e["data"])["user"]].add(e["shard"])
    assert all(len(s) == 1 for s in shard_of_key.values())

    # raw mode: the stored values, one per line
    raw = cli("replay", "--root", wal_root).stdout
    assert sorted(raw.splitlines()) == sorted(lines)

    # one shard only
    busiest = max(expected_counts, key=expected_counts.get)
    only = replay_json(wal_root, "--shard", str(busiest))
    assert {e["shard"] for e in only} == {busiest}
    assert len(only) == expected_counts[busiest]
    assert cli("replay", "--root", wal_root, "--shard", str(busiest)).stdout.splitlines() == \
        [e["data"].encode() for e in only]
    line = usage_error("replay", "--root", wal_root, "--shard", "4")
    assert "--shard 4" in line and "0..3" in line
    usage_error("replay", "--root", wal_root, "--shard", "-1")


def test_ingest_csv_by_column(wal_root, tmp_path):
    path = os.path.join(str(tmp_path), "payments.csv")
    rows = [{"id": str(i), "account": f"acct-{i % 9}", "amount": str(i * 100), "memo": "a, quoted \"memo\""}
            for i in range(120)]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "account", "amount", "memo"])
        w.writeheader()
        w.writerows(rows)
    summary = cli_json("ingest", path, "--root", wal_root, "--key", "account", "--shards", "4", "--workers", "1")
    assert summary["records"] == 120
    counts = Counter(route(r["account"].encode(), 4) for r in rows)
    assert summary["per_shard"] == {str(s): counts.get(s, 0) for s in range(4)}

    entries = replay_json(wal_root)
    assert len(entries) == 120
    stored = [json.loads(e["data"]) for e in entries]
    assert sorted(stored, key=lambda r: int(r["id"])) == rows  # a row is stored as a JSON object of the row
    for e, row in zip(entries, stored):
        assert e["shard"] == route(row["account"].encode(), 4)
    values = [json.dumps(r, separators=(",", ":")).encode() for r in rows]
    check_replay_matches(entries, values, [r["account"].encode() for r in rows], 4)


def test_ingest_csv_row_without_the_key_column_is_a_usage_error(wal_root, tmp_path):
    path = os.path.join(str(tmp_path), "short.csv")
    with open(path, "w") as fh:
        fh.write("id,account,amount\n1,acct-1,5\n2\n")
    line = usage_error("ingest", path, "--root", wal_root, "--key", "account", "--shards", "4", "--workers", "1")
    assert "account" in line


def test_ingest_csv_refuses_a_repeated_column_and_takes_large_fields(wal_root, tmp_path):
    path = os.path.join(str(tmp_path), "dup.csv")
    with open(path, "w") as fh:
        fh.write("k,amount,amount\nacct1,100,-40\n")
    line = usage_error("ingest", path, "--key", "k", "--root", wal_root, "--shards", "2", "--workers", "1")
    assert "'amount' more than once" in line  # (a row kept only the last value, silently)
    big = "x" * (300 << 10)  # over the csv module's default field limit (128 KiB): a traceback before
    with open(path, "w") as fh:
        fh.write(f"k,blob\na,{big}\nb,small\n")
    summary = cli_json("ingest", path, "--key", "k", "--root", wal_root, "--shards", "2", "--workers", "1")
    assert summary["records"] == 2
    values = sorted(json.loads(e["data"])["blob"] for e in replay_json(wal_root))
    assert values == sorted([big, "small"])


def test_ingest_record_too_large_says_what_was_appended_and_ring_size_fits_it(wal_root, tmp_path):
    path = os.path.join(str(tmp_path), "in.raw")
    with open(path, "wb") as fh:
        fh.write(b"".join(b"line%d\n" % i for i in range(2500)) + b"A" * (3 << 20) + b"\n")
    line = usage_error("ingest", path, "--root", wal_root, "--shards", "2", "--workers", "1")
    assert "exceeds the limit of 1048576 bytes (ring_size)" in line and "at most 1048572 bytes" in line and "(see --ring-size)" in line
    assert "the 2,500 records before its batch were appended" in line  # (the big one is a batch of its own)
    assert len(replay_json(wal_root)) == 2500
    other = os.path.join(str(tmp_path), "wal2")
    assert "--ring-size" in usage_error("ingest", path, "--root", other, "--ring-size", "1000")
    summary = cli_json("ingest", path, "--root", other, "--shards", "2", "--workers", "1", "--ring-size", str(16 << 20))
    assert summary["records"] == 2501


def test_checkpoint_ids_that_are_not_utf8_round_trip_and_never_print_alike(wal_root):
    ingest_synthetic(wal_root, 100)
    odd = os.fsdecode(b"\xab\xcd")  # what a shell passes for those bytes
    cli("checkpoint", "create", odd, "--root", wal_root)
    cli("checkpoint", "create", "abcd", "--root", wal_root)
    listed = cli_json("checkpoint", "list", "--root", wal_root)
    assert listed[-2]["id_hex"] == "abcd" and "id" not in listed[-2]
    assert listed[-1]["id"] == "abcd" and "id_hex" not in listed[-1]
    assert cli_json("checkpoint", "show", odd, "--root", wal_root)["id_hex"] == "abcd"
    assert cli_json("inspect", wal_root)["checkpoints"]["list"][-2]["id_hex"] == "abcd"
    assert "b'\\xab\\xcd'" in cli("checkpoint", "list", "--root", wal_root).stdout_text
    assert replay_json(wal_root, "--from-checkpoint", odd) == []
    assert "empty" in usage_error("replay", "--root", wal_root, "--from-checkpoint", "")


def test_ingest_raw_lines_from_stdin(wal_root):
    data = b"alpha\nbeta\n\ngamma\r\nalpha\n"
    summary = cli_json("ingest", "-", "--root", wal_root, "--shards", "4", "--workers", "1", stdin=data)
    assert summary["records"] == 4  # the blank line is skipped, CRLF stripped
    expected = [b"alpha", b"beta", b"gamma", b"alpha"]
    counts = Counter(route(v, 4) for v in expected)
    assert summary["per_shard"] == {str(s): counts.get(s, 0) for s in range(4)}
    entries = replay_json(wal_root)
    check_replay_matches(entries, expected, expected, 4)  # raw lines are their own key
    assert sorted(cli("replay", "--root", wal_root).stdout.splitlines()) == sorted(expected)

    # text mode describes the source and prints a per-shard table
    proc = cli("ingest", "-", "--root", wal_root, "--shards", "4", "--workers", "1", stdin=b"delta\n")
    assert "standard input (raw lines)" in proc.stdout_text
    assert re.search(r"^records\s+1$", proc.stdout_text, re.M)


def test_ingest_synthetic_with_periodic_checkpoints(wal_root):
    summary = ingest_synthetic(wal_root, 20000, "--checkpoint-every", "5000")
    assert summary["records"] == 20000
    assert sum(summary["per_shard"].values()) == 20000
    assert [int(v) for v in summary["per_shard"].values()] == summary["shard_next_ids"]
    assert [c.rsplit("-", 1)[1] for c in summary["checkpoints"]] == ["5000", "10000", "15000", "20000"]
    assert summary["compression_ratio"] > 1.5  # ledger JSON compresses with the default LZ4
    assert summary["bytes_on_disk"] > 0 and summary["segment_files"] == 4

    listed = cli_json("checkpoint", "list", "--root", wal_root)
    assert [c["id"] for c in listed] == summary["checkpoints"]
    assert [c["entries"] for c in listed] == [5000, 10000, 15000, 20000]
    assert all(c["shard_count"] == 4 and len(c["offsets"]) == 4 for c in listed)
    assert listed[-1]["offsets"] == summary["shard_next_ids"]
    for a, b in zip(listed, listed[1:]):
        assert all(x <= y for x, y in zip(a["offsets"], b["offsets"]))
        assert a["timestamp_ns"] <= b["timestamp_ns"]

    # the synthetic stream is deterministic and keyed by account
    entries = replay_json(wal_root)
    assert sorted(json.loads(e["data"])["seq"] for e in entries) == list(range(20000))
    for e in entries[:2000]:
        assert e["shard"] == route(json.loads(e["data"])["account"].encode(), 4)

    # a second run appends, gets its own checkpoints and a comparable compression ratio
    again = ingest_synthetic(wal_root, 20000, "--checkpoint-every", "5000")
    assert again["shard_next_ids"] == [2 * n for n in summary["shard_next_ids"]]
    assert len(set(again["checkpoints"]) | set(summary["checkpoints"])) == 8
    assert again["compression_ratio"] == pytest.approx(summary["compression_ratio"], rel=0.2)
    assert [c["entries"] for c in cli_json("checkpoint", "list", "--root", wal_root)][-1] == 40000


def test_ingest_runs_in_quick_succession_get_distinct_checkpoints(wal_root):
    """Checkpoint ids are never reused: back-to-back runs must not collide on their names."""
    names = []
    for _ in range(3):
        names += ingest_synthetic(wal_root, 10)["checkpoints"]
    assert len(set(names)) == 3
    assert [c["entries"] for c in cli_json("checkpoint", "list", "--root", wal_root)] == [10, 20, 30]


def test_ingest_runs_side_by_side_against_serve_get_distinct_checkpoints(wal_root, tmp_path):
    """Two ingest jobs started together attach to one `serve`; neither may fail on a reused checkpoint id."""
    serve = start_serve(tmp_path, wal_root)
    try:
        jobs = [Background(tmp_path, f"job{i}", "ingest", "--root", wal_root, "--shards", "4", "--records",
                           "300", "--json").start() for i in range(2)]
        for job in jobs:
            job.proc.wait(timeout=TIMEOUT)
            if job.proc.returncode == 1 and MQ_BUSY in job.stderr:  # could not attach: nothing written
                time.sleep(1.0)
                job.start().proc.wait(timeout=TIMEOUT)
        for job in jobs:
            assert job.proc.returncode == 0, f"{job.stdout}\n{job.stderr}"
        names = [c for job in jobs for c in json.loads(job.stdout)["checkpoints"]]
        assert len(names) == 2 and len(set(names)) == 2
        listed = cli_json("checkpoint", "list", "--root", wal_root)
        assert sorted(c["id"] for c in listed) == sorted(names)
        assert listed[-1]["entries"] == 600
    finally:
        serve.stop(signal.SIGTERM)


def test_bad_input_part_way_says_what_was_already_appended(wal_root, tmp_path):
    rows = [{"user": f"u{i % 10}", "i": i} for i in range(1500)]
    rows[1199] = {"name": "no user here"}
    path = os.path.join(str(tmp_path), "in.jsonl")
    write_jsonl(path, rows)
    line = usage_error("ingest", path, "--root", wal_root, "--key", "user", "--shards", "4", "--workers", "1",
                       "--batch", "500")
    assert "line 1200" in line and "1,000 records" in line
    assert sum(s["entries"] for s in cli_json("inspect", wal_root)["streams"]) == 1000
    assert cli_json("checkpoint", "list", "--root", wal_root) == []


def test_ingest_from_a_pipe_that_goes_quiet_appends_at_once_and_stops_on_sigterm(wal_root, tmp_path):
    """`tail -f log | ironwal-mp ingest -`: lines that came in are appended once the pipe goes
    quiet, not held until a batch of 1000 fills; SIGTERM stops it at once (it used to sit in its
    read until the batch filled or the pipe closed) with everything it read appended."""
    import ironwal_mp

    with open(os.path.join(str(tmp_path), "pipe.err"), "wb") as err, \
            open(os.path.join(str(tmp_path), "pipe.out"), "wb") as out:
        proc = subprocess.Popen(CMD + ["ingest", "-", "--root", wal_root, "--shards", "2", "--workers", "1",
                                       "--json"], stdin=subprocess.PIPE, stdout=out, stderr=err, env=_env())
    try:
        proc.stdin.write(b"a\nb\nc\n")
        proc.stdin.flush()
        wal = None
        deadline = time.monotonic() + 60
        while wal is None:  # (the coordinator ingest starts takes a moment)
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                wal = ironwal_mp.connect(wal_root)
            except Exception:
                time.sleep(0.05)
        with wal:
            def appended() -> int:
                return sum(s["next_id"] for s in wal.stats()["shards"])

            while appended() < 3:
                assert time.monotonic() < deadline, "lines from a quiet pipe were never appended"
                time.sleep(0.05)
            proc.stdin.write(b"d\n")  # a trickle: appended on its own too
            proc.stdin.flush()
            while appended() < 4:
                assert time.monotonic() < deadline, "a line that trickled in was never appended"
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the pipe stays open: its writer has not finished
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
    with open(os.path.join(str(tmp_path), "pipe.out"), "rb") as fh:
        summary = json.loads(fh.read())
    assert code == 143
    assert summary["records"] == 4 and summary["interrupted"] is True
    assert sorted(cli("replay", "--root", wal_root).stdout.splitlines()) == [b"a", b"b", b"c", b"d"]
    assert cli_json("checkpoint", "show", "latest", "--root", wal_root)["entries"] == 4


def test_ingest_from_a_pipe_reports_a_bad_line_after_appending_the_good_ones(wal_root):
    rows = b"".join(b'{"user": "u%d", "i": %d}\n' % (i % 3, i) for i in range(30)) + b"not json\n"
    line = usage_error("ingest", "-", "--format", "jsonl", "--key", "user", "--root", wal_root, "--shards", "2",
                       "--workers", "1", "--batch", "10", stdin=rows)
    assert "line 31" in line and "the 30 records before it were appended" in line
    assert sum(s["entries"] for s in cli_json("inspect", wal_root)["streams"]) == 30


@pytest.mark.parametrize("batch,sync", [("1", "strict"), ("1", "async"), ("7", "batch_only"), ("50", "strict")])
def test_ingest_batch_and_sync_paths(wal_root, tmp_path, batch, sync):
    rows = [{"k": f"key-{i % 13}", "i": i} for i in range(60)]
    path = os.path.join(str(tmp_path), "in.ndjson")  # the format is guessed from .ndjson
    lines = write_jsonl(path, rows)
    summary = cli_json("ingest", path, "--root", wal_root, "--key", "k", "--shards", "4", "--workers", "1",
                       "--batch", batch, "--sync", sync, "--checkpoint-every", "25")
    assert summary["records"] == 60
    # checkpoints land on the first batch boundary at or after each multiple of 25, plus one at the end
    assert len(summary["checkpoints"]) >= 2 and summary["checkpoints"][-1].endswith(("-end", "-60"))
    keys = [r["k"].encode() for r in rows]
    check_replay_matches(replay_json(wal_root), lines, keys, 4)
    assert cli("verify", wal_root).returncode == 0


# --- Ctrl-C during ingest -------------------------------------------------------------------------------


def interrupted_ingest(tmp_path, root: str, name: str, *extra: str, sig: int = signal.SIGINT):
    """Start a long synthetic ingest, stop it with `sig` once it has visibly progressed; (exit code, stdout, stderr)."""
    deadline = time.monotonic() + 90
    while True:
        bg = Background(tmp_path, name, "ingest", "--root", root, "--shards", "4", "--workers", "1",
                        "--records", "3000000", "--batch", "500", "--checkpoint-every", "1000", *extra).start()
        try:
            # the periodic progress line (every 2 s: stderr is not a terminal)
            progressed = time.monotonic() + 120
            while "ingest [" not in bg.stderr and bg.proc.poll() is None and time.monotonic() < progressed:
                time.sleep(0.05)
            if bg.proc.poll() is not None and MQ_BUSY in bg.stderr and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            assert bg.proc.poll() is None, f"ingest ended early ({bg.proc.returncode})\n{bg.stdout}\n{bg.stderr}"
            assert "ingest [" in bg.stderr, bg.stderr
            bg.proc.send_signal(sig)
            code = bg.proc.wait(timeout=TIMEOUT)
        finally:
            if bg.proc.poll() is None:
                bg.stop(signal.SIGKILL)
        out, err = bg.stdout, bg.stderr
        assert "Traceback" not in err, err
        said = "interrupt" if sig == signal.SIGINT else "SIGTERM"
        assert f"{said}: finishing the current batch" in err
        return code, out, err


def test_ctrl_c_during_ingest_keeps_exactly_what_was_acknowledged(wal_root, tmp_path):
    code, out, err = interrupted_ingest(tmp_path, wal_root, "ingest1")
    assert code == 130, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    m = re.search(r"^interrupted: ([\d,]+) records were appended and acknowledged", out, re.M)
    assert m, out
    n = int(m.group(1).replace(",", ""))
    assert 0 < n < 3_000_000 and n % 500 == 0  # whole batches only
    assert re.search(r"^records\s+%s$" % re.escape(m.group(1)), out, re.M)
    this_run = [int(r.group(1).replace(",", "")) for r in re.finditer(r"^\s*\d+\s+([\d,]+)\s+[\d,]+$", out, re.M)]
    assert len(this_run) == 4 and sum(this_run) == n  # the per-shard table

    latest = cli_json("checkpoint", "show", "latest", "--root", wal_root)
    assert latest["id"].endswith("-interrupted")
    assert latest["id"] in out
    assert latest["entries"] == n
    listed = cli_json("checkpoint", "list", "--root", wal_root)
    assert listed[-1]["id"] == latest["id"]
    # a checkpoint every 1000 records (half the batches: Ctrl-C often lands inside one), then the last
    assert [c["entries"] for c in listed[:-1]] == list(range(1000, n + 1, 1000))

    inspected = cli_json("inspect", wal_root)
    assert sum(s["entries"] for s in inspected["streams"]) == n
    assert [s["next_id"] for s in inspected["streams"]] == latest["offsets"]

    # exactly the first n records of the deterministic stream survived: none lost, none twice
    raw = cli("replay", "--root", wal_root).stdout.splitlines()
    assert len(raw) == n
    seqs = sorted(int(re.match(rb'\{"seq":(\d+),', ln).group(1)) for ln in raw)
    assert seqs == list(range(n))
    assert cli("verify", wal_root).returncode == 0
    assert cli("replay", "--root", wal_root, "--from-checkpoint", "latest").stdout == b""

    # a second run, with --json, stopped by SIGTERM (a service manager's stop): it ends the same
    # way, appends after the first run and says how far it got
    code, out, err = interrupted_ingest(tmp_path, wal_root, "ingest2", "--json", sig=signal.SIGTERM)
    assert code == 143, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    summary = json.loads(out)
    assert summary["interrupted"] is True and summary["checkpoints"][-1].endswith("-interrupted")
    n2 = summary["records"]
    assert n2 > 0 and sum(summary["per_shard"].values()) == n2
    after = cli_json("checkpoint", "show", "latest", "--root", wal_root)
    assert after["id"] == summary["checkpoints"][-1] and after["entries"] == n + n2
    assert after["offsets"] == summary["shard_next_ids"]
    assert len(replay_json(wal_root, "--from-checkpoint", latest["id"])) == n2


def test_a_stop_ends_an_ingest_whose_batches_the_ring_size_cuts_into_parts(wal_root, tmp_path):
    """A ring too small for a whole --batch per shard makes ingest append each batch in parts,
    and every part's flush leaves the record that overflowed it in hand. The loop stopped only
    with an empty batch in hand, so SIGTERM was acknowledged and the run went on to the end of
    its input."""
    code, out, err = interrupted_ingest(tmp_path, wal_root, "ingest1", "--json", "--ring-size", "16384",
                                        sig=signal.SIGTERM)
    assert code == 143, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    summary = json.loads(out)
    assert summary["interrupted"] is True and 0 < summary["records"] < 3_000_000
    latest = cli_json("checkpoint", "show", "latest", "--root", wal_root)
    assert latest["id"].endswith("-interrupted") and latest["entries"] == summary["records"]


def test_ingest_stopped_by_a_service_manager_still_checkpoints(wal_root, tmp_path):
    """systemd's default stop (KillMode=control-group) sends SIGTERM to every process of the
    service at once: ingest, its coordinator and the workers. The commit sells SIGTERM as 'a
    service manager's stop' that appends the batch in hand and writes a checkpoint; but the
    coordinator ingest started also stops on SIGTERM, so the final batch/checkpoint fails."""
    from ironwal_mp.ipc.names import processes_of

    bg = Background(tmp_path, "ingest", "ingest", "--root", wal_root, "--shards", "4", "--workers", "1",
                    "--records", "3000000", "--batch", "500", "--checkpoint-every", "1000").start()
    try:
        deadline = time.monotonic() + 120
        while "ingest [" not in bg.stderr and bg.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bg.proc.poll() is None, bg.stderr
        service = [bg.proc.pid] + [pid for pid, _ in processes_of(wal_root)]
        assert len(service) >= 3
        for pid in service:  # the control group's SIGTERM
            os.kill(pid, signal.SIGTERM)
        code = bg.proc.wait(timeout=TIMEOUT)
    finally:
        if bg.proc.poll() is None:
            bg.stop(signal.SIGKILL)
    assert code == 143, f"exit {code}\n--- stdout\n{bg.stdout}\n--- stderr\n{bg.stderr[-3000:]}"
    assert cli_json("checkpoint", "show", "latest", "--root", wal_root)["id"].endswith("-interrupted")


# --- serve, stats and checkpoints on a running WAL -----------------------------------------------------


APPENDER = """
import json, sys, ironwal_mp
root, n = sys.argv[1], int(sys.argv[2])
with ironwal_mp.connect(root) as wal:
    acks = [wal.append(b"acct-%d" % (i % 23), b"payment-%05d" % i) for i in range(n)]
print(json.dumps(acks))
"""


def test_serve_with_connected_jobs_stats_and_checkpoints(wal_root, tmp_path):
    serve = start_serve(tmp_path, wal_root, 4, "--flush-interval", "0.25", "--no-idle-flush")
    try:
        assert f"serving {os.path.abspath(wal_root)} with 4 shards (pid {serve.proc.pid})" in serve.stdout
        for _attempt in range(30):
            child = subprocess.run([PY, "-c", APPENDER, wal_root, "200"], capture_output=True, timeout=TIMEOUT,
                                   env=_env())
            if child.returncode == 0 or MQ_BUSY.encode() not in child.stderr:
                break
            time.sleep(1.0)  # could not attach (the machine's queue budget): nothing was appended
        assert child.returncode == 0, child.stderr.decode()
        acks = json.loads(child.stdout)
        counts = Counter(route(b"acct-%d" % (i % 23), 4) for i in range(200))
        assert [s for s, _ in acks] == [route(b"acct-%d" % (i % 23), 4) for i in range(200)]

        stats = cli_json("stats", "--root", wal_root, "--interval", "0.1")
        assert stats["shard_count"] == 4
        assert stats["coordinator_pid"] == serve.proc.pid
        assert stats["flush_interval"] == 0.25 and stats["idle_flush"] is False
        assert stats["root"] == os.path.abspath(wal_root)
        assert [s["shard"] for s in stats["shards"]] == [0, 1, 2, 3]
        for s in stats["shards"]:
            for field in ("next_id", "durable_id", "ring_fill", "ring_used", "ring_capacity", "appends_per_s",
                          "fsyncs_per_s", "fsync_avg_us", "state", "worker_pid"):
                assert field in s, field
            assert s["next_id"] == counts.get(s["shard"], 0)
            assert s["durable_id"] == s["next_id"]  # serve defaults to strict: every append fsynced
            assert 0.0 <= s["ring_fill"] <= 1.0
            assert s["state"] == "open"
        text = cli("stats", "--root", wal_root, "--interval", "0.1").stdout_text
        assert f"coordinator pid {serve.proc.pid}" in text and "appends/s" in text

        # --watch samples until Ctrl-C, then detaches
        watch = Background(tmp_path, "watch", "stats", "--root", wal_root, "--watch", "--interval", "0.1").start()
        watch.wait_for(lambda: watch.stdout.count("total:") >= 2, "two samples")
        code = watch.stop(signal.SIGINT)
        assert code == 130 and "aborted" in one_line(watch.stderr), watch.stderr

        created = cli_json("checkpoint", "create", "X", "--root", wal_root)
        assert created["id"] == "X" and created["entries"] == 200
        assert created["offsets"] == [counts.get(s, 0) for s in range(4)]
        again = cli("checkpoint", "create", "X", "--root", wal_root, expect=1)
        line = one_line(again.stderr_text)
        assert "already exists" in line and "X" in line
        assert again.stdout == b""

        # reads while it runs
        assert [c["id"] for c in cli_json("checkpoint", "list", "--root", wal_root)] == ["X"]
        assert len(replay_json(wal_root)) == 200

        # an ingest attaches to the running coordinator; the wrong shard count is refused
        usage_error("ingest", "-", "--root", wal_root, "--shards", "8", stdin=b"a\n")
        summary = cli_json("ingest", "-", "--root", wal_root, "--shards", "4", stdin=b"a\nb\n")
        assert summary["records"] == 2

        # a second serve of the directory is refused by LOCK: status 1, and no shut-down claimed
        second = cli("serve", "--root", wal_root, "--shards", "4", expect=1)
        assert b"stopped" not in second.stdout and "did not start" in second.stderr_text
        assert "WalLockedError" in second.stderr_text, second.stderr_text

        # repair refuses while serve holds the directory, naming the holder
        refused = cli("repair", wal_root, expect=1)
        line = one_line(refused.stderr_text)
        assert "refusing" in line and f"pid {serve.proc.pid}" in line
        assert refused.stdout == b""
        refused = cli("repair", wal_root, "--json", expect=1)  # stdout never carries non-JSON text
        assert refused.stdout == b"" and f"pid {serve.proc.pid}" in one_line(refused.stderr_text)
    finally:
        serve.stop(signal.SIGTERM)
    assert "Traceback" not in serve.stderr or "SignalError" in serve.stderr, serve.stderr

    # once stopped there is nothing to ask for stats
    proc = cli("stats", "--root", wal_root, expect=1)
    line = one_line(proc.stderr_text)
    assert "no coordinator is running" in line and os.path.abspath(wal_root) in line
    # ... and the data stayed: 202 entries, checkpoint X kept
    assert sum(s["entries"] for s in cli_json("inspect", wal_root)["streams"]) == 202
    assert cli("verify", wal_root).returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_a_signal(wal_root, tmp_path, sig):
    serve = start_serve(tmp_path, wal_root)
    code = serve.stop(sig)
    assert code == 0, f"serve exited {code} on {sig.name}\n--- stdout\n{serve.stdout}\n--- stderr\n{serve.stderr}"
    assert "stopped: rings drained" in serve.stdout
    assert "Traceback" not in serve.stderr, serve.stderr


def test_serve_refuses_a_shard_count_mismatch(wal_root):
    ingest_synthetic(wal_root, 100)
    line = usage_error("serve", "--root", wal_root, "--shards", "8")
    assert "shard count mismatch" in line


def test_stats_without_a_running_coordinator(wal_root, tmp_path):
    ingest_synthetic(wal_root, 100)  # a stopped WAL
    proc = cli("stats", "--root", wal_root, expect=1)
    line = one_line(proc.stderr_text)
    assert "no coordinator is running" in line
    assert proc.stdout == b""
    os.makedirs(os.path.join(str(tmp_path), "empty"))  # no WAL at all: a usage error, as the README says
    assert "is not a sharded WAL" in usage_error("stats", "--root", os.path.join(str(tmp_path), "empty"))


# --- checkpoints on a stopped WAL ----------------------------------------------------------------------


def test_checkpoint_commands_on_a_stopped_wal(wal_root):
    first = ingest_synthetic(wal_root, 4000, "--checkpoint-every", "1000")
    ids = first["checkpoints"]
    assert len(ids) == 4

    # empty of news: list/show read the log directly
    text = cli("checkpoint", "list", "--root", wal_root).stdout_text
    for cid in ids:
        assert cid in text
    shown = cli_json("checkpoint", "show", ids[0], "--root", wal_root)
    assert shown["id"] == ids[0] and shown["entries"] == 1000 and shown["shard_count"] == 4
    assert cli_json("checkpoint", "show", "latest", "--root", wal_root)["id"] == ids[-1]
    text = cli("checkpoint", "show", ids[1], "--root", wal_root).stdout_text
    assert f"checkpoint {ids[1]}" in text and "2,000 entries appended before it" in text

    missing = cli("checkpoint", "show", "no-such-checkpoint", "--root", wal_root, expect=1)
    assert "no-such-checkpoint" in one_line(missing.stderr_text)
    assert cli("checkpoint", "prune", "no-such-checkpoint", "--root", wal_root, expect=1).returncode == 1

    # create starts a coordinator for the call and stops it after
    created = cli_json("checkpoint", "create", "manual-1", "--root", wal_root)
    assert created["entries"] == 4000 and created["offsets"] == first["shard_next_ids"]
    dup = cli("checkpoint", "create", "manual-1", "--root", wal_root, expect=1)
    assert "already exists" in one_line(dup.stderr_text)
    assert cli_json("checkpoint", "show", "latest", "--root", wal_root)["id"] == "manual-1"

    # replay after a checkpoint: ids continue from its offsets
    after = replay_json(wal_root, "--from-checkpoint", ids[0])
    assert len(after) == 3000
    offsets0 = shown["offsets"]
    by_shard = defaultdict(list)
    for e in after:
        by_shard[e["shard"]].append(e["id"])
    for s, got in by_shard.items():
        assert got == list(range(offsets0[s], first["shard_next_ids"][s]))
    assert replay_json(wal_root, "--from-checkpoint", "latest") == []
    assert len(replay_json(wal_root, "--from-checkpoint", ids[2], "--shard", "1")) == \
        first["shard_next_ids"][1] - cli_json("checkpoint", "show", ids[2], "--root", wal_root)["offsets"][1]
    unknown = cli("replay", "--root", wal_root, "--from-checkpoint", "nope", expect=1)
    assert "nope" in one_line(unknown.stderr_text)

    pruned = cli_json("checkpoint", "prune", ids[1], "--root", wal_root)
    assert set(pruned) == {"shards_pruned", "segments_deleted"}

    compacted = cli_json("checkpoint", "compact", "--keep", "1", "--root", wal_root)
    assert compacted["checkpoints_before"] == 5 and compacted["checkpoints_after"] == 1
    assert compacted["bytes_reclaimed"] > 0
    assert [c["id"] for c in cli_json("checkpoint", "list", "--root", wal_root)] == ["manual-1"]
    gone = cli("checkpoint", "show", ids[0], "--root", wal_root, expect=1)
    assert ids[0] in one_line(gone.stderr_text)

    # more data after the kept checkpoint is exactly what replays after it
    second = ingest_synthetic(wal_root, 500)
    assert len(replay_json(wal_root, "--from-checkpoint", "manual-1")) == 500
    assert replay_json(wal_root, "--from-checkpoint", "latest") == []
    assert [c["id"] for c in cli_json("checkpoint", "list", "--root", wal_root)] == \
        ["manual-1"] + second["checkpoints"]
    assert cli("verify", wal_root).returncode == 0


def test_checkpoint_commands_on_an_empty_or_foreign_directory(wal_root, tmp_path):
    os.makedirs(wal_root)
    line = usage_error("checkpoint", "list", "--root", wal_root)
    assert "not a sharded WAL" in line
    line = usage_error("checkpoint", "create", "c1", "--root", wal_root)
    assert "not a sharded WAL" in line
    engine = os.path.join(str(tmp_path), "engine")
    write_engine_wal(engine, count=10)
    line = usage_error("checkpoint", "list", "--root", engine)
    assert "not a sharded WAL" in line
    line = usage_error("checkpoint", "list", "--root", os.path.join(str(tmp_path), "nowhere"))
    assert "not a directory" in line


def _set_manifest_count(root: str, count: int) -> None:
    path = os.path.join(root, "MANIFEST")
    with open(path) as fh:
        doc = json.load(fh)
    doc["shard_count"] = count
    with open(path, "w") as fh:
        json.dump(doc, fh)


def test_a_manifest_that_disagrees_with_the_shards_is_reported_not_trusted(wal_root):
    """A MANIFEST edited to fewer shards than the directory holds made verify say OK and replay
    leave shards out; one edited to more crashed replay --from-checkpoint (IndexError)."""
    summary = ingest_synthetic(wal_root, 400)
    _set_manifest_count(wal_root, 2)  # shard_02 and shard_03 would be left out of everything
    for args in (("verify", wal_root), ("replay", "--root", wal_root), ("inspect", wal_root),
                 ("checkpoint", "create", "c2", "--root", wal_root)):
        line = one_line(cli(*args, expect=1).stderr_text)
        assert "MANIFEST records 2 shards" in line and "shard_03" in line, line
    with pytest.raises(ManifestError, match="shard_03"):
        ShardedWal(WalOptions(root_path=wal_root), 2)

    _set_manifest_count(wal_root, 6)  # more is allowed (a shard's directory comes with its first use)
    proc = cli("verify", wal_root, expect=1)
    assert "records 4 shards, but the WAL has 6" in proc.stdout_text
    line = usage_error("replay", "--root", wal_root, "--from-checkpoint", "latest")
    assert "records 4 shards" in line and summary["checkpoints"][-1] in line
    assert len(replay_json(wal_root)) == 400  # every entry is still there


def test_small_usage_and_output_errors_are_one_line(wal_root, tmp_path):
    empty = os.path.join(str(tmp_path), "empty")
    os.makedirs(empty)
    assert "at most a day" in usage_error("stats", "--root", empty, "--interval", "1e10")  # (OverflowError)
    ingest_synthetic(wal_root, 100)
    with open("/dev/full", "wb") as full:  # stdout on a full disk: no traceback
        proc = subprocess.run(CMD + ["inspect", wal_root], stdout=full, stderr=subprocess.PIPE, timeout=TIMEOUT,
                              env=_env())
    assert proc.returncode == 1
    assert "No space left on device" in one_line(proc.stderr.decode())
    write_engine_wal(os.path.join(str(tmp_path), "lockdir"), count=3)
    lock = os.path.join(str(tmp_path), "lockdir", "LOCK")
    if os.path.exists(lock):
        os.unlink(lock)
    os.makedirs(lock)
    proc = cli("repair", os.path.join(str(tmp_path), "lockdir"), expect=1)
    assert "Is a directory" in one_line(proc.stderr_text)


def test_show_latest_without_checkpoints(wal_root):
    os.makedirs(wal_root)
    with open(os.path.join(wal_root, "MANIFEST"), "w") as fh:
        fh.write(json.dumps({"format": "ironwal_mp.sharded", "version": 1, "shard_count": 4, "router": "crc32-v1"}))
    proc = cli("checkpoint", "show", "latest", "--root", wal_root, expect=1)
    one_line(proc.stderr_text)
    assert cli_json("checkpoint", "list", "--root", wal_root) == []


# --- inspect ------------------------------------------------------------------------------------------


def test_inspect_sharded_engine_and_stream(wal_root, tmp_path):
    summary = ingest_synthetic(wal_root, 3000, "--checkpoint-every", "1000")
    doc = cli_json("inspect", wal_root)
    assert doc["kind"] == "sharded" and doc["shard_count"] == 4
    assert [s["name"] for s in doc["streams"]] == ["shard_00", "shard_01", "shard_02", "shard_03"]
    assert sum(s["entries"] for s in doc["streams"]) == 3000
    assert [s["next_id"] for s in doc["streams"]] == summary["shard_next_ids"]
    assert all(s["problems"] == [] and s["first_id"] == 0 for s in doc["streams"])
    assert sum(s["disk_bytes"] for s in doc["streams"]) == summary["bytes_on_disk"]
    assert doc["checkpoints"]["count"] == 3 and doc["checkpoints"]["latest"] == summary["checkpoints"][-1]
    assert [c["id"] for c in doc["checkpoints"]["list"]] == summary["checkpoints"]
    text = cli("inspect", wal_root).stdout_text
    assert "sharded WAL, 4 shards" in text and f"latest {summary['checkpoints'][-1]}" in text

    engine = os.path.join(str(tmp_path), "engine")
    values = write_engine_wal(engine, "events", 200)
    write_engine_wal(engine, "audit", 5)
    doc = cli_json("inspect", engine)
    assert doc["kind"] == "engine" and "shard_count" not in doc and doc["checkpoints"] == {}
    streams = {s["name"]: s for s in doc["streams"]}
    assert set(streams) == {"events", "audit"}
    ev = streams["events"]
    assert ev["entries"] == 200 and ev["first_id"] == 0 and ev["next_id"] == 200
    assert ev["segments"] > 1 and len(ev["segment_list"]) == ev["segments"]
    assert ev["raw_bytes"] >= sum(len(v) for v in values)
    assert streams["audit"]["entries"] == 5
    assert "engine WAL, 2 streams" in cli("inspect", engine).stdout_text

    doc = cli_json("inspect", os.path.join(engine, "events"))
    assert doc["kind"] == "stream" and [s["name"] for s in doc["streams"]] == ["events"]
    assert doc["streams"][0]["entries"] == 200
    assert "one stream" in cli("inspect", os.path.join(engine, "events")).stdout_text

    line = usage_error("inspect", os.path.join(str(tmp_path), "missing"))
    assert "not a directory" in line


def test_inspect_and_verify_the_rust_crate_fixtures(fixture_copy, fixtures_dir):
    with open(os.path.join(fixtures_dir, "expected.json")) as fh:
        expected = json.load(fh)
    core = fixture_copy("core")
    doc = cli_json("inspect", core)
    assert doc["kind"] == "engine"
    streams = {s["name"]: s for s in doc["streams"]}
    assert set(streams) == set(expected["core"]["streams"])
    for name, exp in expected["core"]["streams"].items():
        got = streams[name]
        assert (got["first_id"], got["next_id"]) == (exp["first_id"], exp["next_id"]), name
        assert got["entries"] == len(exp["entries"])
        assert [layout.segment_name(s["start_id"]) for s in got["segment_list"]] == exp["segment_files"]
    assert (streams["ledger"]["first_id"], streams["ledger"]["next_id"]) == (58, 300)
    assert streams["batches"]["lz4_frames"] == streams["batches"]["frames"] > 0
    assert streams["mixed"]["lz4_frames"] == 0
    assert cli_json("verify", core)["ok"] is True
    assert "ledger" in cli("inspect", core).stdout_text

    ledger = cli_json("inspect", os.path.join(core, "ledger"))
    assert ledger["kind"] == "stream" and ledger["streams"][0]["first_id"] == 58

    sharded = fixture_copy("sharded")
    doc = cli_json("inspect", sharded)
    assert doc["kind"] == "sharded" and doc["shard_count"] == 4
    assert [s["next_id"] for s in doc["streams"]] == [s["next_id"] for s in expected["sharded"]["shards"]]
    assert sum(s["entries"] for s in doc["streams"]) == 400
    ck = doc["checkpoints"]
    assert ck["count"] == 2 and ck["latest"] == "ckpt-400"
    assert [(c["id"], c["offsets"]) for c in ck["list"]] == \
        [(c["user_id"], c["offsets"]) for c in expected["sharded"]["checkpoints"]]
    listed = cli_json("checkpoint", "list", "--root", sharded)
    assert [c["timestamp_ns"] for c in listed] == [c["timestamp_as_stored"] for c in expected["sharded"]["checkpoints"]]
    assert cli_json("checkpoint", "show", "ckpt-200", "--root", sharded)["entries"] == 200
    verified = cli_json("verify", sharded)
    assert verified["ok"] is True and verified["entries"] == 400 and verified["streams"] == 4


def test_replay_the_rust_crate_sharded_fixture(wal_root, fixture_copy, fixtures_dir):
    import shutil

    with open(os.path.join(fixtures_dir, "expected.json")) as fh:
        expected = json.load(fh)["sharded"]
    shutil.copytree(fixture_copy("sharded"), wal_root)
    entries = replay_json(wal_root, "--from-checkpoint", "ckpt-200")
    assert len(entries) == 200
    for e in entries:
        assert bytes.fromhex(expected["shards"][e["shard"]]["entries_hex"][e["id"]]) == e["data"].encode()
    firsts = {}
    for e in entries:
        firsts.setdefault(e["shard"], e["id"])
    assert firsts == dict(enumerate(expected["checkpoints"][0]["offsets"]))
    assert replay_json(wal_root, "--from-checkpoint", "latest") == []

    # prune before ckpt-400: segment 0 of every shard goes (the fixture has 4 KiB segments)
    pruned = cli_json("checkpoint", "prune", "ckpt-400", "--root", wal_root)
    assert pruned == {"shards_pruned": 4, "segments_deleted": 4}
    kept = {}
    for e in replay_json(wal_root):  # ids stay the real ids: each shard now starts at 87
        kept.setdefault(e["shard"], []).append(e["id"])
        assert bytes.fromhex(expected["shards"][e["shard"]]["entries_hex"][e["id"]]) == e["data"].encode()
    assert kept == {s: list(range(87, sh["next_id"])) for s, sh in enumerate(expected["shards"])}
    assert [e["id"] for e in replay_json(wal_root, "--from-checkpoint", "ckpt-200", "--shard", "0")][:1] == [87]
    doc = cli_json("inspect", wal_root)
    assert [s["first_id"] for s in doc["streams"]] == [87] * 4
    assert cli("verify", wal_root).returncode == 0


# --- verify and repair -----------------------------------------------------------------------------------


def test_verify_finds_a_torn_tail_and_repair_mends_it(wal_root):
    summary = ingest_synthetic(wal_root, 3000, "--batch", "100")
    assert cli("verify", wal_root).stdout_text.rstrip().endswith("OK")
    clean = cli_json("verify", wal_root)
    assert clean["ok"] is True and clean["entries"] == 3000 and clean["problems"] == []
    # entries after the last checkpoint, as a crash leaves them (a frame torn below a checkpoint
    # would be a loss of checkpointed entries: verify reports that too, see the next test)
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 4) as wal:
        key = next(k for k in (b"tail-%d" % i for i in range(1000)) if wal.shard_for(k) == 0)
        wal.append_batch_for_key(key, [b"tail"] * 5)

    stream = os.path.join(wal_root, "shard_00")
    seg = segment_paths(stream)[-1]
    frames = frame_offsets(seg)
    last_off, last_count = frames[-1]
    assert last_count == 5
    with open(seg, "r+b") as fh:
        fh.truncate(last_off + HEADER_SIZE + 3)  # a torn write: header and a few payload bytes

    proc = cli("verify", wal_root, expect=1)
    problem = [ln for ln in proc.stdout_text.splitlines() if ln.startswith("PROBLEM")]
    assert len(problem) == 1 and f"{seg} at offset {last_off}" in problem[0], proc.stdout_text
    assert "1 problem(s)" in proc.stdout_text
    doc = cli_json("verify", wal_root, expect=1)
    assert doc["ok"] is False
    assert [(p["path"], p["offset"]) for p in doc["problems"]] == [(seg, last_off)]

    rep = cli("repair", wal_root)
    repaired = [ln for ln in rep.stdout_text.splitlines() if ln.startswith("repaired")]
    assert repaired and repaired[0].startswith("repaired shard_00: cut"), rep.stdout_text
    assert f"{os.path.basename(seg)}" in rep.stdout_text or str(last_off) in rep.stdout_text
    m = re.search(r"cut bytes kept in (\S+?)\)", rep.stdout_text)
    assert m, rep.stdout_text
    side = m.group(1) if os.path.isabs(m.group(1)) else os.path.join(stream, m.group(1))
    assert os.path.exists(side) and layout.BROKEN_SUFFIX in side
    assert os.path.getsize(side) == HEADER_SIZE + 3
    assert os.path.getsize(seg) == last_off

    assert cli("verify", wal_root).returncode == 0
    doc = cli_json("inspect", wal_root)
    shard0 = doc["streams"][0]
    assert shard0["next_id"] == summary["shard_next_ids"][0]
    assert shard0["side_files"] == [os.path.basename(side)]
    again = cli("repair", wal_root)
    assert "nothing to repair" in again.stdout_text
    # the WAL opens again and keeps going from the cut
    more = ingest_synthetic(wal_root, 100)
    assert more["shard_next_ids"][0] >= shard0["next_id"]
    assert cli("verify", wal_root).returncode == 0


def test_verify_finds_checkpointed_entries_that_are_gone(wal_root, tmp_path):
    """Every frame left may be sound while entries a checkpoint recorded are gone: a shard
    directory removed, a segment's files removed, a shard cut at a frame boundary."""
    import shutil

    ingest_synthetic(wal_root, 3000, "--batch", "100")
    cases = {}
    for name in ("shard-removed", "segments-removed", "cut-at-a-frame"):
        copy = os.path.join(str(tmp_path), name)
        shutil.copytree(wal_root, copy)
        cases[name] = copy
    shutil.rmtree(os.path.join(cases["shard-removed"], "shard_02"))
    for seg in segment_paths(os.path.join(cases["segments-removed"], "shard_01")):
        os.remove(seg)
    seg = segment_paths(os.path.join(cases["cut-at-a-frame"], "shard_00"))[-1]
    frames = frame_offsets(seg)  # (how many the last segment holds depends on the workers' drains)
    with open(seg, "r+b") as fh:
        fh.truncate(frames[-min(2, len(frames))][0])  # whole frames gone, nothing torn
    for name, root in cases.items():
        proc = cli("verify", root, expect=1)
        assert "recorded it reaching" in proc.stdout_text and "entries were lost" in proc.stdout_text, (name, proc.stdout_text)
        assert cli_json("verify", root, expect=1)["ok"] is False


def test_repair_waits_for_workers_that_outlive_their_coordinator(wal_root, tmp_path):
    """A coordinator killed outright leaves its workers draining for a moment, writing the shard
    files without LOCK. repair used to go ahead beside them ("nothing to repair") as soon as LOCK
    was free; now it waits for them as the next start does."""
    from ironwal_mp.ipc.names import processes_of

    serve = start_serve(tmp_path, wal_root, 2)
    workers = [pid for pid, _ in processes_of(wal_root, roles=("workers",))]
    assert workers
    repair = None
    try:
        for pid in workers:  # (held so that the window stays open for the test)
            os.kill(pid, signal.SIGSTOP)
        serve.stop(signal.SIGKILL)
        repair = Background(tmp_path, "repair", "repair", wal_root).start()
        time.sleep(1.0)
        assert repair.proc.poll() is None, f"repair ran beside live workers\n{repair.stdout}\n{repair.stderr}"
        for pid in workers:
            os.kill(pid, signal.SIGCONT)  # they see their coordinator gone, drain and exit
        assert repair.proc.wait(timeout=60) == 0, repair.stderr
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")
                    and open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"]
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if repair is not None and repair.proc.poll() is None:
            repair.stop(signal.SIGKILL)
    assert cli("verify", wal_root).returncode == 0


def test_verify_finds_sealed_damage_that_repair_cannot_mend(tmp_path):
    root = os.path.join(str(tmp_path), "engine")
    write_engine_wal(root, "events", 200)
    stream = os.path.join(root, "events")
    segments = segment_paths(stream)
    assert len(segments) >= 3
    sealed = segments[1]
    frames = frame_offsets(sealed)
    off = frames[2][0]
    with open(sealed, "r+b") as fh:  # flip one bit inside the third frame's payload
        fh.seek(off + HEADER_SIZE + 4)
        b = fh.read(1)
        fh.seek(off + HEADER_SIZE + 4)
        fh.write(bytes([b[0] ^ 0x10]))
    assert cli("verify", os.path.join(str(tmp_path), "nowhere"), expect=2).returncode == 2

    proc = cli("verify", root, expect=1)
    problem = [ln for ln in proc.stdout_text.splitlines() if ln.startswith("PROBLEM")]
    assert len(problem) == 1, proc.stdout_text
    assert f"{sealed} at offset {off}" in problem[0] and "CRC" in problem[0]
    doc = cli_json("verify", root, expect=1)
    assert [(p["path"], p["offset"]) for p in doc["problems"]] == [(sealed, off)]
    # the stream directory alone finds the same
    assert cli_json("verify", stream, expect=1)["problems"] == doc["problems"]

    rep = cli("repair", root, expect=1)
    lines = [ln for ln in rep.stdout_text.splitlines() if ln.startswith("NOT REPAIRED")]
    assert len(lines) == 1 and sealed in lines[0] and f"offset {off}" in lines[0], rep.stdout_text
    doc = cli_json("repair", root, expect=1)
    assert len(doc["remaining_problems"]) == 1 and doc["changes"] == []
    cli("verify", root, expect=1)
    with open(sealed, "rb") as fh:  # repair never rewrites a sealed segment
        fh.seek(off + HEADER_SIZE + 4)
        assert fh.read(1) == bytes([b[0] ^ 0x10])


def test_verify_finds_a_damaged_checkpoint_log_and_repair_cuts_it(wal_root):
    summary = ingest_synthetic(wal_root, 3000, "--checkpoint-every", "1000")
    log = os.path.join(wal_root, "checkpoints.log")
    size = os.path.getsize(log)
    with open(log, "ab") as fh:
        fh.write(b"half a record")  # a torn append
    proc = cli("verify", wal_root, expect=1)
    assert f"PROBLEM {log}" in proc.stdout_text and f"offset {size}" in proc.stdout_text
    doc = cli_json("verify", wal_root, expect=1)
    assert [(p["path"], p["offset"]) for p in doc["problems"]] == [(log, size)]  # (the offset was null)
    rep = cli("repair", wal_root)
    assert "repaired checkpoints.log: cut 13 bytes" in rep.stdout_text
    assert os.path.getsize(log) == size
    assert cli("verify", wal_root).returncode == 0
    assert [c["id"] for c in cli_json("checkpoint", "list", "--root", wal_root)] == summary["checkpoints"]


def test_a_damaged_first_checkpoint_record_is_not_listed_as_no_checkpoints(wal_root):
    """A flipped bit in the first of three records: `checkpoint list` said "no checkpoints"
    with exit 0 and inspect showed nothing amiss; repair cut the two intact records behind it
    without saying so."""
    summary = ingest_synthetic(wal_root, 3000, "--checkpoint-every", "1000")
    log = os.path.join(wal_root, "checkpoints.log")
    with open(log, "r+b") as fh:
        fh.seek(20)
        byte = fh.read(1)
        fh.seek(20)
        fh.write(bytes([byte[0] ^ 0x10]))
    proc = cli("checkpoint", "list", "--root", wal_root, expect=1)
    assert "no checkpoints" in proc.stdout_text
    line = one_line(proc.stderr_text)
    assert "damaged at offset 0" in line and "2 intact record(s) past it are not listed" in line
    proc = cli("checkpoint", "list", "--root", wal_root, "--json", expect=1)
    assert json.loads(proc.stdout) == []
    assert "PROBLEM checkpoints.log: damaged at offset 0" in cli("inspect", wal_root).stdout_text
    rep = cli("repair", wal_root).stdout_text
    assert "checkpoints.log.broken; they hold 2 intact record(s)" in rep, rep
    assert cli_json("checkpoint", "list", "--root", wal_root) == []
    assert len(summary["checkpoints"]) == 3


def test_verify_reports_a_bad_index_file_and_repair_rebuilds_it(tmp_path):
    root = os.path.join(str(tmp_path), "engine")
    write_engine_wal(root, "events", 100)
    idx = os.path.join(root, "events", layout.SEGMENTS_IDX)
    os.remove(idx)
    proc = cli("verify", root, expect=1)
    assert f"PROBLEM {idx}: missing or unreadable" in proc.stdout_text
    rep = cli("repair", root)
    assert "repaired events:" in rep.stdout_text
    assert os.path.exists(idx)
    assert cli("verify", root).returncode == 0


def test_verify_reports_an_index_whose_segment_files_are_gone(tmp_path):
    root = os.path.join(str(tmp_path), "engine")
    write_engine_wal(root, "events", 100)
    stream = os.path.join(root, "events")
    for name in os.listdir(stream):
        if layout.parse_segment_name(name) is not None:
            os.remove(os.path.join(stream, name))
    proc = cli("verify", root, expect=1)
    assert f"PROBLEM {os.path.join(stream, layout.SEGMENTS_IDX)}: lists segments" in proc.stdout_text
    assert "no segment file exists" in proc.stdout_text


def test_verify_and_inspect_report_a_segment_that_cannot_be_read(fixture_copy):
    """A segment name taken by a directory was a traceback with no output."""
    root = fixture_copy("core")
    stream = os.path.join(root, "ledger")
    seg = os.path.join(stream, sorted(n for n in os.listdir(stream) if layout.parse_segment_name(n) is not None)[1])
    os.unlink(seg)
    os.mkdir(seg)
    proc = cli("verify", root, expect=1)
    assert "Traceback" not in proc.stderr_text
    assert f"PROBLEM {seg}:" in proc.stdout_text and "unreadable" in proc.stdout_text
    proc = cli("inspect", root, "--json")  # (inspect describes; only verify's exit says "problems")
    assert "Traceback" not in proc.stderr_text
    report = json.loads(proc.stdout)
    assert any(p["path"] == seg for s in report["streams"] for p in s["problems"]), report


def test_verify_reports_hint_files_and_segment_names_it_cannot_read_and_checks_the_rest(fixture_copy):
    """A directory where segments.idx should be made verify and inspect stop at an OSError,
    with no report of the other streams; a FIFO named like a segment or hint file made them
    (and an open) wait forever for a writer. Now each is a problem, and the rest is checked."""
    root = fixture_copy("core")
    ledger, mixed = os.path.join(root, "ledger"), os.path.join(root, "mixed")
    idx = os.path.join(ledger, layout.SEGMENTS_IDX)
    os.unlink(idx)
    os.mkdir(idx)
    fifo = os.path.join(mixed, layout.segment_name(999_999))
    os.mkfifo(fifo)
    head = os.path.join(mixed, layout.HEAD_STATE)
    os.unlink(head)
    os.mkfifo(head)
    doc = cli_json("verify", root, expect=1, timeout=60)
    got = {p["path"]: p["reason"] for p in doc["problems"]}
    assert {idx, fifo, head} <= set(got), got  # (and mixed's segments.idx, which lacks the FIFO's name)
    assert "not a regular file" in got[fifo] and got[idx].startswith("unreadable")
    assert doc["entries"] > 0 and doc["streams"] == len(os.listdir(root))
    report = cli_json("inspect", root, timeout=60)
    assert {idx, fifo, head} <= {p["path"] for s in report["streams"] for p in s["problems"]}
    # repair refuses, naming the file (nothing waits): the first stream's, then the next's
    for odd in (idx, fifo):
        line = one_line(cli("repair", root, expect=1, timeout=60).stderr_text)
        assert f" at {odd} failed: " in line and "not a regular file" in line, line
        (os.rmdir if odd == idx else os.unlink)(odd)
    os.unlink(head)
    cli("repair", root, timeout=60)
    assert cli_json("verify", root, timeout=60)["ok"]



@pytest.mark.parametrize("name", ["MANIFEST", "HEAD", "checkpoints.log"])
def test_a_fifo_named_like_a_sharded_roots_file_is_an_error_not_a_wait(fixture_copy, name):
    """A FIFO in the place of MANIFEST, HEAD or checkpoints.log made verify, and a ShardedWal's
    start (the coordinator reads all three), wait forever for a writer. Now a read refuses a
    file that is not a regular one, naming it."""
    from ironwal_mp.engine.checkpoint_log import CheckpointLog
    from ironwal_mp.errors import WalIOError
    from ironwal_mp.sharded.manifest import read_manifest

    root = fixture_copy("sharded")
    path = os.path.join(root, name)
    if os.path.exists(path):
        os.unlink(path)
    os.mkfifo(path)
    err = cli("verify", root, expect=1, timeout=60).stderr_text
    assert "not a regular file" in err and path in err, err
    if name == "MANIFEST":
        with pytest.raises(ManifestError, match="unreadable: not a regular file"):
            read_manifest(root)
    else:
        with pytest.raises(WalIOError, match="not a regular file") as info:
            CheckpointLog(root, repair=False)
        assert info.value.path == path

def test_verify_keeps_its_verdict_when_its_reader_stops_early(tmp_path):
    """`verify | head -1` printed a PROBLEM line and exited 0: the closed pipe was taken for
    success. The verdict, reached before the report is written, is the exit status."""
    root = str(tmp_path / "w")
    with Wal(WalOptions(root_path=root, sync_mode=SyncMode.ASYNC)) as wal:
        for i in range(400):
            wal.append(f"s{i:03d}", b"x")
    for i in range(400):
        with open(os.path.join(root, f"s{i:03d}", layout.segment_name(0)), "ab") as fh:
            fh.write(b"junkjunk")
    for args in (["verify", root], ["verify", root, "--json"]):
        proc = subprocess.Popen(CMD + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        first = proc.stdout.readline()
        proc.stdout.close()  # (as `head -1` does)
        proc.stderr.read()
        assert proc.wait(TIMEOUT) == 1, (args, first)


# --- usage errors: exit 2 and one clear line -------------------------------------------------------------


def test_usage_errors_of_ingest(wal_root, tmp_path):
    tmp = str(tmp_path)
    path = os.path.join(tmp, "events.jsonl")
    write_jsonl(path, [{"user": "a", "v": 1}, {"name": "b", "v": 2}, {"user": "c"}])

    line = usage_error("ingest", path, "--root", wal_root, "--shards", "4")
    assert "--key" in line and "jsonl" in line
    assert not os.path.exists(wal_root), "a usage error found before starting must not create the WAL"

    line = usage_error("ingest", path, "--root", wal_root, "--key", "user", "--shards", "4", "--workers", "1")
    assert "line 2" in line and "'user'" in line

    bad = os.path.join(tmp, "bad.jsonl")
    with open(bad, "wb") as fh:
        fh.write(b'{"user": "a"}\n{"user": \n')
    line = usage_error("ingest", bad, "--root", wal_root, "--key", "user", "--shards", "4", "--workers", "1")
    assert "line 2" in line and "not valid JSON" in line
    nested = os.path.join(tmp, "nested.jsonl")
    write_jsonl(nested, [{"user": {"id": 1}}])
    line = usage_error("ingest", nested, "--root", wal_root, "--key", "user", "--shards", "4", "--workers", "1")
    assert "line 1" in line and "not a string or number" in line

    missing = os.path.join(tmp, "does-not-exist.jsonl")
    line = usage_error("ingest", missing, "--root", wal_root, "--key", "user")
    assert missing in line and "No such file" in line
    line = usage_error("ingest", tmp, "--root", wal_root, "--format", "raw")  # a directory is not readable input
    assert "cannot read" in line

    csv_path = os.path.join(tmp, "rows.csv")
    with open(csv_path, "w") as fh:
        fh.write("id,account\n1,a\n")
    line = usage_error("ingest", csv_path, "--root", wal_root, "--key", "acct", "--shards", "4", "--workers", "1")
    assert "'acct'" in line and "account" in line
    line = usage_error("ingest", csv_path, "--root", wal_root, "--shards", "4")
    assert "--key" in line

    for opt, value in (("--batch", "0"), ("--batch", "-5"), ("--checkpoint-every", "0"), ("--shards", "0"),
                       ("--shards", "1001"), ("--workers", "0")):
        line = usage_error("ingest", "--root", wal_root, "--records", "10", opt, value)
        assert opt.lstrip("-") in line
    line = usage_error("ingest", path, "--root", wal_root, "--key", "user", "--records", "10")
    assert "--records" in line

    proc = cli("ingest", path, "--root", wal_root, "--format", "xml", expect=2)  # argparse's own error
    assert "invalid choice: 'xml'" in proc.stderr_text and "--format" in proc.stderr_text
    proc = cli("ingest", "--root", wal_root, "--sync", "sometimes", expect=2)
    assert "--sync" in proc.stderr_text
    proc = cli("ingest", "--root", wal_root, "--shards", "many", expect=2)
    assert "--shards" in proc.stderr_text


def test_shard_count_mismatch_is_a_usage_error(wal_root, tmp_path):
    first = cli_json("ingest", "--root", wal_root, "--records", "200", "--workers", "1")  # default: 16 shards
    assert len(first["per_shard"]) == 16
    line = usage_error("ingest", "--root", wal_root, "--records", "10", "--shards", "8", "--workers", "1")
    assert "shard count mismatch" in line and "16" in line and "8" in line
    line = usage_error("ingest", "-", "--root", wal_root, "--shards", "8", "--workers", "1", stdin=b"x\n")
    assert "shard count mismatch" in line
    # nothing was added by the refused runs
    assert sum(s["entries"] for s in cli_json("inspect", wal_root)["streams"]) == 200
    assert cli_json("inspect", wal_root)["shard_count"] == 16


def test_usage_errors_of_other_commands(wal_root, tmp_path):
    nowhere = os.path.join(str(tmp_path), "nowhere")
    for args in (["inspect", nowhere], ["verify", nowhere], ["repair", nowhere],
                 ["replay", "--root", nowhere], ["checkpoint", "show", "latest", "--root", nowhere]):
        line = usage_error(*args)
        assert "not a directory" in line, args
    proc = cli("replay", "--root", wal_root, "--shard", "x", expect=2)
    assert "--shard" in proc.stderr_text
    proc = cli("checkpoint", "frobnicate", expect=2)
    assert "invalid choice" in proc.stderr_text
    proc = cli("serve", "--root", wal_root, expect=2)
    assert "--shards" in proc.stderr_text
    assert "--shards" in usage_error("serve", "--root", wal_root, "--shards", "0")
    assert "--ring-size" in usage_error("serve", "--root", wal_root, "--shards", "4", "--ring-size", "1000")
    assert "--flush-interval" in usage_error("serve", "--root", wal_root, "--shards", "4", "--flush-interval", "0")
    assert not os.path.exists(wal_root)
    ingest_synthetic(wal_root, 10)
    assert "empty" in usage_error("checkpoint", "create", "", "--root", wal_root)



@pytest.mark.parametrize("args, usage", [
    (["replay", "{d}"], "usage: ironwal-mp replay "),
    (["stats", "{d}"], "usage: ironwal-mp stats "),
    (["checkpoint", "list", "{d}"], "usage: ironwal-mp checkpoint list "),
    (["checkpoint", "show", "latest", "{d}"], "usage: ironwal-mp checkpoint show "),
    (["ingest", "in.jsonl", "{d}"], "usage: ironwal-mp ingest "),
])
def test_a_directory_given_without_root_is_refused_with_the_commands_own_usage(tmp_path, capsys, args, usage):
    # inspect, verify and repair take the directory as an argument, the others as --root: a
    # directory given the first way to the others was refused with the top-level usage only
    argv = [a.format(d=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert f"unrecognized arguments: {tmp_path} (the WAL directory is given with --root, as in --root {tmp_path})" in err
    assert os.listdir(tmp_path) == []


def test_an_unknown_option_is_refused_with_the_commands_own_usage(capsys):
    with pytest.raises(SystemExit):
        cli_main(["checkpoint", "compact", "--frob"])
    err = capsys.readouterr().err
    assert err.startswith("usage: ironwal-mp checkpoint compact ")
    assert err.rstrip().endswith("unrecognized arguments: --frob")

# --- review: what the commands refuse, and reads that never change files -----------------------


def test_sharded_commands_refuse_directories_that_hold_something_else(wal_root, tmp_path):
    tmp = str(tmp_path)
    engine = os.path.join(tmp, "engine")
    write_engine_wal(engine, "orders", 20)
    listing = sorted(os.listdir(engine))
    line = usage_error("ingest", "--root", engine, "--shards", "2", "--records", "10")
    assert "is an engine WAL (streams orders)" in line
    line = usage_error("serve", "--root", os.path.join(engine, "orders"), "--shards", "2")
    assert f"is one stream of the WAL at {engine}" in line
    afile = os.path.join(tmp, "afile")
    open(afile, "w").close()
    for cmd in (["serve", "--root", afile, "--shards", "2"], ["ingest", "--root", afile, "--records", "1"]):
        assert "is not a directory" in usage_error(*cmd)
    assert sorted(os.listdir(engine)) == listing, "a refused command wrote into the engine WAL"

    other = os.path.join(tmp, "notes")
    os.makedirs(other)
    open(os.path.join(other, "todo.txt"), "w").close()
    for cmd in ("verify", "inspect", "repair"):
        assert "holds no WAL" in usage_error(cmd, other)
    assert os.listdir(other) == ["todo.txt"], "repair left a LOCK in a directory that holds no WAL"


@pytest.mark.parametrize("args, says", [
    (["checkpoint", "compact", "--keep", "0"], "--keep must be at least 1"),
    (["stats", "--interval", "-1"], "--interval must be a positive number"),
    (["ingest", "--records", "-5"], "--records must be at least 0"),
    (["ingest", "--batch", "0", "--records", "5"], "--batch must be at least 1"),
    (["ingest", "--checkpoint-every", "0", "--records", "5"], "--checkpoint-every must be at least 1"),
])
def test_numbers_out_of_range_are_usage_errors(wal_root, args, says):
    assert says in usage_error(*args, "--root", wal_root)
    assert not os.path.exists(wal_root)


def _file_crcs(root):
    out = {}
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = zlib.crc32(fh.read())
    return out


def test_replay_of_a_damaged_stopped_wal_refuses_and_changes_nothing(wal_root):
    ingest_synthetic(wal_root, 2000, shards=2)
    seg = segment_paths(os.path.join(wal_root, "shard_00"))[0]
    with open(seg, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    before = _file_crcs(wal_root)
    proc = cli("replay", "--root", wal_root, expect=1)
    assert proc.stdout == b"" and "CorruptionError" in proc.stderr_text and "repair" in proc.stderr_text
    assert _file_crcs(wal_root) == before, "replay changed the files"


def test_replay_of_a_stopped_wal_with_a_torn_checkpoint_record_refuses_and_changes_nothing(wal_root, fixture_copy):
    root = fixture_copy("sharded")  # (the crate's own output: a stopped WAL with checkpoints)
    with open(os.path.join(root, "checkpoints.log"), "ab") as fh:
        fh.write(b"CKPT\x01\x02")  # a torn record header
    before = _file_crcs(root)
    proc = cli("replay", "--root", root, "--shard", "0", expect=1)
    assert proc.stdout == b"" and "checkpoints.log" in proc.stderr_text and "repair" in proc.stderr_text
    assert _file_crcs(root) == before, "replay cut the checkpoint log"


def test_replay_of_a_stopped_wal_with_only_stale_index_files_goes_ahead(wal_root):
    """A crash mid-rotation can leave segments.idx and head.state behind the segment files:
    verify reports it, but recovery rebuilds both from the files and cuts nothing, so replay
    starts the WAL and prints every entry (and verify is clean afterwards)."""
    ingest_synthetic(wal_root, 2000, shards=2)
    expected = cli("replay", "--root", wal_root).stdout
    assert len(expected.splitlines()) == 2000
    stream = os.path.join(wal_root, "shard_01")
    with open(os.path.join(stream, "segments.idx"), "wb") as fh:
        fh.write(b"\x00" * 5)  # unreadable
    with open(os.path.join(stream, "head.state"), "wb") as fh:
        fh.write(b"junk")
    assert cli("verify", wal_root, expect=1).returncode == 1
    assert cli("replay", "--root", wal_root).stdout == expected
    assert cli("verify", wal_root).returncode == 0


def test_replay_refuses_a_stopped_wal_whose_newest_segment_file_is_gone(wal_root):
    """The commit says lost segment files are still refused. But when the newest segment file
    is gone, segments.idx lists it and head.state names it, and both findings carry
    rebuildable=True (the same findings a crash mid-rotation leaves, where the files are
    *ahead* of the index). replay then starts the WAL, recovery rewrites both index files
    from what is left, and `verify` is clean afterwards: the loss is no longer detectable."""
    from ironwal_mp import ShardedWal, WalOptions
    from ironwal_mp.cli.replay import _refuse_if_damaged
    from ironwal_mp.errors import CorruptionError
    from ironwal_mp.engine import layout
    from ironwal_mp.engine.audit import audit_stream

    wal = ShardedWal(WalOptions(root_path=wal_root, max_segment_size=4096), 2, workers=1, ring_size=1 << 16)
    try:
        for i in range(600):
            wal.append(b"key-%d" % i, b"v" * 40)
    finally:
        wal.close()
    stream = os.path.join(wal_root, "shard_01")
    starts = layout.list_segments(stream)
    assert len(starts) >= 3
    os.unlink(os.path.join(stream, layout.segment_name(starts[-1])))  # the newest file is lost

    problems = audit_stream(stream).problems
    assert problems, "the audit does not see the lost file at all"
    assert any(not getattr(p, "rebuildable", False) for p in problems), \
        f"a lost newest segment is reported as rebuildable only: {[str(p) for p in problems]}"
    with pytest.raises(CorruptionError):
        _refuse_if_damaged(wal_root)


def test_a_byte_order_mark_is_not_kept_in_the_first_json_record():
    import io

    from ironwal_mp.cli.sources import read_jsonl

    data = b'\xef\xbb\xbf{"id": "a", "n": 1}\n{"id": "b", "n": 2}\n'
    assert list(read_jsonl(io.BytesIO(data), "id")) == [(b"a", b'{"id": "a", "n": 1}'), (b"b", b'{"id": "b", "n": 2}')]


def test_csv_with_a_byte_order_mark_and_csv_that_is_not_utf8(wal_root, tmp_path):
    good = os.path.join(str(tmp_path), "bom.csv")
    with open(good, "wb") as fh:
        fh.write(b"\xef\xbb\xbfid,name\n1,a\n2,b\n")
    summary = cli_json("ingest", good, "--root", wal_root, "--key", "id", "--shards", "2", "--workers", "1")
    assert summary["records"] == 2
    bad = os.path.join(str(tmp_path), "bad.csv")
    with open(bad, "wb") as fh:
        fh.write(b"id,name\n1,\xff\xfe\n")
    line = usage_error("ingest", bad, "--root", wal_root, "--key", "id", "--shards", "2", "--workers", "1")
    assert "not UTF-8" in line


def test_default_batches_of_large_records_are_split_to_fit_the_rings(wal_root, tmp_path):
    path = os.path.join(str(tmp_path), "big.jsonl")
    write_jsonl(path, [{"id": "same-key", "pad": "x" * 1200, "n": i} for i in range(2000)])
    summary = cli_json("ingest", path, "--root", wal_root, "--key", "id", "--shards", "1", "--workers", "1",
                       "--checkpoint-every", "500")
    assert summary["records"] == 2000  # 2000 x 1.2 KB in one shard: more than one ring per batch
    assert [json.loads(e["data"])["n"] for e in replay_json(wal_root)] == list(range(2000))
    # periodic checkpoints still come (the batches were flushed early, never at full size)
    ids = [c["id"] for c in cli_json("checkpoint", "list", "--root", wal_root)]
    counts = [int(i.rsplit("-", 1)[1]) for i in ids[:-1]]
    assert len(counts) == 3 and all(c >= 500 * (k + 1) for k, c in enumerate(counts)), ids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_stats_watch_ends_when_the_wal_stops(wal_root, tmp_path, sig):
    serve = start_serve(tmp_path, wal_root, 2)
    try:
        watch = Background(tmp_path, "stats", "stats", "--root", wal_root, "--watch", "--interval", "0.2").start()
        watch.wait_for(lambda: "total:" in watch.stdout, "a first sample")
    finally:
        serve.stop(sig)
    try:
        assert watch.proc.wait(60) == 1
        assert "has stopped" in watch.stderr or "WalClosedError" in watch.stderr, watch.stderr
    finally:
        if sig == signal.SIGKILL:  # the next open clears what the killed coordinator left
            from _sharded_procs import wait_gone

            wait_gone(wal_root)
            ShardedWal(WalOptions(root_path=wal_root), 2, workers=1).close()


def test_verify_of_an_engine_root_with_no_entries_yet(tmp_path):
    root = os.path.join(str(tmp_path), "fresh")
    with Wal(WalOptions(root_path=root)) as wal:
        wal.open_stream("a")
    assert cli("verify", root).stdout_text.rstrip().endswith("OK")


def test_replay_shard_out_of_range_is_refused_before_the_wal_is_started(wal_root, tmp_path, monkeypatch):
    import ironwal_mp.cli.replay as replay_cmd
    from ironwal_mp.cli.main import main

    path = os.path.join(str(tmp_path), "in.jsonl")
    write_jsonl(path, [{"id": "k%d" % i} for i in range(10)])
    cli_json("ingest", path, "--root", wal_root, "--key", "id", "--shards", "2", "--workers", "1")
    line = usage_error("replay", "--root", wal_root, "--shard", "2")
    assert "--shard 2 is out of range (0..1)" in line

    def no_start(*a, **kw):
        raise AssertionError("the WAL was started for a shard it does not have")

    monkeypatch.setattr(replay_cmd, "open_sharded", no_start)
    assert main(["replay", "--root", wal_root, "--shard", "2"]) == 2


def test_verify_audits_again_a_stream_that_changed_under_it(tmp_path, monkeypatch, capsys):
    """Beside a live writer, verify reported a segment deleted after it was listed. A problem
    found while the directory changed is checked again; one found on still files is reported."""
    import ironwal_mp.cli.audit as audit_cmd
    from ironwal_mp import Wal, WalOptions
    from ironwal_mp.cli.main import main
    from ironwal_mp.engine.audit import Problem, StreamAudit

    with Wal(WalOptions(root_path=str(tmp_path / "w"))) as wal:
        wal.append("s", b"x")
    real, calls = audit_cmd.audit_stream, []

    def racing(stream_dir, **kw):
        calls.append(stream_dir)
        if len(calls) == 1:  # as if a writer appended while the audit read
            os.utime(os.path.join(stream_dir, "00000000000000000000.wal"), ns=(1, 1))
            return StreamAudit("s", stream_dir, problems=[Problem(stream_dir, None, "listed and gone")])
        return real(stream_dir, **kw)

    monkeypatch.setattr(audit_cmd, "audit_stream", racing)
    assert main(["verify", str(tmp_path / "w")]) == 0 and len(calls) == 2
    assert "OK" in capsys.readouterr().out

    calls.clear()
    monkeypatch.setattr(audit_cmd, "audit_stream",
                        lambda d, **kw: calls.append(d) or StreamAudit("s", d, problems=[Problem(d, 0, "bad")]))
    assert main(["verify", str(tmp_path / "w")]) == 1 and len(calls) == 1


def test_repair_keeps_a_ring_holding_records_the_files_lack_and_says_so(wal_root, tmp_path):
    """Records acknowledged (ASYNC) into a ring whose workers died with the coordinator before
    writing them: repair removes the dead run's other IPC objects but keeps that ring, with a
    NOTE, and the next start writes the records. replay, which starts the WAL, waits for them
    (it read only what the files held yet, losing some in 4 runs of 6; the race is not forced)."""
    from ironwal_mp import SyncMode, connect
    from ironwal_mp.ipc.names import processes_of

    serve = start_serve(tmp_path, wal_root, 2)
    workers = [pid for pid, _ in processes_of(wal_root, roles=("workers",))]
    try:
        for pid in workers:  # (between passes: a stopped worker holds no ring lock for long)
            os.kill(pid, signal.SIGSTOP)
        wal = connect(wal_root, sync_mode=SyncMode.ASYNC)
        acked = [wal.append(b"k%d" % i, b"v%d" % i) for i in range(3000)]
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        serve.stop(signal.SIGKILL)
        try:
            wal.close()
        except Exception:
            pass  # (its coordinator is gone: the handle may say so)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    rep = cli("repair", wal_root)
    notes = [ln for ln in rep.stdout_text.splitlines() if ln.startswith("NOTE")]
    shards = sorted({s for s, _ in acked})
    assert [f"shard_{s:02d}" in n for s, n in zip(shards, notes)] == [True] * len(shards), rep.stdout_text
    assert all("kept for the next start" in n for n in notes)
    got = {(e["shard"], e["id"]): e["data"] for e in replay_json(wal_root)}
    assert got == {a: "v%d" % i for i, a in enumerate(acked)}


@pytest.mark.parametrize("command", [["replay"], ["checkpoint", "list"], ["ingest", "--records", "10"]])
def test_a_closed_standard_output_is_refused_before_anything_is_done(tmp_path, command):
    # `ironwal-mp ... >&-`: Python gives such a process no sys.stdout at all
    root = os.path.join(str(tmp_path), "wal")
    proc = subprocess.run(CMD + command + ["--root", root], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          preexec_fn=lambda: os.close(1), timeout=TIMEOUT, env=_env())
    assert proc.returncode == 2
    assert "standard output is closed" in one_line(proc.stderr.decode())
    assert not os.path.exists(root)


def test_a_stream_directory_given_as_root_is_named_as_one(tmp_path):
    root = os.path.join(str(tmp_path), "engine")
    write_engine_wal(root, count=2)
    stream = os.path.join(root, "events")
    for command in (["replay"], ["checkpoint", "list"], ["stats"]):
        line = usage_error(*command, "--root", stream)
        assert f"{stream} is one stream of the WAL at {root}" in line, line


def test_replay_json_of_a_pruned_shard_numbers_entries_from_the_first_kept_id(tmp_path):
    """--json numbers entries by the ids iter_shard gives with them, so entries of a shard
    whose first segments were pruned keep their own ids."""
    root = str(tmp_path / "wal")
    opts = WalOptions(root_path=root, sync_mode=SyncMode.STRICT, max_segment_size=4096)
    with ShardedWal(opts, 1, workers=1) as wal:
        for i in range(60):  # (one frame each: segments of about 8)
            wal.append(b"k", b"v%03d" % i + b"." * 500)
        wal.create_checkpoint(b"half")
        wal.append_batch([(b"k", b"w%03d" % i) for i in range(5)])
        assert wal.prune_before_checkpoint(b"half").segments_deleted > 0
        first = wal.first_id(0)
    assert 0 < first <= 60
    docs = replay_json(root)
    assert [d["id"] for d in docs] == list(range(first, 65))
    assert docs[0]["data"].startswith("v%03d" % first) and docs[-1]["data"] == "w004"
