import pytest
import torch
import torch.nn.functional as F

from common.clip import zeroshot_classifier
from common.engine import TrainConfig
from common.engine.batched import RunSchedule
from common.engine.runs import load_records
from papers.vp import __main__ as vp
from papers.vp.method import (PixelPrompt, VPRun, n_parameters, padding_mask, predict, scaled_size, train_prompts,
                              vp_logits)
from tests.papers.helpers import toy_overrides

NAMES = ["red square", "green circle", "blue triangle"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(bundle, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, bundle.image_size, bundle.image_size, generator=g)


def test_parameter_count_and_size_scaling_follow_the_paper():
    assert n_parameters("padding", 30, 224) == 69_840          # 2*3*30*224 + 2*3*164*30
    assert n_parameters("fixed_patch", 30, 224) == n_parameters("random_patch", 30, 224) == 2700
    assert scaled_size(30, 224) == 30 and scaled_size(30, 64) == 9 and scaled_size(30, 48) == 6
    assert scaled_size(1, 48) == 1                              # never below one pixel
    p = PixelPrompt("padding", 6, 48)
    assert sum(t.numel() for t in p.parameters()) == n_parameters("padding", 6, 48) == 2 * 3 * 6 * 48 + 2 * 3 * 36 * 6
    with pytest.raises(ValueError, match="padding size"):
        PixelPrompt("padding", 24, 48)                          # nothing left inside the frame
    with pytest.raises(ValueError, match="shape"):
        PixelPrompt("circle", 3, 48)


def test_padding_touches_only_the_border_frame():
    S, p = 48, 6
    torch.manual_seed(0)
    img = PixelPrompt("padding", p, S).image()[0]
    mask = padding_mask(p, S)
    assert int(mask.sum()) == S * S - (S - 2 * p) ** 2 == 1008   # hand count: 48^2 - 36^2
    nonzero = (img != 0).any(0)
    assert torch.equal(nonzero, mask)
    assert torch.all(img[:, p:S - p, p:S - p] == 0)
    # the frame is the four official blocks, in place
    pr = PixelPrompt("padding", p, S)
    full = pr.image()[0]
    assert torch.equal(full[:, :p], pr.pad_up[0]) and torch.equal(full[:, S - p:], pr.pad_down[0])
    assert torch.equal(full[:, p:S - p, :p], pr.pad_left[0]) and torch.equal(full[:, p:S - p, S - p:], pr.pad_right[0])


def test_patches_sit_where_the_official_prompters_put_them():
    S, p = 16, 4
    fixed = PixelPrompt("fixed_patch", p, S).image()[0]
    assert torch.equal((fixed != 0).any(0).nonzero().amax(0), torch.tensor([p - 1, p - 1]))
    rnd = PixelPrompt("random_patch", p, S, runs=2)
    locs = torch.tensor([[0, 11], [5, 2]])
    img = rnd.image(torch.arange(2), locs)
    for i, (r, c) in enumerate(locs.tolist()):
        assert torch.equal(img[i, :, r:r + p, c:c + p], rnd.patch[i])
        assert int((img[i] != 0).any(0).sum()) == p * p
    drawn = rnd.draw_locations(1000, torch.Generator().manual_seed(0))
    assert drawn.min() == 0 and drawn.max() == S - p - 1       # official np.random.choice(isize - psize)


def test_zero_prompt_gives_exactly_zero_shot_clip(tiny_clip):
    x = _images(tiny_clip)
    w = zeroshot_classifier(tiny_clip, NAMES, ["a photo of a {}."], cache_dir=None)
    with torch.no_grad():
        ref = 7.0 * F.normalize(tiny_clip.model.encode_image(x).float(), dim=-1) @ w.t()
    for shape in ("padding", "fixed_patch", "random_patch"):
        prompt = PixelPrompt(shape, 3, tiny_clip.image_size)
        with torch.no_grad():
            for t in prompt.parameters():
                t.zero_()
        ours = predict(tiny_clip, prompt, 0, x, w, 7.0, batch_size=3)
        assert torch.equal(ours, predict(tiny_clip, None, 0, x, w, 7.0, batch_size=3))   # x + 0 is x
        assert torch.allclose(ours, ref, atol=1e-5)
    # a non-zero prompt changes the logits (the check above can fail)
    moved = predict(tiny_clip, PixelPrompt("padding", 3, tiny_clip.image_size), 0, x, w, 7.0)
    assert (moved - ref).abs().max() > 1e-4


def test_gradients_reach_only_the_prompt_and_each_run_its_own_slice(tiny_rn):
    S = tiny_rn.image_size
    prompt = PixelPrompt("padding", 4, S, runs=2)
    x = _images(tiny_rn, 6)
    w = zeroshot_classifier(tiny_rn, NAMES, ["a photo of a {}."], cache_dir=None)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    own = torch.tensor([1, 1, 1, 1, 1, 1])                     # every image belongs to run 1
    logits = vp_logits(tiny_rn, prompt.prompted(x, own * 0, torch.tensor([1])), w, 10.0)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is None and not p.requires_grad for p in tiny_rn.model.parameters())
    for t in prompt.parameters():
        assert t.grad[1].abs().sum() > 0 and torch.all(t.grad[0] == 0)


def _schedule(epochs, n, seed=1, lr=40.0):
    cfg = TrainConfig(epochs=epochs, lr=lr, optimizer="sgd", momentum=0.9, weight_decay=0.0, warmup_epochs=1,
                      warmup_type="linear", schedule_unit="iter", seed=seed)
    return RunSchedule(cfg, n, 4, label=str(seed))


def test_runs_trained_together_equal_runs_trained_alone(tiny_vit):
    S = tiny_vit.image_size
    w = zeroshot_classifier(tiny_vit, NAMES, ["a photo of a {}."], cache_dir=None)
    data = [(_images(tiny_vit, 6, seed=s), torch.tensor([0, 1, 2, 0, 1, 2])) for s in (1, 2)]
    inits = [PixelPrompt("padding", 3, S, 1, torch.Generator().manual_seed(s)) for s in (1, 2)]

    def train(which):
        prompt = PixelPrompt("padding", 3, S, len(which))
        with torch.no_grad():
            for name, t in prompt.named_parameters():
                t.copy_(torch.cat([inits[i].get_parameter(name) for i in which]))
        runs = [VPRun(*data[i], w, _schedule(2 + i, 6, seed=i + 1)) for i in which]
        train_prompts(tiny_vit, prompt, runs, 10.0)
        return prompt

    both = train([0, 1])
    for i in (0, 1):
        alone = train([i])
        for name, t in alone.named_parameters():
            assert torch.allclose(both.get_parameter(name)[i], t[0], atol=1e-4)
        assert not torch.allclose(alone.pad_up[0], inits[i].pad_up[0])      # it trained


def test_training_lowers_the_loss(tiny_rn):
    S = tiny_rn.image_size
    w = zeroshot_classifier(tiny_rn, NAMES, ["a photo of a {}."], cache_dir=None)
    x, y = _images(tiny_rn, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    prompt = PixelPrompt("padding", 8, S, 1, torch.Generator().manual_seed(0))
    trainer = train_prompts(tiny_rn, prompt, [VPRun(x, y, w, _schedule(15, 6, lr=1.0))], 10.0)
    losses = [h["loss"] for h in trainer.history[0]]
    assert losses[-1] < losses[0]


def test_reproduce_smoke_and_bad_input(tmp_path, tiny_vit, capsys):
    args = toy_overrides(tmp_path, tiny_vit, {"shots": "[1]", "train.epochs": 2, "batch_size": 4,
                                              "full_data_shots": 1000, "reproduce.ablation.prompts":
                                              "[{shape: random_patch, size: 30}]", "reproduce.ablation.seeds": "[1]",
                                              "reproduce.datasets": "null", "reproduce.shots": "null",
                                              "reproduce.ablation.datasets": "null", "reproduce.ablation.shots": "null"})
    vp.main(["reproduce", *args])
    recs = load_records(paper="vp")
    got = {(r["method"], r["variant"], r["shots"]) for r in recs}
    assert got == {("vp", "padding30", 1), ("vp", "padding30", 1000), ("linear_probe", "", 1000),
                   ("vp", "random_patch30", 1)}
    assert all(0 <= r["metrics"]["top1"] <= 100 for r in recs)
    assert {r["metrics"]["prompt_px"] for r in recs if r["method"] == "vp"} == {scaled_size(30, tiny_vit.image_size)}
    full = [r for r in recs if r["shots"] == 1000 and r["method"] == "vp"][0]
    assert full["shots_used"]["min"] == 6                      # every toy training image (6 per class)
    for bad, words in ((["--set", "prompt.shape=circle"], "prompt shape"),
                       (["--set", "prompt.size=200"], "padding size"),
                       (["--set", "template=a photo"], "template must contain"),
                       (["--set", "reproduce.ablation.datasets=[emb_mnist]"], "not in datasets")):
        with pytest.raises(SystemExit) as err:
            vp.main(["train", *args, *bad])
        assert err.value.code == 2
        assert words in capsys.readouterr().err
