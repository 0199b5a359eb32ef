import os
import stat

import pytest

from bayeskd import io


def test_outputs_get_the_mode_a_plain_write_gives(tmp_path):
    old = os.umask(0o027)
    try:
        io.write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o640


def test_a_group_of_outputs_is_renamed_only_when_all_are_written(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")
    with pytest.raises(RuntimeError), io.outputs() as out:
        out.text(tmp_path / "a.txt", "new a")
        raise RuntimeError("the second file fails")
    assert [(tmp_path / n).read_text() for n in ("a.txt", "b.txt")] == ["old a", "old b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary left
    with io.outputs() as out:
        out.text(tmp_path / "a.txt", "new a")
        out.text(tmp_path / "b.txt", "new b")
    assert [(tmp_path / n).read_text() for n in ("a.txt", "b.txt")] == ["new a", "new b"]


def test_an_unwritable_output_is_named(tmp_path):
    (tmp_path / "dir").write_text("a file where a folder should be")
    with pytest.raises(io.OutputError, match=r"cannot write .*dir/out.txt: "):
        io.write_text(tmp_path / "dir/out.txt", "x")
