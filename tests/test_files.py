"""The one atomic write: a failed write leaves the old file and no temporary file behind."""

import os

import pytest

from stdd import files


def test_atomic_write_replaces_whole_files_and_cleans_up_after_a_failure(tmp_path):
    target = tmp_path / "sub" / "out.json"
    assert files.atomic_write(target, "héllo\n") == target  # text is UTF-8; the directory is created
    assert target.read_bytes() == "héllo\n".encode()
    files.atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    for error in (RuntimeError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with files.atomic_output(target) as temporary:
                temporary.write_bytes(b"half")
                raise error
        assert target.read_bytes() == b"\x00\x01"  # the old file, untouched
        assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temporary file left


def test_atomic_output_keeps_the_extension_for_writers_that_pick_a_format_by_name(tmp_path):
    target = tmp_path / "clip.mp4"
    with files.atomic_output(target, suffix=target.suffix) as temporary:
        assert temporary.parent == tmp_path and temporary.name.endswith(".mp4") and temporary != target
        temporary.write_bytes(b"video")
    assert target.read_bytes() == b"video" and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_dali_probe_cache_write_that_fails_leaves_no_temporary_file(tmp_path):
    from stdd.data.dali import _save_probe_cache

    cache = tmp_path / "probe.json"
    _save_probe_cache(cache, {"a.mp4": [1, 2]})
    before = cache.read_bytes()
    with pytest.raises(TypeError):
        _save_probe_cache(cache, {"b.mp4": {1, 2}})  # a set is not JSON: the write fails
    assert cache.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["probe.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umasks_permissions_not_0600(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = files.atomic_write(tmp_path / "shared.json", "{}")
        with files.atomic_output(tmp_path / "clip.mp4", suffix=".mp4") as temporary:
            temporary.write_bytes(b"video")
    finally:
        os.umask(previous)
    for path in (written, tmp_path / "clip.mp4"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)


def test_only_our_temporary_files_are_removed_as_orphans(tmp_path):
    with pytest.raises(RuntimeError):
        with files.atomic_output(tmp_path / "out.pt") as temporary:
            kept_name = temporary.name
            raise RuntimeError("the writer fails")
    assert files.is_orphan_temporary(kept_name)
    # what a killed writer leaves, and names that are not ours
    ours = [".checkpoint-e0001-s000000004.pt.stdd-0a1b2c3d.tmp", ".clip.mp4.stdd-12345678.mp4"]
    others = [".notes.tmp", "results.tmp", ".x.stdd-123.tmp", "checkpoint.pt", ".y.pt.stdd-0a1b2c3d.tmp.bak"]
    for name in ours + others:
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ours[0]).write_text("x")
    removed = files.remove_orphan_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["sub"])
    assert (tmp_path / "sub" / ours[0]).exists()  # not recursive
