"""common.validate and the CLI's error handling, in process: the shipped configs pass, `auto` settings are resolved
and said, clean image sets are remembered, unexpected errors are one line (the traceback with --debug)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from common.cli import run_cli
from common.config import load_config
from common.validate import check_run, image_problems, option_problems, resolve_auto
from tests.fixtures.real_layouts import make_dtd

PAPERS = sorted(p.parent.name for p in Path(__file__).resolve().parents[1].glob("papers/*/config.yaml"))


@pytest.mark.parametrize("slug", PAPERS)
def test_every_shipped_config_passes_on_both_profiles(slug):
    main = importlib.import_module(f"papers.{slug}.__main__")
    hook = getattr(main, "validate", None)
    for profile in ("embedded", "real"):
        cfg = load_config(main.CONFIG, profile)
        assert option_problems(cfg) + (hook(cfg) if hook else []) == [], (slug, profile)


def test_wise_ft_real_profile_picks_device_and_workers_and_says_so(monkeypatch):
    import torch
    import papers.wise_ft.__main__ as wise
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    said = []
    cfg = resolve_auto(load_config(wise.CONFIG, "real"), said.append)
    assert cfg["device"] == "cpu" and cfg["e2e"]["num_workers"] == 1
    assert said == ["device auto -> cpu (no CUDA device)", "e2e.num_workers auto -> 1 (2 CPU cores)"]
    cuda = load_config(wise.CONFIG, "real", ["device=cuda"])
    assert any("no CUDA device" in p for p in option_problems(cuda))
    assert load_config(wise.CONFIG, "real", ["e2e.num_workers=4"])["e2e"]["num_workers"] == 4  # a number, not "4"
    many = load_config(wise.CONFIG, "real", ["e2e.num_workers=many"])
    assert option_problems(many) == ["e2e.num_workers must be a number or auto, got 'many'"]


def test_clean_images_are_checked_once(tmp_path, monkeypatch):
    from common.data import build_dataset
    import common.data.images as images
    ds = build_dataset("dtd", make_dtd(tmp_path / "DATA"))
    assert image_problems([ds]) == []
    monkeypatch.setattr(images, "image_problem", lambda p: pytest.fail("a clean set is not opened again"))
    assert image_problems([ds]) == []
    Path(ds.test[0].impath).write_bytes(b"garbage")  # a changed file is checked again
    monkeypatch.undo()
    assert "1 of 28 images cannot be decoded" in image_problems([ds])[0]


def test_check_run_reads_only_what_the_command_reads(tmp_path):
    cfg = load_config("papers/coop/config.yaml", "real", [f"data_root={make_dtd(tmp_path / 'DATA')}",
                                                          "pretrained=random", "arch=tiny-rn"])
    check_run(cfg, (), weights=False)  # reads nothing: no dataset is needed
    with pytest.raises(Exception, match="dataset 'imagenet': folder"):
        check_run(cfg, ["datasets"], weights=False)  # the real profile's 11 datasets, only dtd present
    check_run({**cfg, "datasets": ["dtd"]}, ["datasets"], weights=True)


def _cli(tmp_path, command, argv):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("defaults: {}\n")
    return run_cli("demo", cfg, {"train": command}, "demo", argv)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    def boom(cfg):
        raise RuntimeError("something broke\nacross lines")

    with pytest.raises(SystemExit) as stop:
        _cli(tmp_path, boom, ["train", "--set", "datasets=[]", "--set", "seeds=[1]"])
    assert stop.value.code == 2  # an empty list of datasets is bad input, found before the command runs
    with pytest.raises(SystemExit) as stop:
        _cli(tmp_path, boom, ["train", "--set", "pretrained=random", "--set", "datasets=[dtd]",
                              "--set", f"data_root={make_dtd(tmp_path / 'DATA')}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and err[-1] == ("python -m papers.demo: error: RuntimeError: something broke | across "
                                                "lines (unexpected; rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="something broke"):
        _cli(tmp_path, boom, ["train", "--debug", "--set", "pretrained=random", "--set", "datasets=[dtd]",
                              "--set", f"data_root={tmp_path / 'DATA'}"])
