"""crosstrain/files.py: whole-file writes and figures."""

import json
import os

import pytest

from crosstrain.files import atomic_path, atomic_write, pyplot, save_figure, write_json


def test_atomic_write_replaces_whole_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, "old")
    atomic_write(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    # Created as open() would: the umask decides the mode, not a private 0600 temp file.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("the old one")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp.name.endswith(".tmp")  # same filesystem
            tmp.write_text("half of the new one")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "the old one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def test_write_json_makes_non_finite_numbers_json_safe(tmp_path):
    write_json(tmp_path / "s.json", {"loss": float("nan"), "peak": float("inf"), "n": 3})
    assert json.loads((tmp_path / "s.json").read_text()) == {"loss": None, "peak": "inf", "n": 3}


def test_save_figure_writes_the_format_of_its_suffix(tmp_path):
    plt = pyplot()
    for name, magic in (("a.png", b"\x89PNG\r\n\x1a\n"), ("b.pdf", b"%PDF")):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        save_figure(fig, tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(magic)
        assert not plt.fignum_exists(fig.number)  # closed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.pdf"]
