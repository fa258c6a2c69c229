"""Regressions from a review of the single-process engine: oversize entries, malformed payloads,
segment names, a failed open of the active segment."""

import errno
import os
import threading

import pytest

from ironwal_mp import Wal, WalOptions
from ironwal_mp.engine import layout
from ironwal_mp.engine import wal as wal_mod
from ironwal_mp.engine.fdcache import FdCache
from ironwal_mp.errors import ConcurrentTruncationError, DiskFullError, RecordTooLargeError, StreamFailedError, WalClosedError, WalError, WalIOError, WalLockedError


def _opts(path, **kw):
    return WalOptions(root_path=str(path), **kw)


# 1. an entry of 4 GiB or more escapes as struct.error -------------------------------------------


@pytest.mark.parametrize("how", ["append", "append_batch", "txn"])
def test_oversize_entry_raises_record_too_large(tmp_path, how):
    def attempt(wal):
        big = bytes(1 << 32)  # calloc'd: no page is touched, so this costs no real memory
        try:
            if how == "append":
                wal.append("s", big)
            elif how == "append_batch":
                wal.append_batch("s", [big])
            else:
                with wal.writer("s") as txn:
                    txn.add(big)
        except Exception as exc:  # (caught here: pytest would print the 4 GiB argument)
            return exc
        return None

    with Wal(_opts(tmp_path)) as wal:
        exc = attempt(wal)
        assert isinstance(exc, RecordTooLargeError), f"got {type(exc).__module__}.{type(exc).__name__}: {exc}"
        assert wal.next_id("s") == 0


# 2. Stream.append_payload writes frames that recovery and readers reject -----------------------


def test_append_payload_refuses_a_zero_count(tmp_path):
    with Wal(_opts(tmp_path, sync_mode="strict")) as wal:
        stream = wal.open_stream("s")
        wal.append("s", b"a")
        with pytest.raises((ValueError, WalError)):
            stream.append_payload(b"", 0)  # accepted today: writes a frame with count 0


def test_append_payload_zero_count_makes_recovery_cut_acknowledged_entries(tmp_path):
    with Wal(_opts(tmp_path, sync_mode="strict")) as wal:
        stream = wal.open_stream("s")
        wal.append("s", b"a")
        try:
            stream.append_payload(b"", 0)
        except (ValueError, WalError):
            pass  # refusing it is the fix
        acked = wal.append("s", b"b")  # STRICT: fsynced and acknowledged
    with Wal(_opts(tmp_path)) as wal:
        assert wal.get("s", acked) == b"b"  # today: recovery cut it ('frame with no entries')
        assert wal.recovery_reports == []


def test_append_payload_refuses_a_payload_that_does_not_hold_count_entries(tmp_path):
    with Wal(_opts(tmp_path)) as wal:
        stream = wal.open_stream("s")
        with pytest.raises((ValueError, WalError)):
            # entry length 5, but only 2 bytes follow: CRC-valid, so recovery keeps it, and every
            # later read of id 0 raises CorruptionError
            stream.append_payload(b"\x05\x00\x00\x00ab", 1)


# 3. segment names: "\d" also matches non-ASCII digits -------------------------------------------


def test_non_ascii_digit_names_are_not_segments(tmp_path):
    assert layout.parse_segment_name("\u0661" + "\u0660" * 19 + ".wal") is None


def test_a_stray_non_ascii_digit_file_does_not_break_the_stream(tmp_path):
    with Wal(_opts(tmp_path)) as wal:
        wal.append("s", b"a")
    # "١٠٠…٠.wal": 20 Arabic-Indic digits; int() reads it as 10**19, a start id above the real one
    open(os.path.join(str(tmp_path), "s", "\u0661" + "\u0660" * 19 + ".wal"), "wb").close()
    with Wal(_opts(tmp_path)) as wal:  # today: FileNotFoundError for 10000000000000000000.wal
        assert wal.get("s", 0) == b"a"
        assert wal.append("s", b"b") == 1


# 4. a failure to open the active segment's descriptor fails the stream, with a raw OSError -----


def test_emfile_opening_the_segment_is_a_walioerror_and_does_not_fail_the_stream(tmp_path, monkeypatch):
    with Wal(_opts(tmp_path, max_open_segments=2)) as wal:
        wal.append("s", b"a")
        wal._fdcache.forget(os.path.join(str(tmp_path), "s", layout.segment_name(0)))
        real = FdCache.acquire
        calls = {"n": 0}

        def flaky(self, path, writable=False):
            if writable and calls["n"] == 0:
                calls["n"] += 1
                raise OSError(errno.EMFILE, "Too many open files")
            return real(self, path, writable)

        monkeypatch.setattr(FdCache, "acquire", flaky)
        with pytest.raises(WalIOError):  # today: a bare OSError
            wal.append("s", b"b")
        # nothing was written: the stream must go on (today: StreamFailedError until reopened)
        try:
            assert wal.append("s", b"c") == 1
        except StreamFailedError as exc:
            pytest.fail(f"a transient EMFILE before any byte was written failed the stream: {exc}")


def test_os_errors_of_open_and_recovery_are_wal_io_errors(tmp_path):
    """A root that is a file, and a segment recovery cannot read, give WalIOError naming the
    path (they escaped as a bare FileExistsError / PermissionError)."""
    afile = os.path.join(str(tmp_path), "afile")
    open(afile, "wb").close()
    with pytest.raises(WalIOError, match="is not a directory") as info:
        Wal(_opts(afile))
    assert info.value.path == afile
    with Wal(_opts(os.path.join(str(tmp_path), "w"))) as wal:
        wal.append("s", b"a")
    seg = os.path.join(str(tmp_path), "w", "s", layout.segment_name(0))
    os.rename(seg, seg + ".moved")
    os.mkdir(seg)  # (a directory where the segment was: unreadable even for root)
    with Wal(_opts(os.path.join(str(tmp_path), "w"))) as wal:
        with pytest.raises(WalIOError, match="recovering stream 's'"):
            wal.get("s", 0)


def test_a_recovery_that_finds_the_disk_full_is_a_disk_full_error(tmp_path, monkeypatch):
    """Recovery rewrites a missing hint file: on a full disk that is a DiskFullError, as every
    other write's ENOSPC is (it was a plain WalIOError), and freeing space loses nothing."""
    root = os.path.join(str(tmp_path), "w")
    with Wal(_opts(root)) as wal:
        wal.append("s", b"a")
    os.unlink(os.path.join(root, "s", layout.SEGMENTS_IDX))

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with Wal(_opts(root)) as wal:
        with monkeypatch.context() as patch:
            patch.setattr(layout, "write_segments_idx", full)
            with pytest.raises(DiskFullError, match="recovering stream 's'") as info:
                wal.get("s", 0)
        assert info.value.errno == errno.ENOSPC
        assert wal.get("s", 0) == b"a"  # (space freed: the next use recovers it)


# 4. an ASYNC append racing close() was acknowledged and never synced -------------------------


def test_an_append_racing_close_is_refused_or_synced(tmp_path, monkeypatch):
    import threading

    from ironwal_mp.engine.stream import Stream
    from ironwal_mp.errors import WalClosedError

    wal = Wal(_opts(tmp_path, sync_mode="async"))
    wal.append("s", b"first")
    entered, go = threading.Event(), threading.Event()
    real = Stream.append_payload

    def paused(self, *args, **kw):  # the appender has passed Wal.append's closed check
        entered.set()
        assert go.wait(10)
        return real(self, *args, **kw)

    monkeypatch.setattr(Stream, "append_payload", paused)
    outcome = {}

    def appender():
        try:
            outcome["seq"] = wal.append("s", b"racer")
        except WalClosedError as exc:
            outcome["error"] = exc

    t = threading.Thread(target=appender)
    t.start()
    assert entered.wait(10)
    real_sync = wal._syncer.sync

    def sync_then_let_the_appender_go(streams):  # the window: after close's sync, before its files close
        errors = real_sync(streams)
        go.set()
        t.join(10)
        return errors

    monkeypatch.setattr(wal._syncer, "sync", sync_then_let_the_appender_go)
    wal.close()
    t.join(10)
    stream = wal._streams["s"]
    if "seq" in outcome:  # acknowledged after close() synced: it must have been synced too
        assert stream.durable_id > outcome["seq"]
    else:
        assert isinstance(outcome.get("error"), WalClosedError)
        assert stream.next_id == 1  # nothing was written after the sync


def test_close_waits_for_an_append_under_way_and_syncs_it(tmp_path, monkeypatch):
    """A guard, not a regression: this held before close_writes too (the final sync waited for
    the stream's lock); it fails if close stops waiting for an append that holds the lock."""
    import threading

    from ironwal_mp.engine import stream as stream_mod

    wal = Wal(_opts(tmp_path, sync_mode="async"))
    wal.append("s", b"first")
    inside, go = threading.Event(), threading.Event()
    real = stream_mod.Stream._write

    def slow_write(self, frame, size):  # holds the stream's lock, mid-append
        inside.set()
        assert go.wait(10)
        return real(self, frame, size)

    monkeypatch.setattr(stream_mod.Stream, "_write", slow_write)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("seq", wal.append("s", b"second")))
    t.start()
    assert inside.wait(10)
    closer = threading.Thread(target=wal.close)
    closer.start()
    go.set()
    t.join(10)
    closer.join(10)
    assert result["seq"] == 1
    assert wal._streams["s"].durable_id == 2  # close's sync covered the append it waited for


# 5. TxnWriter.commit lost its entries when the write failed --------------------------------------


def test_a_commit_whose_write_failed_can_be_retried(tmp_path, monkeypatch):
    from ironwal_mp.engine import stream as stream_mod

    with Wal(_opts(tmp_path, sync_mode="strict")) as wal:
        wal.append("s", b"a")
        real = stream_mod.layout.write_all
        calls = {"n": 0}

        def failing_once(fd, data):
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(errno.EIO, "injected")
            return real(fd, data)

        monkeypatch.setattr(stream_mod.layout, "write_all", failing_once)
        txn = wal.writer("s")
        txn.add(b"x")
        txn.add(b"y")
        with pytest.raises(WalIOError):
            txn.commit()
        assert len(txn) == 2  # nothing was written: the entries are still there
        assert txn.commit() == range(1, 3)
        assert [wal.get("s", i) for i in range(3)] == [b"a", b"x", b"y"]
        with pytest.raises(WalError):
            txn.commit()


def test_a_commit_whose_sync_failed_is_done(tmp_path, monkeypatch):
    from ironwal_mp.engine import stream as stream_mod

    with Wal(_opts(tmp_path, sync_mode="strict")) as wal:
        wal.append("s", b"a")

        def eio(fd):
            raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(stream_mod, "_fdatasync", eio)
        txn = wal.writer("s")
        txn.add(b"x")
        with pytest.raises(WalIOError):
            txn.commit()
        with pytest.raises(WalError):  # written once: a retry must not write a second copy
            txn.commit()
        monkeypatch.undo()
    with Wal(_opts(tmp_path)) as wal:
        assert wal.next_id("s") == 2


def test_emfile_opening_the_segment_for_fsync_is_a_walioerror(tmp_path, monkeypatch):
    with Wal(_opts(tmp_path, sync_mode="strict")) as wal:
        wal.append("s", b"a")
        real = FdCache.acquire
        state = {"armed": False}

        def acquire(self, path, writable=False):
            entry = real(self, path, writable)
            if state["armed"]:
                state["armed"] = False
                self.release(entry)
                raise OSError(errno.EMFILE, "Too many open files")
            return entry

        monkeypatch.setattr(FdCache, "acquire", acquire)
        wal.append("s", b"b")  # (its write opens nothing new)
        wal._streams["s"]._synced_id = 1  # pretend b's sync is still to come
        state["armed"] = True
        with pytest.raises(WalIOError) as info:
            wal._streams["s"].make_durable(2)
        assert info.value.errno == errno.EMFILE
        wal._streams["s"].make_durable(2)  # a later sync goes through
        assert wal.durable_id("s") == 2


# 6. reads let the OS's errors through as they were, and took a lost middle segment for a truncation


def _rotated(path, n=40):
    opts = _opts(path, max_segment_size=300, compression="none")
    with Wal(opts) as wal:
        for i in range(n):
            wal.append("s", b"e%04d-" % i + b"y" * (i % 7))
    stream = os.path.join(str(path), "s")
    return [os.path.join(stream, layout.segment_name(s)) for s in layout.list_segments(stream)]


@pytest.mark.parametrize("strategy", ["standard_io", "mmap"])
def test_a_read_the_os_refuses_is_a_walioerror(tmp_path, strategy):
    segs = _rotated(tmp_path)
    assert len(segs) > 3
    os.unlink(segs[1])
    os.mkdir(segs[1])  # a sealed segment's name taken by a directory
    start = layout.parse_segment_name(os.path.basename(segs[1]))
    with Wal(_opts(tmp_path, read_strategy=strategy)) as wal:
        with pytest.raises(WalIOError) as info:
            wal.get("s", start)
        assert info.value.path == segs[1]
        with pytest.raises(WalIOError):
            list(wal.iter("s", 0))
        assert wal.get("s", 0) == b"e0000-"  # the rest reads on


def test_a_fifo_under_a_segment_name_fails_its_reads_without_waiting(tmp_path):
    """A FIFO in a sealed segment's place: a read of its ids waited forever for a writer (an
    ordinary open of a FIFO does); in the newest segment's place the open waited. Now the
    first is an error for those ids only, the second a refused open naming the file."""
    from ironwal_mp.errors import CorruptionError

    segs = _rotated(tmp_path)
    os.unlink(segs[1])
    os.mkfifo(segs[1])
    start = layout.parse_segment_name(os.path.basename(segs[1]))
    with Wal(_opts(tmp_path)) as wal:
        with pytest.raises((CorruptionError, WalIOError)):
            wal.get("s", start)
        assert wal.get("s", 0) == b"e0000-"
    os.unlink(segs[-1])
    os.mkfifo(segs[-1])
    with Wal(_opts(tmp_path)) as wal:
        with pytest.raises(WalIOError, match="not a regular file") as info:
            wal.next_id("s")
        assert info.value.path == segs[-1]



class _Hung(Exception):
    pass


@pytest.mark.parametrize("where", ["new segment", "active segment", "old active segment"])
def test_a_fifo_under_a_segment_name_fails_a_refresh_without_waiting(tmp_path, where):
    """A read-only handle's refresh opened the segments it looks at with an ordinary open, so
    a FIFO put in place of one (a new file, the one viewed as active, or that one after the
    writer rotated past it) made refresh wait forever for a writer. Now it is a WalIOError
    naming the file, as at open. (An alarm turns the old hang into a failure.)"""
    import signal

    opts = _opts(tmp_path, max_segment_size=300, compression="none")
    stream = tmp_path / "s"
    with Wal(opts) as wal:
        wal.append("s", b"first")
    with Wal(opts, read_only=True) as reader:
        assert reader.next_id("s") == 1
        if where == "new segment":
            fifo = stream / layout.segment_name(100)
        else:
            fifo = stream / layout.segment_name(0)
            if where == "old active segment":
                with Wal(opts) as wal:
                    for i in range(10):
                        wal.append("s", b"e%04d-" % i + b"y" * 40)
                assert len(layout.list_segments(str(stream))) > 1
            os.unlink(fifo)
        os.mkfifo(fifo)

        def hung(signum, frame):
            raise _Hung()

        previous = signal.signal(signal.SIGALRM, hung)
        signal.alarm(10)
        try:
            with pytest.raises(WalIOError, match="not a regular file") as info:
                reader.refresh("s")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert info.value.path == str(fifo)

def test_a_middle_segment_lost_under_an_open_handle_is_corruption_not_truncation(tmp_path):
    from ironwal_mp.errors import CorruptionError

    segs = _rotated(tmp_path)
    mid = layout.parse_segment_name(os.path.basename(segs[2]))
    with Wal(_opts(tmp_path)) as wal:
        assert wal.get("s", mid) is not None
        wal._reader.forget(segs[2])
        os.unlink(segs[2])
        with pytest.raises(CorruptionError) as info:
            wal.get("s", mid)  # was None, as if truncated, while id 0 still read
        assert info.value.path == segs[2]
        with pytest.raises(CorruptionError):
            list(wal.iter("s", mid))  # skipped the lost ids without a word
        with pytest.raises(CorruptionError):
            list(wal.iter("s", 0))
        assert wal.get("s", 0) == b"e0000-"


def test_truncation_under_a_reader_still_reads_as_truncation(tmp_path):
    segs = _rotated(tmp_path)
    with Wal(_opts(tmp_path)) as wal:
        it = wal.iter("s", 0)
        view, stream_dir = wal._view("s")  # an old view, taken before the truncation
        second = layout.parse_segment_name(os.path.basename(segs[2]))
        assert wal.truncate("s", second) == 2
        assert wal._reader.get(view, stream_dir, 0) is None  # gone by truncation: absent
        # ids the old view holds from its first on are asked for exactly: the iteration says
        # they were truncated (not corrupt); a current view starts at the first kept id
        with pytest.raises(ConcurrentTruncationError):
            next(wal._reader.iter(view, stream_dir, 0))
        assert next(wal.iter("s", 0)) == b"e%04d-" % second + b"y" * (second % 7)
        del it


# 3. a Wal handed to a forked child (user review, session 11) ------------------------------------


def test_a_forked_child_cannot_write_through_its_parents_wal(tmp_path):
    """The child shares the parent's descriptors and next ids: both handed out the same ids and
    recovery cut the parent's acknowledged entries. The child's copy is now closed, without a
    sync or an unlock, and its copy of LOCK's descriptor is dropped."""
    from ironwal_mp.errors import WalClosedError

    wal = Wal(_opts(tmp_path, sync_mode="strict"))
    wal.append("s", b"p0")
    release_r, release_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: try to write, close, then stay alive until told to go
        code = 0
        try:
            os.close(release_w)
            try:
                wal.append("s", b"child")
                code = 1
            except WalClosedError as exc:
                code = 0 if "fork" in str(exc) else 2
            wal.close()  # must neither sync nor release the parent's LOCK
            os.write(report_w, bytes([code]))
            os.read(release_r, 1)
        finally:
            os._exit(code)
    try:
        os.close(report_w)
        assert os.read(report_r, 1) == b"\x00", "the forked child wrote through the parent's Wal"
        with open(os.path.join(str(tmp_path), "LOCK")) as fh:
            assert fh.read().split() == [str(os.getpid()), "wal"], "the child's close touched LOCK"
        ids = [wal.append("s", b"parent-%d" % i) for i in range(5)]
        assert ids == [1, 2, 3, 4, 5]
        wal.close()
        # the child still lives: its inherited descriptor no longer holds the flock
        with Wal(_opts(tmp_path)) as again:
            assert [again.get("s", i) for i in range(6)] == [b"p0"] + [b"parent-%d" % i for i in range(5)]
    finally:
        os.close(release_w)
        os.waitpid(pid, 0)
        os.close(release_r)
        os.close(report_r)


def test_a_wal_refuses_pickling_and_reads_after_close(tmp_path):
    import pickle

    from ironwal_mp.errors import WalClosedError

    wal = Wal(_opts(tmp_path))
    wal.append("s", b"x")
    with pytest.raises(TypeError, match="belongs to the process"):
        pickle.dumps(wal)
    assert "open" in repr(wal)
    wal.close()
    with pytest.raises(WalClosedError):
        wal.durable_id("s")  # returned a value after close
    assert "closed" in repr(wal)


# 4. a WAL opened inside another (user review, session 11) ---------------------------------------


def test_a_wal_is_not_opened_in_a_stream_directory_or_inside_a_wal(tmp_path):
    from ironwal_mp.errors import ConfigError

    root = os.path.join(str(tmp_path), "ledger")
    with Wal(_opts(root)) as wal:
        wal.append("acct-1", b"x")
    stream_dir = os.path.join(root, "acct-1")
    before = sorted(os.listdir(stream_dir)), sorted(os.listdir(root))
    with pytest.raises(ConfigError, match="is one stream of the WAL at"):
        Wal(_opts(stream_dir))
    for inside in (os.path.join(root, "nested"), os.path.join(root, "a", "b"), os.path.join(stream_dir, "x")):
        with pytest.raises(ConfigError, match="inside the WAL directory"):
            Wal(_opts(inside))
    assert (sorted(os.listdir(stream_dir)), sorted(os.listdir(root))) == before, "a refused open wrote"
    with Wal(_opts(stream_dir), read_only=True):  # looking is allowed
        pass


def test_another_programs_lock_file_does_not_make_a_wal(tmp_path):
    """Only what this library leaves marks a WAL: a directory holding another program's LOCK
    (LevelDB keeps one) may hold a WAL."""
    other = os.path.join(str(tmp_path), "app")
    os.makedirs(other)
    open(os.path.join(other, "LOCK"), "w").close()
    with Wal(_opts(os.path.join(other, "wal"))) as wal:
        wal.append("s", b"x")
    held = os.path.join(str(tmp_path), "held")
    with Wal(_opts(held)):  # an open engine root with no stream yet is one all the same
        from ironwal_mp.errors import ConfigError

        with pytest.raises(ConfigError, match="inside the WAL directory"):
            Wal(_opts(os.path.join(held, "inner")))


# a segment the hint files prove existed is gone ------------------------------------------------


def _rotated_stream(tmp_path, **kw):
    opts = _opts(tmp_path, max_segment_size=200, **kw)
    with Wal(opts) as wal:
        for i in range(40):
            wal.append("s", b"original-%03d" % i)
    stream_dir = str(tmp_path / "s")
    return opts, stream_dir, layout.list_segments(stream_dir)


@pytest.mark.parametrize("which", ["newest", "middle", "all"])
def test_a_lost_segment_named_by_the_hints_is_refused_under_error_policy(tmp_path, which):
    """Rebuilding segments.idx and head.state from the files left hid the loss, and the writer
    gave acknowledged ids out again with new content; the audit called it not rebuildable."""
    from ironwal_mp import CorruptionError, CorruptionPolicy
    from ironwal_mp.engine.audit import audit_stream

    opts, stream_dir, segs = _rotated_stream(tmp_path, on_corruption=CorruptionPolicy.ERROR)
    gone = {"newest": segs[-1:], "middle": segs[2:3], "all": segs}[which]
    for start in gone:
        os.unlink(os.path.join(stream_dir, layout.segment_name(start)))
    before = {n: open(os.path.join(stream_dir, n), "rb").read() for n in os.listdir(stream_dir)}
    with Wal(opts) as wal:
        with pytest.raises(CorruptionError) as info:
            wal.append("s", b"NEW")
    assert layout.segment_name(gone[0]) in str(info.value) and "CorruptionPolicy.TRUNCATE" in str(info.value)
    after = {n: open(os.path.join(stream_dir, n), "rb").read() for n in os.listdir(stream_dir)}
    assert after == before  # nothing rewritten: the hints still prove the loss
    problems = audit_stream(stream_dir).problems
    assert problems and not any(p.rebuildable for p in problems if "segments.idx" in p.path or "head.state" in p.path)


def test_a_lost_newest_segment_is_reported_under_truncate_policy(tmp_path):
    opts, stream_dir, segs = _rotated_stream(tmp_path)
    os.unlink(os.path.join(stream_dir, layout.segment_name(segs[-1])))
    with Wal(opts) as wal:
        assert wal.append("s", b"NEW") == segs[-1]  # accepted: the ids are given out again
        actions = [a for r in wal.recovery_reports for a in r.actions]
    assert any(f"ids from {segs[-1]} on were lost" in a for a in actions), actions


def test_a_stream_that_lost_every_segment_reports_it_once_then_opens_clean(tmp_path):
    """With no segment file left, recovery kept the hints: the loss was reported again after new
    entries were written, and an ERROR open refused the healthy stream for a file long gone."""
    from ironwal_mp import CorruptionPolicy
    from ironwal_mp.engine.audit import audit_stream

    opts, stream_dir, segs = _rotated_stream(tmp_path)
    for start in segs:
        os.unlink(os.path.join(stream_dir, layout.segment_name(start)))
    with Wal(opts) as wal:
        assert wal.append("s", b"NEW") == 0  # accepted: the ids are given out again
        actions = [a for r in wal.recovery_reports for a in r.actions]
    assert any("were lost" in a for a in actions) and any(a.startswith("removed segments.idx and head.state")
                                                           for a in actions), actions
    assert layout.read_segments_idx(stream_dir) == [0] and layout.read_head_state(stream_dir) is None
    assert audit_stream(stream_dir).problems == []
    with Wal(opts.replace(on_corruption=CorruptionPolicy.ERROR)) as wal:
        assert wal.recover_all() == [] and list(wal.iter("s", 0)) == [b"NEW"]


def test_hints_behind_the_files_are_still_rebuilt_silently(tmp_path):
    """A crash mid-rotation (new file made, hints not yet written) or mid-truncation (oldest
    files deleted, segments.idx not yet rewritten) is no loss, even under ERROR."""
    from ironwal_mp import CorruptionPolicy

    opts, stream_dir, segs = _rotated_stream(tmp_path, on_corruption=CorruptionPolicy.ERROR)
    layout.write_segments_idx(stream_dir, segs[:-1])
    layout.write_head_state(stream_dir, segs[-2])
    os.unlink(os.path.join(stream_dir, layout.segment_name(segs[0])))
    layout.write_segments_idx(stream_dir, segs[:-1])  # still lists the deleted oldest file
    with Wal(opts) as wal:
        assert wal.get("s", 39) == b"original-039" and wal.first_id("s") == segs[1]
    assert layout.read_segments_idx(stream_dir) == segs[1:]


def test_a_side_file_whose_copy_failed_is_removed(tmp_path, monkeypatch):
    """A part copy would pass for the cut bytes (and took more of a full disk at every try);
    nothing is cut until a copy succeeds."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append("s", b"kept")
    seg = os.path.join(str(tmp_path / "s"), layout.segment_name(0))
    with open(seg, "ab") as f:
        f.write(b"\xff" * (3 << 20))  # a garbage tail, copied in 1 MiB pieces
    size = os.path.getsize(seg)
    real, calls = layout.write_all, []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(layout, "write_all", full)
    for _ in range(2):
        with pytest.raises(WalIOError):
            with Wal(_opts(tmp_path)) as wal:
                wal.get("s", 0)
        assert sorted(os.listdir(tmp_path / "s")) == [layout.segment_name(0), "segments.idx"]
        assert os.path.getsize(seg) == size
        calls.clear()
    monkeypatch.undo()
    with Wal(_opts(tmp_path)) as wal:
        assert wal.get("s", 0) == b"kept"
    assert os.path.getsize(seg + ".broken") == size - os.path.getsize(seg)


def test_a_rotation_that_fails_says_the_stream_now_refuses_writes(tmp_path, monkeypatch):
    """It said only "nothing of this call was kept", yet freeing space did not help: every
    later write got StreamFailedError until a reopen."""
    from ironwal_mp import DiskFullError

    with Wal(_opts(tmp_path, max_segment_size=64)) as wal:
        wal.append("s", b"x" * 40)

        def full(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(layout, "append_segments_idx", full)
        with pytest.raises(DiskFullError) as info:
            wal.append("s", b"y" * 40)
        assert "refuses writes until it is reopened" in str(info.value)
        monkeypatch.undo()
        with pytest.raises(StreamFailedError):
            wal.append("s", b"z")
    with Wal(_opts(tmp_path)) as wal:
        assert wal.append("s", b"z") == 1


def test_a_streams_disk_errors_read_like_every_other_disk_error(tmp_path, monkeypatch):
    """stream.py had its own converter beside errors.io_error, worded its own way ("rotate failed
    on <file>"): one converter now, so every disk error reads "<action> <file> failed: <reason>",
    then what the failure leaves, then the disk-full note."""
    from ironwal_mp import DiskFullError
    from ironwal_mp.engine import stream as stream_mod

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    with Wal(_opts(tmp_path / "a", max_segment_size=64)) as wal:
        wal.append("s", b"x" * 40)
        monkeypatch.setattr(layout, "append_segments_idx", full)
        with pytest.raises(DiskFullError) as info:
            wal.append("s", b"y" * 40)
        err = info.value
        assert err.path.endswith(layout.segment_name(1)) and err.errno == errno.ENOSPC
        assert str(err) == (f"rotating to {err.path} failed: No space left on device; the stream refuses "
                            "writes until it is reopened (the disk is full; nothing of this call was kept)")
        monkeypatch.undo()
    with Wal(_opts(tmp_path / "b", max_entries_per_segment=2)) as wal:
        for i in range(6):
            wal.append("s", b"e%d" % i)
        monkeypatch.setattr(layout, "write_file_atomic", full)  # the segments.idx rewrite
        with pytest.raises(DiskFullError) as info:
            wal.truncate("s", 4)
        err = info.value
        assert str(err) == (f"recording the deletions in {err.path} failed: No space left on device; "
                            "the truncation stopped after deleting 2 of 2 segments (the disk is full)")
        monkeypatch.undo()

        def eio(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(stream_mod, "_fdatasync", eio)
        with pytest.raises(WalIOError) as info:
            wal.append("s", b"e6")  # (STRICT, the default: the append fsyncs)
        err = info.value
        assert str(err).startswith(f"fsyncing {err.path} failed: Input/output error; entries written "
                                   "before it were not acknowledged as durable and may or may not be there")
        monkeypatch.undo()
# an empty segment file placed past (or inside) the end of a stream -----------------------------


def _stream_with_stray(tmp_path, stray, hints, **kw):
    """Ids 0..39 in one segment, then an empty file named like a segment starting at ``stray``;
    ``hints``: whether segments.idx and head.state name it too (a restore copying them along)."""
    opts = _opts(tmp_path, **kw)
    with Wal(_opts(tmp_path)) as wal:
        for i in range(40):
            wal.append("s", b"original-%03d" % i)
    stream_dir = str(tmp_path / "s")
    open(os.path.join(stream_dir, layout.segment_name(stray)), "wb").close()
    if hints:
        layout.write_segments_idx(stream_dir, [0, stray])
        layout.write_head_state(stream_dir, stray)
    return opts, stream_dir


@pytest.mark.parametrize("hints", [False, True], ids=["hints-without-it", "hints-naming-it"])
@pytest.mark.parametrize("stray", [1036, 20], ids=["past-the-end", "inside"])
def test_a_stray_empty_segment_is_set_aside_and_ids_go_on(tmp_path, stray, hints):
    """Recovery took the stray file for the active segment: past the end, the next append got
    1036 and reading across 40..1035 raised CorruptionError; inside, the next append got 20 and
    acknowledged ids 20..39 were shadowed by new entries."""
    from ironwal_mp.engine.audit import audit_stream

    opts, stream_dir = _stream_with_stray(tmp_path, stray, hints)
    stray_path = os.path.join(stream_dir, layout.segment_name(stray))
    assert any("stray segment" in p.reason and p.path == stray_path for p in audit_stream(stream_dir).problems)
    with Wal(opts) as wal:
        assert wal.append("s", b"NEW") == 40
        assert list(wal.iter("s", 0)) == [b"original-%03d" % i for i in range(40)] + [b"NEW"]
        actions = [a for r in wal.recovery_reports for a in r.actions]
        assert any(a.startswith("set aside stray segment " + layout.segment_name(stray)) for a in actions), actions
        assert [p for r in wal.recovery_reports for p in r.set_aside] == [stray_path + layout.BROKEN_SUFFIX]
    assert not os.path.exists(stray_path) and os.path.exists(stray_path + layout.BROKEN_SUFFIX)
    assert layout.read_segments_idx(stream_dir) == [0]
    assert audit_stream(stream_dir).problems == []
    with Wal(opts) as wal:
        assert wal.recover_all() == [] and wal.get("s", 40) == b"NEW"


@pytest.mark.parametrize("hints", [False, True], ids=["hints-without-it", "hints-naming-it"])
def test_a_stray_empty_segment_is_refused_under_error_policy(tmp_path, hints):
    from ironwal_mp import CorruptionError, CorruptionPolicy

    opts, stream_dir = _stream_with_stray(tmp_path, 1036, hints, on_corruption=CorruptionPolicy.ERROR)
    before = {n: open(os.path.join(stream_dir, n), "rb").read() for n in os.listdir(stream_dir)}
    with Wal(opts) as wal:
        with pytest.raises(CorruptionError) as info:
            wal.append("s", b"NEW")
    assert info.value.path == os.path.join(stream_dir, layout.segment_name(1036))
    assert "ends at id 40" in info.value.reason and "CorruptionPolicy.TRUNCATE" in info.value.reason
    after = {n: open(os.path.join(stream_dir, n), "rb").read() for n in os.listdir(stream_dir)}
    assert after == before  # nothing written


def test_a_read_only_open_ends_the_view_before_a_stray_segment(tmp_path):
    opts, stream_dir = _stream_with_stray(tmp_path, 1036, False)
    listing = sorted(os.listdir(stream_dir))
    with Wal(opts, read_only=True) as wal:
        assert wal.next_id("s") == 40 and len(list(wal.iter("s", 0))) == 40
    assert sorted(os.listdir(stream_dir)) == listing


@pytest.mark.parametrize("stage", ["file only", "file and segments.idx", "file and both hints"])
def test_the_empty_segment_a_rotation_leaves_is_no_stray(tmp_path, stage):
    """A crash right after a rotation leaves an empty newest segment named one past the last id:
    no problem, even under CorruptionPolicy.ERROR, and no audit finding about it."""
    from ironwal_mp import CorruptionPolicy
    from ironwal_mp.engine.audit import audit_stream

    opts, stream_dir, segs = _rotated_stream(tmp_path, on_corruption=CorruptionPolicy.ERROR)
    open(os.path.join(stream_dir, layout.segment_name(40)), "wb").close()
    if stage != "file only":
        layout.append_segments_idx(stream_dir, 40)
    if stage == "file and both hints":
        layout.write_head_state(stream_dir, 40)
    assert not any("stray" in p.reason for p in audit_stream(stream_dir).problems)
    with Wal(opts) as wal:
        assert wal.append("s", b"NEW") == 40 and wal.current_segment_start_id("s") == 40
        assert not any("stray" in a for r in wal.recovery_reports for a in r.actions)
    assert layout.list_segments(stream_dir) == segs + [40]


def test_opening_after_a_rotation_does_not_walk_the_segment_before(tmp_path, monkeypatch):
    """The stray check reads the previous segment only when the newest is empty, i.e. right after
    a rotation, and found at first a 64 MiB segment took 1.4-2.6 s to walk: its last frame, found
    from the end, confirms a rotation's segment without the walk."""
    from ironwal_mp.engine import recovery

    opts, stream_dir, segs = _rotated_stream(tmp_path)
    open(os.path.join(stream_dir, layout.segment_name(40)), "wb").close()
    layout.append_segments_idx(stream_dir, 40)
    walked = []
    real = recovery._scan_segment
    monkeypatch.setattr(recovery, "_scan_segment", lambda d, s, c: walked.append(s) or real(d, s, c))
    with Wal(opts) as wal:
        assert wal.append("s", b"NEW") == 40
    assert walked == [40], "only the (empty) active segment was scanned"


def test_a_frame_inside_the_last_entry_does_not_hide_a_stray(tmp_path):
    """The search from the end finds the innermost frame when an entry holds a frame's bytes; it
    disagrees with the stray's name, so the segment is walked and the stray still found. (Only
    an inner frame ending exactly at the stray's name would hide it.)"""
    from ironwal_mp.engine.frame import encode_entries, encode_frame

    opts = _opts(tmp_path)
    inner = encode_frame(400, 1, encode_entries([b"looks like the end"]))
    with Wal(opts) as wal:
        for i in range(39):
            wal.append("s", b"original-%03d" % i)
        wal.append("s", inner)
    stream_dir = str(tmp_path / "s")
    open(os.path.join(stream_dir, layout.segment_name(1036)), "wb").close()
    with Wal(opts) as wal:
        assert wal.append("s", b"NEW") == 40
        assert wal.get("s", 39) == inner


def test_a_lost_middle_segment_is_reported_as_a_gap_not_as_ids_given_out_again(tmp_path):
    """The report (and the ERROR policy's message) said a lost segment's ids are given out
    again, but with later segment files left the writer resumes after them: the lost ids stay a
    gap that reads refuse."""
    from ironwal_mp import CorruptionError, CorruptionPolicy

    opts, stream_dir, segs = _rotated_stream(tmp_path)
    os.unlink(os.path.join(stream_dir, layout.segment_name(segs[1])))
    with Wal(opts.replace(on_corruption=CorruptionPolicy.ERROR)) as wal:
        with pytest.raises(CorruptionError) as info:
            wal.append("s", b"NEW")
    assert "given out again" not in str(info.value)
    with Wal(opts) as wal:
        assert wal.append("s", b"NEW") == 40  # the writer resumes after the newest file
        with pytest.raises(CorruptionError) as info:
            wal.get("s", segs[1])
        # (it said "frames end at id 4, expected 8" of the file before the gap)
        assert f"ids {segs[1]} to {segs[2] - 1} are missing" in str(info.value)
        actions = [a for r in wal.recovery_reports for a in r.actions]
    assert any(f"ids {segs[1]} to {segs[2] - 1} were lost" in a and "stay a gap" in a for a in actions), actions


def test_a_lost_middle_and_newest_segment_say_which_ids_are_given_out_again(tmp_path):
    """With a middle segment and the newest one both gone, the report and the ERROR message
    spoke of the middle one alone, as a gap: the newest one's ids, past the last file left,
    are given out again, and nothing said so."""
    from ironwal_mp import CorruptionError, CorruptionPolicy

    opts, stream_dir, segs = _rotated_stream(tmp_path)
    for s in (segs[1], segs[-1]):
        os.unlink(os.path.join(stream_dir, layout.segment_name(s)))
    with Wal(opts.replace(on_corruption=CorruptionPolicy.ERROR)) as wal:
        with pytest.raises(CorruptionError) as info:
            wal.append("s", b"NEW")
    assert f"ids from {segs[-1]} on are given out again" in str(info.value)
    with Wal(opts) as wal:
        assert wal.append("s", b"NEW") == segs[-1]  # reissued
        actions = [a for r in wal.recovery_reports for a in r.actions]
    assert any(f"ids {segs[1]} to {segs[2] - 1} were lost" in a and "stay a gap" in a
               and f"ids from {segs[-1]} on are given out again" in a for a in actions), actions


# a close() in another thread while a stream is being recovered -------------------------------


def test_close_waits_for_a_recovery_under_way_in_another_thread(tmp_path, monkeypatch):
    """close() let go of LOCK while another thread was still recovering (and maybe repairing) a
    stream, so a process that took LOCK next could repair the same files at the same time. Now
    close waits for that recovery; the stream is then refused to the closed handle."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append("s", b"x")
    entered, release = threading.Event(), threading.Event()
    real = wal_mod.recover_stream

    def slow_recovery(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(wal_mod, "recover_stream", slow_recovery)
    wal = Wal(_opts(tmp_path))
    outcome = {}

    def first_use():
        try:
            wal.get("s", 0)
        except Exception as exc:
            outcome["error"] = exc

    user = threading.Thread(target=first_use)
    closer = threading.Thread(target=wal.close)
    user.start()
    try:
        assert entered.wait(30)
        closer.start()
        closer.join(0.5)
        assert closer.is_alive(), "close() returned while a recovery was under way"
        with pytest.raises(WalLockedError):
            Wal(_opts(tmp_path))  # (LOCK is still held)
    finally:
        release.set()
        user.join(30)
        if closer.ident is not None:  # (started)
            closer.join(30)
    assert not closer.is_alive() and not user.is_alive()
    assert isinstance(outcome.get("error"), WalClosedError)
    monkeypatch.setattr(wal_mod, "recover_stream", real)
    with Wal(_opts(tmp_path)) as again:  # (LOCK was let go once the recovery was done)
        assert again.get("s", 0) == b"x"
