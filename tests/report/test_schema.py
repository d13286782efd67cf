"""paper.yaml validation: every bad key or row is named in the error."""
import copy
from pathlib import Path

import pytest
import yaml

from common.report.schema import PaperSpecError, load_paper, parse_paper

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {
    "slug": "demo", "title": "A paper", "authors": ["A. Author"], "venue": "CVPR 2022", "year": 2022,
    "arxiv": "2203.05557", "official_repo": "KaiyangZhou/CoOp",
    "reported": [{"protocol": "base2novel", "backbone": "ViT-B/16", "method": "cocoop", "shots": 16,
                  "metric": "novel", "table": "Table 1", "values": {"ImageNet": 70.43, "Caltech101": 93.81}},
                 {"protocol": "base2novel", "backbone": "ViT-B/16", "method": "coop", "shots": 16, "metric": "novel",
                  "table": "Table 1", "dataset": "ImageNet", "value": 67.88, "verified": False,
                  "note": "copied from a follow-up paper"}],
    "claims": [{"id": "novel_gain", "text": "CoCoOp beats CoOp on novel classes", "protocol": "base2novel",
                "source": "paper", "ref": "Table 1",
                "check": "mean(novel, method=cocoop) > mean(novel, method=coop)"}],
}


def spec(**changes):
    d = copy.deepcopy(MINIMAL)
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    return d


def test_minimal_spec_and_row_groups():
    p = parse_paper(spec())
    assert [(r.method, r.dataset, r.value, r.verified) for r in p.reported] == [
        ("cocoop", "ImageNet", 70.43, True), ("cocoop", "Caltech101", 93.81, True), ("coop", "ImageNet", 67.88, False)]
    assert p.claims[0].check.selections[0].metric == "novel"
    assert p.methods() == ["cocoop", "coop"]
    assert p.arxiv_url == "https://arxiv.org/abs/2203.05557"
    assert p.repo_url == "https://github.com/KaiyangZhou/CoOp"


@pytest.mark.parametrize("slug", ["zeroshot_clip", "linear_probe"])
def test_baseline_paper_yaml_files_are_valid(slug):
    p = load_paper(REPO / "papers" / slug)
    assert p.slug == slug and p.arxiv == "2103.00020" and p.official_repo == "openai/CLIP"
    assert p.claims and p.reported and p.deviations
    assert all(r.note for r in p.reported if not r.verified)
    assert p.backbone_for("embedded") == "tiny-rn" and p.backbone_for("real") == "RN50"


@pytest.mark.parametrize("data, match", [
    (spec(colour="red"), r"top level: unknown key\(s\) \['colour'\]"),
    (spec(title=None), r"missing key\(s\) \['title'\]"),
    (spec(year="2022"), "year must be an integer"),
    (spec(arxiv=2103.0002), r"arxiv 2103.0002 must be a quoted string"),
    (spec(arxiv="arXiv:2103"), r"arxiv 'arXiv:2103' is not an arXiv id"),
    (spec(official_repo="not a repo"), "official_repo"),
    (spec(slug="Demo-1"), "slug 'Demo-1' must be lower-case"),
    (spec(authors=[]), "authors must be a non-empty list"),
    (spec(reported=[{**MINIMAL["reported"][1], "valeu": 1}]), r"reported\[0\] \(ImageNet\): unknown key\(s\) \['valeu'\]"),
    (spec(reported=[{k: v for k, v in MINIMAL["reported"][1].items() if k != "table"}]),
     r"reported\[0\] \(ImageNet\): missing key\(s\) \['table'\]"),
    (spec(reported=[{**MINIMAL["reported"][1], "protocol": "few-shot"}]), "protocol 'few-shot' is not one of"),
    (spec(reported=[{**MINIMAL["reported"][1], "note": ""}]), "verified: false needs a note"),
    (spec(reported=[{**MINIMAL["reported"][1], "value": "67.9%"}]), "value for ImageNet must be a number"),
    (spec(reported=[{**MINIMAL["reported"][0], "dataset": "ImageNet"}]), "either dataset \\+ value, or values"),
    (spec(reported=[{**MINIMAL["reported"][1], "shots": -1}]), "shots must be a non-negative integer"),
    (spec(claims=[MINIMAL["claims"][0], MINIMAL["claims"][0]]), r"claims\[1\]: duplicate id 'novel_gain'"),
    (spec(claims=[{**MINIMAL["claims"][0], "check": "mean(novel, method=cocoop) >"}]),
     r"claims\[0\] \(novel_gain\)\.check: syntax error"),
    (spec(claims=[{**MINIMAL["claims"][0], "check": "mean(novel, method=cocoop, sots=16) > 1"}]),
     r"claims\[0\] \(novel_gain\)\.check: mean\(\): unknown filter 'sots'"),
    (spec(claims=[{**MINIMAL["claims"][0], "untestable": "timing"}]), "exactly one of check .* or untestable"),
    (spec(claims=[{**MINIMAL["claims"][0], "profiles": ["gpu"]}]), "profiles must be a list out of"),
    (spec(claims=[{**MINIMAL["claims"][0], "protocol": "b2n"}]), "protocol 'b2n' is not one of"),
    (spec(real_args=["--set", "x=1"]), "real_args must be the extra command-line arguments"),
    (spec(defaults={"coop": {"colour": "x"}}), r"defaults\.coop: unknown key\(s\) \['colour'\]"),
    (spec(deviations=[{"what": "x", "because": "y"}]), r"deviations\[0\] must be a string or"),
])
def test_bad_specs_name_the_problem(data, match):
    with pytest.raises(PaperSpecError, match=match):
        parse_paper(data, where="papers/demo/paper.yaml")


def test_load_checks_folder_name_and_yaml(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "paper.yaml").write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(PaperSpecError, match="slug 'demo' differs from its folder name 'other'"):
        load_paper(tmp_path / "other")
    (tmp_path / "other" / "paper.yaml").write_text("slug: [unclosed")
    with pytest.raises(PaperSpecError, match="not valid YAML"):
        load_paper(tmp_path / "other" / "paper.yaml")
    with pytest.raises(FileNotFoundError, match="every paper folder needs a paper.yaml"):
        load_paper(tmp_path / "missing")


def test_readme_example_is_a_valid_paper_yaml():
    import re
    text = (REPO / "common" / "report" / "README.md").read_text()
    p = parse_paper(yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1)))
    assert p.slug == "cocoop" and p.backbone_for("embedded") == "tiny-vit"
    assert [c.check is None for c in p.claims] == [False, False, False, False, True]
