"""reports/budgets.md: the convergence records side by side, each marked current or stale against its tower."""
import json

from common.clip.loader import file_sha256
from common.report.budgets import budget_rows, budget_table, write_budgets
from tests.report.test_schema import MINIMAL


def _record(paper, backbone, checkpoint, factor=10.0):
    return {"paper": paper, "method": paper, "variant": "", "backbone": backbone, "checkpoint": checkpoint,
            "official_lr": 0.002, "lr_factor": factor, "lr": 0.002 * factor, "official_epochs": 200,
            "justified_epochs": 50, "mean_val_by_lr": {"1": 40.0, "10": 55.5}, "mean_val": {"50": 55.0, "200": 55.5}}


def test_budget_table_marks_records_made_on_another_checkpoint(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "checkpoints").mkdir(parents=True)
    (data / "checkpoints" / "tiny-rn.pt").write_bytes(b"the current tower")
    monkeypatch.setenv("VLMT_DATA", str(data))
    now = file_sha256(data / "checkpoints" / "tiny-rn.pt")
    for slug, ckpt in (("fresh", now), ("stale", "0123456789abcdef")):
        (tmp_path / "papers" / slug).mkdir(parents=True)
        (tmp_path / "papers" / slug / "convergence.json").write_text(json.dumps(_record(slug, "tiny-rn", ckpt)))
    (tmp_path / "papers" / "untrained").mkdir()               # no record: not listed
    rows = {r["paper"]: r for r in budget_rows(tmp_path / "papers")}
    assert set(rows) == {"fresh", "stale"}
    assert rows["fresh"]["current"] is True and rows["stale"]["current"] is False
    assert rows["fresh"]["official_val"] == 40.0 and rows["fresh"]["chosen_val"] == 55.5
    table = budget_table(tmp_path / "papers")
    assert "| fresh | tiny-rn | yes | x10 = 0.02 | 40.0 | 55.5 | 50 of 200 | trained |" in table
    assert "| stale | tiny-rn | **no** (0123456789abcdef) |" in table
    assert "(rerun their study): stale." in table
    out = write_budgets(tmp_path / "papers", tmp_path / "reports")
    assert out.read_text() == table


def test_budget_table_without_the_tower_built(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMT_DATA", str(tmp_path / "nothing"))
    (tmp_path / "papers" / "p").mkdir(parents=True)
    (tmp_path / "papers" / "p" / "convergence.json").write_text(json.dumps(_record("p", "tiny-vit", "abc", factor=1.0)))
    (tmp_path / "papers" / "p" / "paper.yaml").write_text(
        json.dumps({**MINIMAL, "slug": "p", "budget": {"pending": "the longer runs have not run"}}))   # JSON is YAML
    assert budget_rows(tmp_path / "papers")[0]["current"] is None
    table = budget_table(tmp_path / "papers")
    assert "| p | tiny-vit | - | x1 = 0.002 |" in table and table.rstrip().count("**pending**") == 1
