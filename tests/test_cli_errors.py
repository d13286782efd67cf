"""The CLI as a new user meets it: `python -m papers.<slug>` in a subprocess on a fake CoOp DATA tree and a saved
random tiny CLIP. Bad input gets one line naming the problem and the fix, a non-zero exit, no traceback and no
partial output; the real profile never writes into the user's data folder."""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.clip import load_clip, save_clip_checkpoint
from tests.fixtures.real_layouts import make_dtd, make_eurosat

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A CoOp DATA tree (dtd, eurosat) and a random tiny-rn checkpoint, shared by the module's tests (read-only)."""
    root = tmp_path_factory.mktemp("cli")
    make_dtd(root / "DATA")
    make_eurosat(root / "DATA")
    torch.manual_seed(0)
    ckpt = save_clip_checkpoint(load_clip("tiny-rn", "random").model, root / "tiny-rn.pt")
    return {"data": root / "DATA", "ckpt": ckpt}


def _sets(world, **extra) -> list[str]:
    opts = {"arch": "tiny-rn", "pretrained": str(world["ckpt"]), "data_root": str(world["data"]), "datasets": "[dtd]",
            "shots": "[1]", "seeds": "[1]", **extra}
    return [a for k, v in opts.items() if v is not None for a in ("--set", f"{k}={v}")]


def cli(tmp_path, slug: str, *args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLMT_RUNS": str(tmp_path / "runs"), "VLMT_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))) if limit_bytes else None
    return subprocess.run([sys.executable, "-m", f"papers.{slug}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def one_line_error(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    """The whole stderr is one line `python -m papers.<slug>: error: ...`; nothing on stdout."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1 and ": error: " in lines[0], proc.stderr
    assert not proc.stdout.strip(), proc.stdout
    return lines[0]


def nothing_written(tmp_path) -> None:
    """No run record, no feature, no checkpoint, no temporary file: a failed run leaves nothing behind."""
    written = [p for d in ("runs", "cache") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert not [p for p in written if "image_checks" not in p.parts and "fewshot" not in p.parts], written
    assert not [p for p in written if p.name.endswith(".tmp")], written


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# -------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("sets, message", [
    ({"train.lr": "-1"}, "train.lr must be > 0, got -1.0"),
    ({"shots": "0"}, "shots must be >= 1, got 0"),
    ({"datasets": "[dtdd]"}, "datasets: unknown dataset 'dtdd'; did you mean dtd"),
    ({"train.lr": "fast"}, "train.lr: expected a number (like 0.002), got 'fast'"),
    ({"train.lrr": "1"}, "unknown config key 'train.lrr'; did you mean train.lr"),
])
def test_bad_options_get_one_line_before_any_work(tmp_path, world, sets, message):
    line = one_line_error(cli(tmp_path, "coop", "train", "--profile", "real", *_sets(world, **sets)))
    assert message in line, line
    nothing_written(tmp_path)


def test_numbers_and_lists_as_users_type_them(tmp_path, world):
    proc = cli(tmp_path, "coop", "train", "--print-config", *_sets(world, **{"train.lr": "1e-3", "shots": "16",
                                                                          "datasets": "emb_satellite"}))
    assert proc.returncode == 0, proc.stderr
    import json
    cfg = json.loads(proc.stdout)
    assert cfg["train"]["lr"] == 0.001 and cfg["shots"] == [16] and cfg["datasets"] == ["emb_satellite"]


def test_wise_ft_refuses_shots_and_dg_shots_zero(tmp_path, world):
    line = one_line_error(cli(tmp_path, "wise_ft", "train", "--set", "shots=4"))
    assert "does not use 'shots'" in line and "dg_shots" in line
    line = one_line_error(cli(tmp_path, "wise_ft", "train", "--set", "dg_shots=0"))
    assert "dg_shots must be >= 1 (null: the whole train split), got 0" in line
    nothing_written(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_refused(tmp_path, world):
    line = one_line_error(cli(tmp_path, "wise_ft", "train", "--profile", "real", "--set", "device=cuda"))
    assert "no CUDA device; use --set device=cpu (or auto)" in line


# ----------------------------------------------------------------------------------------------- data
def test_missing_data_root_and_weights_are_both_named_before_the_model_loads(tmp_path, world):
    line = one_line_error(cli(tmp_path, "coop", "train", "--profile", "real",
                              *_sets(world, data_root=tmp_path / "nowhere", pretrained=tmp_path / "RN50.pt")))
    assert f"data_root {tmp_path / 'nowhere'} does not exist" in line and "--set data_root=" in line
    assert f"CLIP checkpoint file {tmp_path / 'RN50.pt'} does not exist" in line
    assert line.index("data_root") < line.index("CLIP checkpoint")
    nothing_written(tmp_path)


def test_missing_dataset_names_its_folder_and_layout(tmp_path, world):
    line = one_line_error(cli(tmp_path, "coop", "train", "--profile", "real", *_sets(world, datasets="[dtd, ucf101]")))
    assert f"dataset 'ucf101': folder {world['data'] / 'ucf101'} does not exist" in line
    assert "split_zhou_UCF101.json" in line  # the expected layout, on the same line
    nothing_written(tmp_path)


def test_corrupt_images_are_all_named_before_training(tmp_path, world):
    data = tmp_path / "DATA"
    make_dtd(data)
    bad = [data / "dtd/images/banded/banded_0001.jpg", data / "dtd/images/bubbly/bubbly_0007.jpg"]
    for p in bad:
        p.write_bytes(b"\xff\xd8 not a jpeg")
    line = one_line_error(cli(tmp_path, "coop", "train", "--profile", "real", *_sets(world, data_root=data)))
    assert "2 of 28 images cannot be decoded" in line and all(str(p) in line for p in bad)
    nothing_written(tmp_path)


def test_read_only_data_root_is_never_written(tmp_path, world):
    before = snapshot(world["data"])
    os.chmod(world["data"] / "dtd", 0o555)  # (root ignores the mode; the snapshot is the real check)
    try:
        proc = cli(tmp_path, "coop", "train", "--profile", "real", *_sets(world, epochs=1, min_steps=0))
    finally:
        os.chmod(world["data"] / "dtd", 0o755)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(world["data"]) == before
    assert list((tmp_path / "cache" / "fewshot").glob("dtd-*/shot_1-seed_1.json"))
    assert re.search(r"fewshot dtd coop/m16_end k=1 seed=1: mean_per_class [\d.]+  top1 [\d.]+", proc.stdout)
    # eval prints its metrics too
    proc = cli(tmp_path, "coop", "eval", "--profile", "real", *_sets(world, epochs=1, min_steps=0))
    assert proc.returncode == 0 and "dtd -> dtd" in proc.stdout and "top1" in proc.stdout, proc.stderr


def test_a_failed_write_names_the_file_and_leaves_nothing_half_written(tmp_path, world):
    proc = cli(tmp_path, "linear_probe", "train", "--profile", "real", *_sets(world), limit_bytes=2000)
    line = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: cannot write " in line and "the write was cut short" in line, line
    assert not list((tmp_path / "runs").rglob("metrics.json"))
    assert not [p for d in ("runs", "cache") for p in (tmp_path / d).rglob("*.tmp")]


def test_force_is_a_documented_option(tmp_path):
    proc = cli(tmp_path, "coop", "--help")
    assert proc.returncode == 0 and "force" in proc.stdout and "restarts interrupted ones" in proc.stdout


def test_bad_profile_keeps_argparse_usage(tmp_path):
    proc = cli(tmp_path, "coop", "train", "--profile", "gpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid choice: 'gpu'" in proc.stderr and proc.stderr.startswith("usage:")
