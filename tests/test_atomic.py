"""A failed write (disk full, file-size limit) names the file and the cause and leaves nothing half-written."""
import os

import pytest
import torch

from common.atomic import atomic_write, temp_path, torch_save_atomic, write_text_atomic
from common.errors import OutputWriteError, UserError

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


@needs_dev_full
def test_a_full_disk_is_named_and_the_old_file_survives(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    temp_path(path).symlink_to("/dev/full")  # every write to the temporary file hits a full disk
    with pytest.raises(OutputWriteError) as err:
        write_text_atomic(path, "new" * 10000)
    assert isinstance(err.value, UserError)
    assert f"cannot write {path}: no space left on the device" in str(err.value)
    assert path.read_text() == "old" and not temp_path(path).exists()


@needs_dev_full
def test_torch_short_write_is_explained(tmp_path):
    path = tmp_path / "features.pt"
    temp_path(path).symlink_to("/dev/full")
    with pytest.raises(OutputWriteError, match=r"the write was cut short \(the disk is full or a file-size limit was hit\)"):
        atomic_write(path, lambda tmp: torch.save({"x": torch.zeros(1000)}, tmp))  # torch says "unexpected pos"
    assert not path.exists() and not temp_path(path).exists()
    atomic_write(path, lambda tmp: torch.save({"x": torch.zeros(3)}, tmp))  # and works once there is room
    assert torch.load(path)["x"].shape == (3,)


def test_torch_save_is_byte_for_byte_reproducible(tmp_path, monkeypatch):
    # each process fills its own temporary file; the saved bytes must not depend on its name
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    monkeypatch.setattr(os, "getpid", lambda: 111)
    a = torch_save_atomic(state, tmp_path / "a" / "ckpt.pt")
    monkeypatch.setattr(os, "getpid", lambda: 222)
    b = torch_save_atomic(state, tmp_path / "b" / "ckpt.pt")
    assert a.read_bytes() == b.read_bytes()
    assert all(torch.equal(torch.load(b)[k], v) for k, v in state.items())
    # what it replaces: torch.save into the temporary file names the archive after it
    c = atomic_write(tmp_path / "c" / "ckpt.pt", lambda tmp: torch.save(state, tmp))
    monkeypatch.setattr(os, "getpid", lambda: 333)
    d = atomic_write(tmp_path / "d" / "ckpt.pt", lambda tmp: torch.save(state, tmp))
    assert c.read_bytes() != d.read_bytes()
