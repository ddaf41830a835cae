"""The one atomic write: a failed write leaves the old file and no temporary file behind."""

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
