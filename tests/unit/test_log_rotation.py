"""The access log's batches are split across rotated files, none over the size limit."""

from __future__ import annotations

from pathlib import Path

from serve._logging import PrivateRotatingFileHandler


def test_a_batch_larger_than_a_file_fills_several(tmp_path: Path) -> None:
    path = tmp_path / "replica.log"
    handler = PrivateRotatingFileHandler(path, maxBytes=100, backupCount=5)
    lines = [f"line {i:02d} {'x' * 20}\n" for i in range(10)]  # 29 bytes each
    try:
        handler.write_lines("".join(lines[:2]))
        handler.write_lines("".join(lines[2:]))  # 232 bytes in one batch
    finally:
        handler.close()
    files = [Path(f"{path}.{n}") for n in range(5, 0, -1)] + [path]
    written = [f.read_text() for f in files if f.exists()]
    assert "".join(written) == "".join(lines)  # whole lines, in order, none lost
    assert all(len(text) < 100 for text in written)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files if f.exists())


def test_a_line_longer_than_a_file_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "replica.log"
    handler = PrivateRotatingFileHandler(path, maxBytes=10, backupCount=2)
    try:
        handler.write_lines("short\n")
        handler.write_lines("a line longer than ten bytes\nend\n")
    finally:
        handler.close()
    assert Path(f"{path}.2").read_text() == "short\n"
    assert Path(f"{path}.1").read_text() == "a line longer than ten bytes\n"
    assert path.read_text() == "end\n"
