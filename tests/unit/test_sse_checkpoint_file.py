"""The SSE checkpoint file: replaced atomically and fsynced; a missing, empty or torn one is no crash."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from adapters import sse
from adapters.sse import read_checkpoint, write_checkpoint


def test_a_written_checkpoint_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "wiki.id"
    write_checkpoint(path, "1700000000-42")
    write_checkpoint(path, "1700000000-43")
    assert read_checkpoint(path) == "1700000000-43"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wiki.id"]  # no temporary file left


def test_the_file_and_then_its_directory_are_fsynced_around_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        steps.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(sse.os, "fsync", fsync)
    monkeypatch.setattr(sse.os, "replace", replace)
    write_checkpoint(tmp_path / "wiki.id", "7")
    assert steps == ["fsync file", "replace", "fsync dir"]


def test_a_crash_before_the_rename_keeps_the_old_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wiki.id"
    write_checkpoint(path, "old")

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(sse.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_checkpoint(path, "new")
    assert read_checkpoint(path) == "old"


def test_a_temporary_file_left_by_a_crash_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "wiki.id"
    write_checkpoint(path, "old")
    (tmp_path / "wiki.id.tmp").write_text("ne")  # killed half-way through the next write
    with caplog.at_level(logging.WARNING, "adapters.sse"):
        assert read_checkpoint(path) == "old"
    assert "left by an interrupted write" in caplog.text
    write_checkpoint(path, "new")  # the next write replaces it
    assert read_checkpoint(path) == "new"
    assert not (tmp_path / "wiki.id.tmp").exists()


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"", "is empty"), (b"\n", "is empty"), (b"1700000000-4", "is torn"), (b"17\xff\n", "is torn")],
)
def test_an_empty_or_torn_file_means_starting_from_last_event_id_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, what: str
) -> None:
    path = tmp_path / "wiki.id"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, "adapters.sse"):
        assert read_checkpoint(path, "99") is None
    [line] = [r.getMessage() for r in caplog.records]
    assert what in line and "starting from last_event_id '99'" in line


def test_a_missing_file_means_starting_from_the_live_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "adapters.sse"):
        assert read_checkpoint(tmp_path / "none.id") is None
    assert "does not exist yet: starting from the live stream" in caplog.text


def test_an_unreadable_checkpoint_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    from asyncflow.errors import ConfigError

    (tmp_path / "wiki.id").mkdir()
    with pytest.raises(ConfigError, match="cannot read the SSE checkpoint .*wiki.id"):
        read_checkpoint(tmp_path / "wiki.id")
