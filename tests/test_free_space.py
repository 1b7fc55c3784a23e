"""A stage whose output cannot fit on its disk is refused before any model loads, with the sizes."""

from __future__ import annotations

import os

import pytest

from perp.errors import OutputError
from perp.io.atomic import SPACE_MARGIN_BYTES, format_bytes, require_free_space

GIB = 1024 ** 3


def test_a_tight_disk_is_refused_with_the_sizes_and_where(full_disk, tmp_path):
    disk = full_disk(tmp_path / "disk", free=GIB)
    with pytest.raises(OutputError) as info:
        require_free_space(disk / "runs" / "pruned", 2 * GIB, "--out", "the pruned checkpoint")
    message = str(info.value)
    assert "the pruned checkpoint needs about 2.1 GiB" in message and "1.0 GiB free" in message, message
    assert f"'{disk}' has" in message and "write elsewhere" in message, message
    assert not (disk / "runs").exists()

    require_free_space(disk / "runs" / "pruned", GIB // 2, "--out", "the pruned checkpoint")  # fits
    require_free_space(tmp_path / "elsewhere" / "out", 2 * GIB, "--out", "x")  # the real disk of tmp_path


def test_margin_and_units(full_disk, tmp_path):
    disk = full_disk(tmp_path / "disk", free=SPACE_MARGIN_BYTES)
    with pytest.raises(OutputError, match="needs about 64.0 MiB"):
        require_free_space(disk / "out", 1, "--out", "a report")
    assert [format_bytes(n) for n in (512, 1536, 3 * GIB, 5 * 1024 * GIB)] == ["512 B", "1.5 KiB", "3.0 GiB",
                                                                               "5.0 TiB"]


def test_a_link_to_a_full_disk_is_checked_where_it_points(full_disk, tmp_path):
    disk = full_disk(tmp_path / "disk", free=GIB)
    (disk / "big").mkdir()
    link = tmp_path / "roomy" / "out"
    link.parent.mkdir()
    os.symlink(disk / "big", link)
    with pytest.raises(OutputError, match="1.0 GiB free"):
        require_free_space(link, 2 * GIB, "--out", "the recovered checkpoint")


def test_a_file_system_that_reports_no_size_is_not_checked(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 0))
    require_free_space(tmp_path / "out", 100 * GIB, "--out", "a checkpoint on a network mount")
