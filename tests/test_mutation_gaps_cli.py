"""Tests from a mutation audit of the command line (ironwal_mp/cli/): behaviour the rest of the
suite left unpinned, mostly checked by calling the CLI modules' functions in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading

import pytest

from ironwal_mp import errors as E
from ironwal_mp.cli import locate, main as cli, output, sources
from ironwal_mp.cli.main import main as cli_main
from ironwal_mp.cli.live import IDLE, Feed, is_live
from ironwal_mp.cli.output import Progress, UsageError


# --- cli/sources.py -----------------------------------------------------------------------------


@pytest.mark.parametrize("path, fmt", [
    (None, "raw"), ("-", "raw"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.json", "jsonl"),
    ("A.JSONL", "jsonl"), ("a.csv", "csv"), ("dir.csv/a.CSV", "csv"), ("a.log", "raw"), ("jsonl", "raw"),
])
def test_the_format_is_taken_from_the_file_name(path, fmt):
    assert sources.guess_format(path) == fmt


def test_json_lines_skip_blank_lines_but_count_them_and_keep_each_line_as_the_value():
    data = b'{"k": "a"}\r\n\n   \n{"k": 7, "x": [1]}\n{"k": 2.5}\n{"k": true}\n{"x": 1}\n'
    got = sources.read_jsonl(io.BytesIO(data), "k")
    assert [next(got) for _ in range(4)] == [
        (b"a", b'{"k": "a"}'), (b"7", b'{"k": 7, "x": [1]}'), (b"2.5", b'{"k": 2.5}'), (b"true", b'{"k": true}'),
    ]
    with pytest.raises(UsageError, match=r"^line 7: no field 'k' to route by"):  # (blank lines counted)
        next(got)


@pytest.mark.parametrize("line, says", [
    (b'["k", 1]', "no field 'k'"),
    (b'"k"', "no field 'k'"),
    (b'{"k": null}', "not a string or number"),
    (b'{"k": [1]}', "not a string or number"),
    (b'{"k": {"a": 1}}', "not a string or number"),
])
def test_json_lines_without_a_usable_key_are_refused(line, says):
    with pytest.raises(UsageError, match=r"^line 2: .*" + says):
        list(sources.read_jsonl(io.BytesIO(b'{"k": "ok"}\n' + line + b"\n"), "k"))


def test_csv_rows_are_stored_as_json_objects_and_an_empty_input_has_none():
    data = b"id,name\r\n1,a\r\n2,\"b, c\"\r\n"
    assert list(sources.read_csv(io.BytesIO(data), "name")) == [
        (b"a", b'{"id":"1","name":"a"}'), (b"b, c", b'{"id":"2","name":"b, c"}'),
    ]
    assert list(sources.read_csv(io.BytesIO(b""), "name")) == []


def test_csv_errors_name_the_line():
    with pytest.raises(UsageError, match=r"^line 3: no value in column 'name'"):
        list(sources.read_csv(io.BytesIO(b"id,name\n1,a\n2\n"), "name"))
    with pytest.raises(UsageError, match=r"^not UTF-8 text, near line 1 \(CSV input must be UTF-8\)$"):
        list(sources.read_csv(io.BytesIO(b"id,na\xffme\n1,a\n"), "name"))  # (in the header)
    with pytest.raises(UsageError, match=r"column\(s\) 'a', 'b' more than once"):
        list(sources.read_csv(io.BytesIO(b"b,a,k,a,b\n1,2,3,4,5\n"), "k"))
    with pytest.raises(UsageError, match=r"no column 'k' to route by \(columns: id, name\)"):
        list(sources.read_csv(io.BytesIO(b"id,name\n1,2\n"), "k"))


def test_csv_that_is_not_utf8_is_reported_at_the_line_that_holds_the_bad_byte():
    lines = [b"id,name"] + [b"%d,name-%d" % (i, i) for i in range(1, 1000)]
    lines[899] += b"\xff"  # (line 900 of the file)
    with pytest.raises(UsageError) as exc:
        list(sources.read_csv(io.BytesIO(b"\n".join(lines) + b"\n"), "name"))
    near = int(re.search(r"near line (\d+)", str(exc.value)).group(1))
    assert near == 900, str(exc.value)


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_csv_lines_end_as_csv_expects_whatever_the_ending(ending):
    """The CSV reader decodes line by line (so a bad byte is placed): each of the three line
    endings still ends a row, a quoted field keeps the newlines inside it, a byte-order mark is
    not part of the first column's name, and a row with a bad byte is placed on its own line."""
    data = ending.join([b"\xef\xbb\xbfid,name", b'1,"two' + ending + b'lines"', b"2,b", b""])
    rows = [json.loads(value) for _, value in sources.read_csv(io.BytesIO(data), "name")]
    assert rows == [{"id": "1", "name": "two" + ending.decode() + "lines"}, {"id": "2", "name": "b"}]
    with pytest.raises(UsageError, match=r"near line 5 "):
        list(sources.read_csv(io.BytesIO(data + b"3,\xff" + ending), "name"))


def test_raw_lines_are_their_own_key_and_value():
    assert list(sources.read_raw(io.BytesIO(b"a\r\n\nb c\n\r\nlast"))) == [(b"a", b"a"), (b"b c", b"b c"),
                                                                           (b"last", b"last")]


def test_the_synthetic_ledger_is_deterministic_and_keyed_by_account():
    records = list(sources.synthetic_ledger(3000))
    assert records == list(sources.synthetic_ledger(3000))
    assert len(records) == 3000
    t0 = json.loads(records[0][1])["ts_ms"]
    for i, (key, value) in enumerate(records):
        event = json.loads(value)
        assert event["account"].encode() == key
        assert event["seq"] == i and event["ts_ms"] == t0 + 3 * i
        assert 1 <= event["amount_cents"] < 500_000
        assert re.fullmatch(r"tx-[0-9a-f]{8}", event["ref"])
        assert event["kind"] in sources.KINDS
    accounts = {json.loads(v)["account"] for _, v in sources.synthetic_ledger(30000)}
    assert all(a.startswith("acct-") and int(a[5:]) < 5000 for a in accounts)
    assert len(accounts) > 2500


# --- cli/output.py ------------------------------------------------------------------------------


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (-2048, "-2.0 KiB"),
    (1024 ** 2 - 1, "1024.0 KiB"), (5 * 1024 ** 3, "5.0 GiB"), (3 * 1024 ** 4, "3.0 TiB"), (2048 * 1024 ** 4, "2048.0 TiB"),
])
def test_sizes(n, text):
    assert output.size(n) == text


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999.4, "999"), (1000, "1.0k"), (12345, "12.3k"), (999_999, "1000.0k"), (1_000_000, "1.00M"),
    (2_345_678, "2.35M"),
])
def test_rates(n, text):
    assert output.rate(n) == text


def test_a_table_aligns_numbers_right_and_text_left_under_a_rule():
    out = io.StringIO()
    output.table([["alpha", "1,234", "x"], ["b", "5", "longer text"], ["c", "1.5x"]], header=["name", "count", "note"],
                 out=out)
    assert out.getvalue().splitlines() == [
        "name   count  note",
        "-----  -----  -----------",
        "alpha  1,234  x",
        "b          5  longer text",
        "c       1.5x",
    ]
    out = io.StringIO()
    output.table([["a", "10%"], ["bbb", "5%"]], out=out)
    assert out.getvalue() == "a    10%\nbbb   5%\n"
    out = io.StringIO()
    output.table([["1.2.3", "x"], ["10.5", "y"], ["longer-id", "z"]], out=out)  # (one dot makes a number)
    assert out.getvalue().splitlines() == ["1.2.3      x", "     10.5  y", "longer-id  z"]
    out = io.StringIO()
    output.table([], out=out)
    assert out.getvalue() == ""


def test_json_output_is_indented_and_sorted_or_one_line():
    out = io.StringIO()
    output.emit_json({"b": b"\xab", "a": [b"text"]}, out)
    assert out.getvalue() == '{\n  "a": [\n    "text"\n  ],\n  "b": "ab"\n}\n'
    out = io.StringIO()
    output.emit_json({"b": 1, "a": None}, out, line=True)
    output.emit_json([1], out, line=True)
    assert out.getvalue() == '{"a": null, "b": 1}\n[1]\n'
    with pytest.raises(TypeError):
        output.emit_json({"a": object()}, io.StringIO())


def test_emit_json_writes_to_standard_output_by_default(capsys):
    output.emit_json({"a": 1}, line=True)
    assert capsys.readouterr().out == '{"a": 1}\n'
    out = io.StringIO()
    output.lines(["x", "y"], out=out)
    assert out.getvalue() == "x\ny\n"


def test_bytes_fields_and_how_they_are_shown():
    assert output.bytes_field("id", None) == {"id": None}
    assert output.bytes_field("id", b"abc") == {"id": "abc"}
    assert output.bytes_field("id", b"\xab\xcd") == {"id_hex": "abcd"}
    assert output.shown_field({"id": "abc"}, "id") == "abc"
    assert output.shown_field({"id_hex": "abcd"}, "id") == "b'\\xab\\xcd'"
    assert output.shown_field({"id": None}, "id") == "-"
    assert output.shown_field({}, "id") == "-"


def test_tables_follow_a_redirected_standard_output(fixture_copy):
    core = fixture_copy("core")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["inspect", core]) == 0
    text = buf.getvalue()
    assert "engine WAL, 3 streams" in text
    assert re.search(r"^stream +segments", text, re.M), "the table went to the stdout of import time"


class _Tty(io.StringIO):
    """A terminal that records what had been written at each flush."""

    def __init__(self):
        super().__init__()
        self.flushed = []

    def isatty(self):
        return True

    def flush(self):
        self.flushed.append(self.getvalue())


class _Clock:
    """A stand-in for the ``time`` module in cli/output.py: the progress line's clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_a_progress_line_that_is_not_on_a_terminal_is_written_every_few_seconds(monkeypatch):
    clock = _Clock(100.0)
    monkeypatch.setattr(output, "time", clock)
    out = io.StringIO()
    p = Progress("ingest", out=out)
    clock.now = 101.0
    p.update(1000)
    assert out.getvalue() == ""  # (the first plain line comes after `every`, 2 s)
    clock.now = 102.0
    p.update(1000, 2 * 1048576)
    assert out.getvalue() == "ingest: 2,000 records  1.0k/s  1.0 MB/s  2.0s\n"
    clock.now = 103.0
    p.update(1)
    assert out.getvalue().count("\n") == 1
    p.update(force=True)
    assert out.getvalue().splitlines()[1] == "ingest: 2,001 records  667/s  0.7 MB/s  3.0s"
    p.done()  # (not a terminal: no last line)
    assert out.getvalue().count("\n") == 2
    clock.now = 104.5
    assert p.elapsed == 4.5
    assert (p.count, p.bytes) == (2001, 2 * 1048576)


def test_a_progress_line_on_a_terminal_is_redrawn_in_place_with_a_bar(monkeypatch):
    clock = _Clock(100.0)
    monkeypatch.setattr(output, "time", clock)
    out = _Tty()
    p = Progress("load", total=200, out=out, unit="rows")
    clock.now = 100.5
    p.update(50)  # (on a terminal the first update is drawn at once)
    first = out.getvalue()
    assert first == "\r\x1b[2Kload [######                  ]  25.0%  50/200 rows  100/s  0.5s"
    assert out.flushed[-1] == first  # (a line without a newline shows only once flushed)
    clock.now = 100.55
    p.update(400)  # (drawn at most every 0.1 s; past the total the bar stops full)
    assert out.getvalue() == first
    clock.now = 101.0
    p.done()
    assert out.getvalue() == first + "\r\x1b[2Kload [########################] 100.0%  450/200 rows  450/s  1.0s\n"
    assert out.flushed[-1] == out.getvalue()


# --- cli/live.py --------------------------------------------------------------------------------


def _take(feed, limit: int = 200, until_idle: bool = True):
    """Up to ``limit`` items of ``feed``, up to and with its first IDLE if ``until_idle`` (a
    feed that never ends fails the test, not hangs it)."""
    got = []
    for item in feed:
        got.append(item)
        if len(got) >= limit or (until_idle and item is IDLE):
            break
    return got


def _wait_for(cond, what: str):
    done = threading.Event()
    for _ in range(1000):  # a hang guard, not a time check
        if cond():
            return
        done.wait(0.01)
    pytest.fail(f"never happened: {what}")


def test_is_live_only_for_what_is_not_a_regular_file(tmp_path):
    regular = tmp_path / "in" / "a.jsonl"
    regular.parent.mkdir()
    regular.write_bytes(b"x\n")
    fifo = tmp_path / "in" / "pipe"
    os.mkfifo(fifo)
    assert is_live(str(regular)) is False
    assert is_live(str(fifo)) is True
    assert is_live(str(tmp_path / "in" / "missing")) is False  # (the source says what is wrong)
    saved = os.dup(0)
    try:
        with open(regular, "rb") as fh:
            os.dup2(fh.fileno(), 0)
        assert is_live("-") is False and is_live(None) is False
        r, w = os.pipe()
        os.dup2(r, 0)
        os.close(r)
        os.close(w)
        assert is_live("-") is True and is_live(None) is True
    finally:
        os.dup2(saved, 0)
        os.close(saved)


def test_a_feed_yields_every_record_in_order_then_ends_and_its_stop_returns_nothing_more():
    records = [(b"k%d" % i, b"v%d" % i) for i in range(50)]
    feed = Feed(records, idle_s=5, ahead=3, signals=())
    assert _take(feed) == records
    assert feed.stop() == []


def test_a_feed_says_idle_when_the_input_goes_quiet_and_goes_on_when_it_resumes():
    more = threading.Event()

    def records():
        yield b"a", b"1"
        yield b"b", b"2"
        more.wait(60)
        yield b"c", b"3"

    feed = Feed(records(), idle_s=0.01, ahead=10, signals=())
    it = iter(feed)
    assert [next(it), next(it)] == [(b"a", b"1"), (b"b", b"2")]
    assert next(it) is IDLE
    assert next(it) is IDLE
    more.set()
    assert [x for x in _take(it, until_idle=False) if x is not IDLE] == [(b"c", b"3")]
    assert feed.stop() == []


def test_a_feed_hands_on_each_record_and_the_end_of_its_input_at_once():
    first, end = threading.Event(), threading.Event()

    def records():
        first.wait(60)
        yield b"a", b"1"
        end.wait(60)

    feed = Feed(records(), idle_s=5, ahead=10, signals=())
    it = iter(feed)
    threading.Timer(0.05, first.set).start()
    assert next(it) == (b"a", b"1")  # (not an IDLE first: a record wakes the taker)
    threading.Timer(0.05, end.set).start()
    assert list(it) == []  # (nor before the end)
    feed.stop()


def test_stop_returns_what_was_read_and_not_taken_up_to_the_end_of_the_input():
    records = [(b"k", b"%d" % i) for i in range(5)]
    before = set(_input_threads())
    feed = Feed(records, idle_s=30, ahead=10, signals=())
    for reader in set(_input_threads()) - before:
        reader.join(10)  # (it has read all, and the end)
    assert feed.stop() == records


def _input_threads():
    return [t for t in threading.enumerate() if t.name == "ironwal-mp ingest input"]


def test_a_stopped_feed_lets_its_reader_go_when_it_was_waiting_for_room():
    before = set(_input_threads())
    produced = []

    def records():
        for i in range(100):
            produced.append(i)
            yield b"k", b"%d" % i

    feed = Feed(records(), idle_s=30, ahead=2, signals=())
    (reader,) = set(_input_threads()) - before
    _wait_for(lambda: len(produced) >= 2, "the reader filled its read-ahead")
    assert len(feed.stop()) == 2
    reader.join(10)  # a hang guard
    assert not reader.is_alive()


def test_a_feed_raises_the_inputs_error_after_the_records_before_it():
    def records():
        yield b"a", b"1"
        raise UsageError("line 2: bad")

    feed = Feed(records(), idle_s=30, ahead=10, signals=())
    it = iter(feed)
    assert next(it) == (b"a", b"1")
    with pytest.raises(UsageError, match="line 2: bad"):
        next(it)
    feed.stop()


@pytest.mark.parametrize("ahead, limit", [(0, 1), (1, 1), (4, 4)])
def test_a_feed_reads_at_most_ahead_records_beyond_what_was_taken_and_stop_returns_them(ahead, limit):
    produced = []

    def records():
        for i in range(100):
            produced.append(i)
            yield b"k", b"%d" % i

    feed = Feed(records(), idle_s=30, ahead=ahead, signals=())
    _wait_for(lambda: len(produced) >= limit, "the reader read ahead")
    threading.Event().wait(0.1)  # (it would read on now if it were let)
    assert len(produced) == limit
    it = iter(feed)
    assert next(it) == (b"k", b"0")
    rest = feed.stop()
    assert [int(v) for _, v in rest] == list(range(1, len(rest) + 1))
    assert limit - 1 <= len(rest) <= 2 * limit


@pytest.mark.parametrize("ahead", [1, 8])
def test_a_feed_reads_on_once_what_it_read_ahead_is_taken(ahead):
    records = [(b"k", b"%d" % i) for i in range(40)]
    feed = Feed(iter(records), idle_s=5, ahead=ahead, signals=())
    assert _take(feed) == records  # (the reader blocked at `ahead` must be let go on)
    feed.stop()


def test_the_feeds_thread_leaves_the_stop_signals_to_the_main_thread():
    import signal

    seen = []

    def records():
        seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        yield b"a", b"1"

    feed = Feed(records(), idle_s=30, ahead=4, signals=(signal.SIGUSR1, signal.SIGUSR2))
    assert _take(feed) == [(b"a", b"1")]
    feed.stop()
    assert {signal.SIGUSR1, signal.SIGUSR2} <= seen[0]
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


# --- cli/locate.py ------------------------------------------------------------------------------


def _engine_root(base) -> str:
    """An engine WAL's root by its files alone: one stream, ``orders``, with an index file."""
    root = os.path.join(str(base), "engine")
    os.makedirs(os.path.join(root, "orders"))
    open(os.path.join(root, "orders", "segments.idx"), "wb").close()
    os.makedirs(os.path.join(root, "notes"))  # (a directory without a stream's files is none)
    return root


def test_locate_tells_sharded_engine_and_stream_paths_apart(tmp_path, fixture_copy):
    sharded = fixture_copy("sharded")
    target = locate.locate(sharded)
    assert (target.kind, target.root, target.shard_count) == ("sharded", sharded, 4)
    assert target.streams == ["shard_00", "shard_01", "shard_02", "shard_03"]
    engine = _engine_root(tmp_path)
    assert locate.locate(engine) == locate.Target("engine", engine, ["orders"])
    assert locate.locate(os.path.join(engine, "orders")) == locate.Target("stream", engine, ["orders"])
    # a root with only a checkpoint log is a sharded WAL with no shards yet, not an engine one
    bare = os.path.join(str(tmp_path), "bare")
    os.makedirs(bare)
    open(os.path.join(bare, "checkpoints.log"), "wb").close()
    assert locate.locate(bare) == locate.Target("sharded", bare, [], 0)


def test_locate_refuses_what_holds_no_wal_unless_told_otherwise(tmp_path):
    base = os.path.join(str(tmp_path), "d")
    os.makedirs(os.path.join(base, "empty"))
    with pytest.raises(UsageError, match="is not a directory"):
        locate.locate(os.path.join(base, "missing"))
    empty = os.path.join(base, "empty")
    with pytest.raises(UsageError, match="holds no WAL"):
        locate.locate(empty)
    assert locate.locate(empty, allow_other=True) == locate.Target("engine", empty, [])
    open(os.path.join(empty, "LOCK"), "wb").close()  # (an engine root opened before any entry)
    assert locate.locate(empty) == locate.Target("engine", empty, [])


def test_sharded_root_names_what_it_was_given_instead(tmp_path, fixture_copy):
    sharded = fixture_copy("sharded")
    assert locate.sharded_root(sharded) == sharded
    engine = _engine_root(tmp_path)
    with pytest.raises(UsageError, match=r"is one stream of the WAL at .*engine, not a WAL's root"):
        locate.sharded_root(os.path.join(engine, "orders"))
    with pytest.raises(UsageError, match=r"engine is not a sharded WAL"):
        locate.sharded_root(engine)
    with pytest.raises(UsageError, match=r"^\S*d is not a sharded WAL"):
        os.makedirs(os.path.join(str(tmp_path), "d"))
        locate.sharded_root(os.path.join(str(tmp_path), "d"))


def test_check_sharded_root_says_why_without_the_options_prefix(tmp_path):
    engine = _engine_root(tmp_path)
    with pytest.raises(UsageError) as exc:
        locate.check_sharded_root(engine)
    assert str(exc.value).startswith(f"{engine} is an engine WAL (streams orders)")
    afile = os.path.join(str(tmp_path), "afile")
    open(afile, "w").close()
    with pytest.raises(UsageError, match="is not a directory"):
        locate.check_sharded_root(afile)
    locate.check_sharded_root(os.path.join(str(tmp_path), "new"))  # (missing: fine)


def test_open_sharded_refuses_a_stopped_root_that_is_no_sharded_wal(wal_root, tmp_path):
    os.makedirs(wal_root)
    engine = _engine_root(wal_root)
    with pytest.raises(UsageError, match="is not a sharded WAL"):
        locate.open_sharded(engine)
    bare = os.path.join(wal_root, "bare")
    os.makedirs(bare)
    open(os.path.join(bare, "checkpoints.log"), "wb").close()
    with pytest.raises(UsageError, match="is not a sharded WAL"):
        locate.open_sharded(bare)
    from ironwal_mp.errors import WalClosedError

    with pytest.raises(WalClosedError):
        locate.open_sharded(bare, start=False)
    assert os.listdir(bare) == ["checkpoints.log"]


# --- cli/main.py --------------------------------------------------------------------------------


def _parsed(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_the_documented_defaults():
    a = _parsed("ingest")
    assert (a.root, a.shards, a.sync, a.batch, a.records, a.input, a.format, a.key) == \
        ("./wal_data", 16, "async", 1000, None, None, None, None)
    a = _parsed("serve", "--root", "r", "--shards", "2")
    assert (a.sync, a.workers, a.ring_size, a.flush_interval, a.no_idle_flush) == ("strict", None, None, None, False)
    assert _parsed("checkpoint", "compact").keep == 10
    a = _parsed("stats")
    assert (a.interval, a.watch, a.json) == (1.0, False, False)
    a = _parsed("replay")
    assert (a.from_checkpoint, a.shard, a.json) == (None, None, False)
    for command in ("inspect", "verify", "repair"):
        a = _parsed(command)
        assert (a.path, a.json) == ("./wal_data", False)
    for argv in (["checkpoint", "list"], ["checkpoint", "compact"], ["checkpoint", "show", "x"], ["ingest"]):
        assert _parsed(*argv).json is False
    for argv in (["replay"], ["stats"], ["checkpoint", "list"], ["checkpoint", "show", "latest"]):
        assert _parsed(*argv).root == "./wal_data"


@pytest.mark.parametrize("argv", [
    ["ingest", "--shards", "1"], ["ingest", "--shards", "1000"], ["ingest", "--records", "0"],
    ["ingest", "--batch", "1"], ["ingest", "--checkpoint-every", "1"], ["checkpoint", "compact", "--keep", "1"],
    ["stats", "--interval", "86400"], ["stats", "--interval", "0.001"], ["ingest", "--ring-size", "4096"],
    ["serve", "--root", "r", "--shards", "1000"],
])
def test_numbers_at_the_ends_of_their_ranges_are_taken(argv):
    cli._check_numbers(_parsed(*argv))


@pytest.mark.parametrize("argv, says", [
    (["ingest", "--shards", "1001"], "--shards must be between 1 and 1000, got 1001"),
    (["ingest", "--shards", "-1"], "--shards must be between 1 and 1000, got -1"),
    (["serve", "--root", "r", "--shards", "0"], "--shards must be between 1 and 1000, got 0"),
    (["ingest", "--records", "-1"], "--records must be at least 0, got -1"),
    (["ingest", "--batch", "0"], "--batch must be at least 1, got 0"),
    (["ingest", "--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["checkpoint", "compact", "--keep", "0"], "--keep must be at least 1, got 0"),
    (["stats", "--interval", "0"], "--interval must be a positive number"),
    (["stats", "--interval", "86400.5"], "at most a day (86400), got 86400.5"),
    (["ingest", "--ring-size", "4095"], "--ring-size: "),
])
def test_numbers_out_of_their_ranges_are_refused(argv, says):
    with pytest.raises(UsageError) as exc:
        cli._check_numbers(_parsed(*argv))
    assert says in str(exc.value)


def _handled_by(monkeypatch, module_name: str, attr: str = "run", result=0, raises=None):
    import importlib

    module = importlib.import_module(f"ironwal_mp.cli.{module_name}")
    seen = []

    def handler(args):
        seen.append(args)
        if raises is not None:
            raise raises
        return result

    monkeypatch.setattr(module, attr, handler)
    return seen


@pytest.mark.parametrize("argv, module, attr", [
    (["checkpoint", "list", "--root", "{d}"], "checkpoints", "run"),
    (["replay", "--root", "{d}"], "replay", "run"),
    (["inspect", "{d}"], "audit", "inspect"),
    (["verify", "{d}"], "audit", "verify"),
    (["repair", "{d}"], "audit", "repair"),
    (["stats", "--root", "{d}"], "stats", "run"),
    (["serve", "--root", "{d}", "--shards", "2"], "serve", "run"),
    (["ingest", "--root", "{d}"], "ingest", "run"),
])
def test_each_command_goes_to_its_own_handler_and_returns_its_exit_code(tmp_path, monkeypatch, argv, module, attr):
    seen = _handled_by(monkeypatch, module, attr, result=7)
    assert cli_main([a.format(d=tmp_path / "w") for a in argv]) == 7
    assert len(seen) == 1 and seen[0].command == argv[0]


def test_ingest_gets_the_default_record_count_and_refuses_records_with_an_input(tmp_path, monkeypatch, capsys):
    from ironwal_mp.cli import ingest

    seen = _handled_by(monkeypatch, "ingest")
    root = str(tmp_path / "w")
    assert cli_main(["ingest", "--root", root]) == 0
    assert seen[-1].records == ingest.DEFAULT_RECORDS
    assert cli_main(["ingest", "--root", root, "--records", "0"]) == 0
    assert seen[-1].records == 0
    assert cli_main(["ingest", "in.jsonl", "--root", root]) == 0
    assert seen[-1].input == "in.jsonl"
    assert cli_main(["ingest", "in.jsonl", "--root", root, "--records", "5"]) == 2
    assert capsys.readouterr().err == "ironwal-mp ingest: error: --records only applies to the synthetic stream " \
                                      "(no input file)\n"
    assert len(seen) == 3


def test_ingest_and_serve_refuse_an_engine_root_before_their_handler_runs(tmp_path, monkeypatch, capsys):
    engine = _engine_root(tmp_path)
    for argv, module in ((["ingest", "--root", engine], "ingest"), (["serve", "--root", engine, "--shards", "2"], "serve")):
        seen = _handled_by(monkeypatch, module)
        assert cli_main(argv) == 2
        assert not seen
        assert "is an engine WAL" in capsys.readouterr().err


@pytest.mark.parametrize("exc, code, err", [
    (UsageError("bad"), 2, "ironwal-mp replay: error: bad\n"),
    (E.ConfigError("ring_size", "too small"), 2, "ironwal-mp replay: error: "),
    (E.ShardCountMismatchError(4, 6), 2, "ironwal-mp replay: error: "),
    (E.NoCheckpointsError("none yet"), 1, "ironwal-mp replay: none yet\n"),
    (E.ManifestError("unreadable"), 1, "ironwal-mp replay: unreadable\n"),
    (E.WorkerFailedError("it died"), 1, "ironwal-mp replay: WorkerFailedError: it died\n"),
    (KeyboardInterrupt(), 130, "ironwal-mp replay: aborted\n"),
    (BrokenPipeError(), 0, ""),
])
def test_errors_map_to_exit_codes_and_one_line(tmp_path, monkeypatch, capsys, exc, code, err):
    _handled_by(monkeypatch, "replay", raises=exc)
    assert cli_main(["replay", "--root", str(tmp_path / "w")]) == code
    got = capsys.readouterr().err
    assert got.startswith(err) and got.count("\n") == (1 if err else 0)


def test_a_broken_pipe_keeps_the_verdict_already_reached(tmp_path, monkeypatch):
    def verify(args):
        args.verdict = 1
        raise BrokenPipeError()

    from ironwal_mp.cli import audit

    monkeypatch.setattr(audit, "verify", verify)
    assert cli_main(["verify", str(tmp_path)]) == 1


def test_an_os_error_is_one_line_exit_1_and_closes_standard_output(tmp_path, monkeypatch, capsys):
    class Out(io.StringIO):
        pass

    out = Out()
    _handled_by(monkeypatch, "replay", raises=OSError(28, "No space left on device"))
    monkeypatch.setattr("sys.stdout", out)
    assert cli_main(["replay", "--root", str(tmp_path / "w")]) == 1
    assert out.closed
    assert capsys.readouterr().err == "ironwal-mp replay: [Errno 28] No space left on device\n"


def test_a_closed_standard_output_is_refused_in_process(tmp_path, monkeypatch, capsys):
    seen = _handled_by(monkeypatch, "replay")
    monkeypatch.setattr("sys.stdout", None)
    assert cli_main(["replay", "--root", str(tmp_path / "w")]) == 2
    assert not seen
    assert capsys.readouterr().err == "ironwal-mp replay: error: standard output is closed\n"


def test_extra_arguments_get_the_root_hint_only_where_the_command_takes_root(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["inspect", str(tmp_path), str(tmp_path)])
    err = capsys.readouterr().err
    assert err.startswith("usage: ironwal-mp inspect ")
    assert err.rstrip().endswith(f"unrecognized arguments: {tmp_path}")
    with pytest.raises(SystemExit):
        cli_main(["replay", "-x", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"unrecognized arguments: -x {tmp_path / 'missing'}")
