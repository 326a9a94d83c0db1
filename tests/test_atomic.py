import errno
import os

import pytest

from dino_recog.atomic import atomic_write


def test_success_replaces_the_content_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "f.bin"  # the directory is created
    assert atomic_write(path, lambda fh: fh.write(b"old")) == path
    atomic_write(str(path), lambda fh: fh.write(b"new content"))
    assert path.read_bytes() == b"new content"
    assert os.listdir(path.parent) == ["f.bin"]


class WriterBug(RuntimeError):
    pass


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def half_then_bug(fh):
        fh.write(b"half of the ")
        raise WriterBug("serialisation failed")

    with pytest.raises(WriterBug, match="serialisation failed"):  # not an OSError: passed through unchanged
        atomic_write(path, half_then_bug)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]

    def disk_full(fh):
        fh.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=rf"could not write cache {path}: No space left on device; the previous one is "
                       "intact") as err:  # fmt: skip
        atomic_write(path, disk_full, what="cache")
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_the_temp_file_sits_beside_the_target_with_the_pid(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.pth", lambda fh: seen.append(fh.name))
    assert seen == [str(tmp_path / f".a.pth.tmp-{os.getpid()}")]


def test_a_failed_rename_keeps_the_old_file(tmp_path):
    path = tmp_path / "target"
    path.mkdir()  # a directory cannot be replaced by a file
    with pytest.raises(OSError, match=rf"could not write file {path}: .*; the previous one is intact"):
        atomic_write(path, lambda fh: fh.write(b"x"))
    assert path.is_dir() and os.listdir(tmp_path) == ["target"]


def test_files_written_together_are_never_seen_from_two_writes(tmp_path, monkeypatch):
    from dino_recog import atomic
    from dino_recog.atomic import atomic_write_together

    names, feats = tmp_path / "f.txt", tmp_path / "f.npy"

    def content(data):
        return lambda fh: fh.write(data)

    atomic_write_together([(names, content(b"old names"), "list"), (feats, content(b"old"), "x")])

    def bug(fh):
        fh.write(b"half")
        raise WriterBug("serialisation failed")

    with pytest.raises(WriterBug):  # the second writer fails: nothing was renamed
        atomic_write_together([(names, content(b"new names"), "list"), (feats, bug, "x")])
    assert (names.read_bytes(), feats.read_bytes()) == (b"old names", b"old")
    assert sorted(os.listdir(tmp_path)) == ["f.npy", "f.txt"]

    real = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: real(src, dst) if dst == names else 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a crash between the renames: the last file is absent, not old
        atomic_write_together([(names, content(b"new names"), "list"), (feats, content(b"new"), "x")])
    assert names.read_bytes() == b"new names" and not feats.exists()
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_a_full_disk_behind_another_exception_is_reported_as_one(tmp_path):
    """torch.save on a full disk raises RuntimeError("... unexpected pos ...") while handling the file's ENOSPC."""
    path = tmp_path / "c.pth"
    path.write_bytes(b"old")

    def zip_writer_on(errno_):
        def write(fh):
            try:
                raise OSError(errno_, os.strerror(errno_))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None
        return write

    with pytest.raises(OSError) as e:
        atomic_write(path, zip_writer_on(errno.ENOSPC), "checkpoint")
    assert (e.value.errno, e.value.strerror) == (
        errno.ENOSPC, f"could not write checkpoint {path}: No space left on device; the previous one is intact")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # not a full disk: the bug keeps its own exception
        atomic_write(path, zip_writer_on(errno.ENOENT), "checkpoint")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["c.pth"]
