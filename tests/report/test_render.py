"""REPORT.md rendering and the CLI: content, honesty markers, figures only where data exists, determinism."""
import shutil
from pathlib import Path

import pytest
import yaml

from common.report.__main__ import main
from common.report.render import write_report
from tests.report.builders import rec, world

REPO = Path(__file__).resolve().parents[2]
PAPERS = REPO / "papers"


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_report_content_and_byte_determinism(tmp_path):
    runs = world(tmp_path / "runs")
    path = write_report("zeroshot_clip", PAPERS, runs, tmp_path / "a")
    write_report("zeroshot_clip", PAPERS, runs, tmp_path / "b")
    a, b = files(path.parent), files(tmp_path / "b" / "zeroshot_clip")
    assert a == b                                          # same runs -> identical bytes, figures included
    text = a["REPORT.md"].decode()
    for needle in ["# zeroshot_clip: replication report", "[2103.00020](https://arxiv.org/abs/2103.00020)",
                   "[openai/CLIP](https://github.com/openai/CLIP)", "Absolute numbers are not comparable with the paper",
                   "claims are judged on relative differences", "58.18 †", "| Tip-Adapter Table 2 |",
                   "Embedded profile — paper claims: 3 of 4 reproduced (1 not testable).",
                   "### fewshot · tiny-rn · top-1 accuracy (%)", "| linear_probe | 16 | 48.00 ± 1.00 |",
                   "Decided by: 7.50 < 18.00 → true", "## Real profile", "Not run here",
                   "python -m papers.zeroshot_clip reproduce --profile real --set data_root=/path/to/DATA",
                   "python -m papers.linear_probe reproduce --profile embedded",
                   "## Deviations from the official code", "- **real**: not run here."]:
        assert needle in text, needle
    pngs = sorted(n for n in a if n.endswith(".png"))
    assert pngs == ["fig_embedded_base2novel_tiny-rn.png", "fig_embedded_domain_generalization_tiny-rn.png",
                    "fig_embedded_fewshot_tiny-rn.png"]
    assert all(f"]({n})" in text for n in pngs)
    for n in pngs:
        assert a[n][:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in a[n] and b"Creation" not in a[n]
    assert str(tmp_path) not in text


def test_figures_only_for_existing_data_and_stale_ones_removed(tmp_path):
    runs = tmp_path / "runs"
    rec(runs, "zeroshot_clip", "d", {"top1": 50.0}, protocol="zeroshot", variant="single", seed=0)
    out = tmp_path / "out" / "zeroshot_clip"
    out.mkdir(parents=True)
    (out / "fig_embedded_fewshot_tiny-rn.png").write_bytes(b"stale")
    text = write_report("zeroshot_clip", PAPERS, runs, tmp_path / "out").read_text()
    assert not list(out.glob("*.png")) and "![" not in text
    assert "mixes several" not in text and "– not testable" in text
    assert "not testable: no embedded-profile runs of protocol fewshot." in text   # the claims say why


def test_real_profile_numbers_beside_the_paper(tmp_path):
    papers = tmp_path / "papers"
    (papers / "demo").mkdir(parents=True)
    (papers / "demo" / "paper.yaml").write_text(yaml.safe_dump({
        "slug": "demo", "title": "Demo", "authors": ["A"], "venue": "V", "year": 2022, "arxiv": None,
        "official_repo": None, "backbone": "RN50",
        "reported": [{"protocol": "fewshot", "method": "linear_probe", "backbone": "RN50", "shots": 16,
                      "metric": "top1", "table": "Table 9", "values": {"EMB-Objects": 50.0, "Nowhere": 1.0}}],
        "claims": [{"id": "lp", "text": "t", "protocol": "fewshot", "source": "project",
                    "check": "mean(top1, method=linear_probe, shots=16) > mean(top1, method=linear_probe, shots=1)"}],
        "deviations": [{"what": "smaller batch", "why": "memory"}], "budget": {"none": "a test paper"},
        "real_args": "--set descriptors=/path/to/files"}))
    text = write_report("demo", papers, world(tmp_path / "emb_only")).read_text()
    assert text.count("python -m papers.demo reproduce --profile real --set data_root=/path/to/DATA --set "
                      "descriptors=/path/to/files") == 2                # "not run here" and the Reproduce section
    runs = world(tmp_path / "runs", profile="real", backbone="RN50")
    world(runs)                                                       # and the embedded runs
    text = write_report("demo", papers, runs).read_text()             # default out: next to paper.yaml
    assert (papers / "demo" / "REPORT.md").exists()
    assert "| linear_probe | RN50 | 16 | EMB-Objects | top1 | 50.00 | 48.00 ± 1.00 (3) | -2.00 |" in text
    assert "1 of 2 paper numbers have a matching real run; 1 do not" in text
    assert "| [lp](#claim-lp) | project | t | ✔ reproduced | ✔ reproduced |" in text and "### Claim lp" in text
    assert "- **real**: ✔ reproduced" in text and "Grid: datasets emb_objects, emb_scenes, emb_textures; shots 1, 16" in text
    assert "- smaller batch *Why*: memory" in text
    assert (papers / "demo" / "fig_real_fewshot_RN50.png").exists()


def test_cli(tmp_path, capsys):
    runs = world(tmp_path / "runs")
    papers, out = tmp_path / "papers", tmp_path / "out"
    for slug in ("zeroshot_clip", "linear_probe"):
        (papers / slug).mkdir(parents=True)
        shutil.copy(PAPERS / slug / "paper.yaml", papers / slug / "paper.yaml")
    assert main(["--all", "--papers", str(papers), "--runs", str(runs), "--out", str(out)]) == 0
    assert sorted(p.parent.name for p in out.glob("*/REPORT.md")) == ["linear_probe", "zeroshot_clip"]
    assert main(["nope", "--papers", str(papers), "--runs", str(runs), "--out", str(out)]) == 2
    assert "papers with a paper.yaml: linear_probe, zeroshot_clip" in capsys.readouterr().err
    bad = tmp_path / "papers" / "bad"
    bad.mkdir(parents=True)
    (bad / "paper.yaml").write_text("slug: bad\ntitle: x\n")
    assert main(["--all", "--papers", str(papers), "--runs", str(runs), "--out", str(out / "x")]) == 2
    assert "missing key(s)" in capsys.readouterr().err
    assert (out / "x" / "zeroshot_clip" / "REPORT.md").exists()      # the good papers are still reported
    assert main(["--leaderboard", "--runs", str(runs), "--out", str(out / "reports")]) == 0
    assert (out / "reports" / "leaderboard.md").exists()
    with pytest.raises(SystemExit):
        main([])


def test_paper_specific_figures_are_linked_when_drawn(tmp_path):
    import yaml

    from common.report.render import write_report
    papers = tmp_path / "papers"
    (papers / "demo").mkdir(parents=True)
    (papers / "demo" / "paper.yaml").write_text(yaml.safe_dump({
        "slug": "demo", "title": "Demo", "authors": ["A"], "venue": "X", "year": 2024, "arxiv": "0000.00000",
        "official_repo": "a/b", "reported": [], "claims": [], "budget": {"none": "a test paper"},
        "figures": [{"path": "heat.png", "caption": "search grid"}, {"path": "later.png"}]}))
    (papers / "demo" / "heat.png").write_bytes(b"png")
    write_report("demo", papers_root=papers, runs_root=tmp_path / "runs")
    text = (papers / "demo" / "REPORT.md").read_text()
    assert "![search grid](heat.png)" in text and "Not drawn yet (no run output): later.png." in text


def test_a_trained_budget_needs_its_convergence_record(tmp_path):
    """A paper that declares a training budget is refused without a record, or when config.yaml trains less
    than the record justifies; with a matching record the report shows it."""
    import json

    from common.report.schema import PaperSpecError
    papers = tmp_path / "papers"
    (papers / "demo").mkdir(parents=True)
    base = {"slug": "demo", "title": "Demo", "authors": ["A"], "venue": "X", "year": 2024, "arxiv": None,
            "official_repo": None, "reported": [], "claims": [], "budget": {"epochs": "train.epochs", "lr": "train.lr"}}
    (papers / "demo" / "paper.yaml").write_text(yaml.safe_dump(base))
    (papers / "demo" / "config.yaml").write_text(yaml.safe_dump(
        {"defaults": {"train": {"epochs": 40, "lr": 0.02}}, "profiles": {"embedded": {}, "real": {}}}))
    with pytest.raises(PaperSpecError, match="has no convergence record"):
        write_report("demo", papers_root=papers, runs_root=tmp_path / "runs")
    record = {"paper": "demo", "method": "demo", "variant": "", "backbone": "tiny-rn", "checkpoint": "x", "shots": 16,
              "seed": 1, "official_epochs": 200, "official_lr": 0.002, "lr_factors": [1, 10], "lr_factor": 10.0,
              "lr": 0.02, "tolerance": 1.0, "mean_val_by_lr": {"1": 30.0, "10": 60.0},
              "mean_val": {"25": 50.0, "50": 59.5, "100": 60.0, "200": 60.2}, "justified_epochs": 50,
              "datasets": {"emb_x": {"final": {e: {"val": v, "loss": 1.0, "steps": 1} for e, v in
                                               {"25": 50.0, "50": 59.5, "100": 60.0, "200": 60.2}.items()},
                                     "val_curve": [{"step": 1, "val": 10.0}], "loss_curve": []}}}
    (papers / "demo" / "convergence.json").write_text(json.dumps(record))
    with pytest.raises(PaperSpecError, match="justifies at least 50 epochs at lr 0.02"):
        write_report("demo", papers_root=papers, runs_root=tmp_path / "runs")    # 40 < 50
    (papers / "demo" / "config.yaml").write_text(yaml.safe_dump(
        {"defaults": {"train": {"epochs": 50, "lr": 0.02}}, "profiles": {"embedded": {}, "real": {}}}))
    text = write_report("demo", papers_root=papers, runs_root=tmp_path / "runs").read_text()
    assert "**50 epochs** (official 200)" in text and "justified." in text and "fig_convergence.png" in text
