import json

import pytest
import torch
import torch.nn.functional as F

from common.clip import zeroshot_classifier
from papers.coop.method import PromptLearner, coop_logits, init_phrase, variant_name

NAMES = ["red square", "green_circle", "blue triangle"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_init_from_a_photo_of_a_is_exactly_zero_shot(tiny_clip):
    pl = PromptLearner(tiny_clip, NAMES, ctx_init="a photo of a")
    assert pl.n_ctx == 4
    with torch.no_grad():
        ours = pl.class_embeddings()
    zs = zeroshot_classifier(tiny_clip, [n.replace("_", " ") for n in NAMES], ["a photo of a {}."], cache_dir=None)
    assert torch.allclose(ours, zs, atol=1e-5)
    feats = torch.randn(5, tiny_clip.embed_dim)
    assert torch.allclose(coop_logits(feats, ours, 100.0), coop_logits(feats, zs, 100.0), atol=1e-3)


def test_init_phrase_counts_words_as_the_official_code(tiny_clip):
    """Official CoOp/CoCoOp: n_ctx = len(ctx_init.split(" ")) and the context = the first n_ctx token embeddings.
    "itap of a" is 3 words but 4 BPE pieces (it|ap|of|a): 3 learned vectors, "a" stays frozen before the name,
    and the initial prompt is still exactly the tokenised "itap of a {class}." (zero-shot logits)."""
    tok = tiny_clip.tokenizer
    ids = tok(["itap of a"])[0]
    assert int(ids.argmax()) - 1 == 4                                  # 4 BPE pieces between SOS and EOT
    assert init_phrase("itap_of  a") == ("itap of a", 3)
    pl = PromptLearner(tiny_clip, NAMES, ctx_init="itap of a")
    assert pl.n_ctx == 3 and pl.n_fixed == 1 and pl.ctx.shape[0] == 3
    embed = pl.encoder.token_embedding
    with torch.no_grad():
        assert torch.equal(pl.ctx, embed(ids[None])[0, 1:4])           # it, ap, of
        assert torch.equal(pl.token_suffix[:, 0], embed(ids[None])[0, 4].expand(3, -1))   # "a", frozen
        ours = pl.class_embeddings()
    zs = zeroshot_classifier(tiny_clip, [n.replace("_", " ") for n in NAMES], ["itap of a {}."], cache_dir=None)
    assert torch.allclose(ours, zs, atol=1e-5)
    assert variant_name({"ctx_init": "itap of a"}) == f"m{pl.n_ctx}_end_init"   # the record names the learner's M
    m4 = PromptLearner(tiny_clip, NAMES, ctx_init="a photo of a").n_ctx
    assert variant_name({"ctx_init": "a photo of a"}) == f"m{m4}_end_ctxv1" == "m4_end_ctxv1"
    with pytest.raises(ValueError, match="no words"):
        PromptLearner(tiny_clip, NAMES, ctx_init=" _ ")


@pytest.mark.parametrize("position", ["middle", "front"])
def test_frozen_phrase_pieces_stay_with_the_context(tiny_rn, position):
    """With "itap of a" (learned it|ap|of, frozen a) the class name goes where the position puts it and the
    frozen piece follows the context, e.g. middle = [SOS] it [dog] ap of a . [EOS]."""
    pl = PromptLearner(tiny_rn, ["dog"], ctx_init="itap of a", class_token_position=position)
    it, ap, of, a = tiny_rn.tokenizer(["itap of a"])[0, 1:5].tolist()
    sos, dog, dot, eot = tiny_rn.tokenizer(["dog."])[0, :4].tolist()
    order = {"middle": [sos, it, dog, ap, of, a, dot, eot], "front": [sos, dog, it, ap, of, a, dot, eot]}[position]
    expected = torch.zeros_like(pl.token_ids)
    expected[0, :8] = torch.tensor(order)
    with torch.no_grad():
        prompts = pl.construct_prompts(pl.ctx)
        assert torch.equal(prompts[0, :8], pl.encoder.token_embedding(expected)[0, :8])
        ref = F.normalize(pl.encoder(pl.encoder.token_embedding(expected), expected), dim=-1)
        assert torch.allclose(pl.class_embeddings(), ref, atol=1e-5)


def test_random_init_is_not_zero_shot_and_csc_equal_rows_is_unified(tiny_rn):
    torch.manual_seed(0)
    uni = PromptLearner(tiny_rn, NAMES, n_ctx=4)
    csc = PromptLearner(tiny_rn, NAMES, n_ctx=4, csc=True)
    assert csc.ctx.shape == (3, 4, uni.encoder.width)
    with torch.no_grad():
        csc.ctx.copy_(uni.ctx.unsqueeze(0).expand(3, -1, -1))
        assert torch.allclose(csc.class_embeddings(), uni.class_embeddings(), atol=1e-6)
        zs = zeroshot_classifier(tiny_rn, [n.replace("_", " ") for n in NAMES], ["a photo of a {}."], cache_dir=None)
        assert not torch.allclose(uni.class_embeddings(), zs, atol=1e-2)


@pytest.mark.parametrize("position", ["middle", "front"])
def test_class_token_positions_place_the_name(tiny_rn, position):
    """With the context set to the embeddings of 'a photo of a' split around the name, the prompt equals
    the tokenised sentence with the name at that position."""
    pl = PromptLearner(tiny_rn, ["dog"], n_ctx=4, class_token_position=position)
    words = "a photo of a".split()
    enc = pl.encoder
    with torch.no_grad():
        pl.ctx.copy_(enc.embed(tiny_rn.tokenizer(["a photo of a"]))[0, 1:5])
        sentence = {"middle": "a photo dog of a.", "front": "dog a photo of a."}[position]
        ids = tiny_rn.tokenizer([sentence])
        ref = F.normalize(tiny_rn.model.encode_text(ids), dim=-1)
        assert torch.allclose(pl.class_embeddings(), ref, atol=1e-5)
    assert words


def test_gradients_reach_only_the_context(tiny_rn):
    pl = PromptLearner(tiny_rn, NAMES, n_ctx=4)
    feats = torch.randn(6, tiny_rn.embed_dim)
    loss = F.cross_entropy(coop_logits(feats, pl.class_embeddings(), 100.0), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0
    assert [n for n, p in pl.named_parameters() if p.requires_grad] == ["ctx"]
    assert all(p.grad is None for p in tiny_rn.model.parameters())


def test_bad_options(tiny_rn):
    with pytest.raises(ValueError, match="class_token_position"):
        PromptLearner(tiny_rn, NAMES, class_token_position="start")
    with pytest.raises(ValueError, match="n_ctx"):
        PromptLearner(tiny_rn, NAMES, n_ctx=0)


# ------------------------------------------------------------------------------------------ added tests
import papers.coop.__main__ as coop_main  # noqa: E402
from common.clip import save_clip_checkpoint  # noqa: E402
from common.config import load_config  # noqa: E402
from common.data import Dataset, Datum, build_dataset, fewshot_split  # noqa: E402
from common.engine import load_records  # noqa: E402
from common.engine.protocols import Task  # noqa: E402
from papers.coop.method import (encode_prompts, epochs_for, evaluate, train_coop, train_views,  # noqa: E402
                                variant_name)
from tests.papers.helpers import toy_overrides  # noqa: E402


def test_encode_prompts_drops_only_tokens_after_eot(tiny_clip):
    """Cutting the sequence after the last EOT is exact under the causal mask, chunked or not."""
    pl = PromptLearner(tiny_clip, NAMES + ["a very long class name with many words"], n_ctx=5)
    with torch.no_grad():
        prompts = pl.construct_prompts(pl.ctx)
        full = pl.encoder(prompts, pl.token_ids)
        assert int(pl.token_ids.argmax(-1).max()) + 1 < pl.token_ids.shape[1]  # something is cut
        assert torch.allclose(encode_prompts(pl.encoder, prompts, pl.token_ids), full, atol=1e-5)
        assert torch.allclose(encode_prompts(pl.encoder, prompts, pl.token_ids, chunk=3), full, atol=1e-5)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_batched_prompts_equal_per_image_prompts(tiny_rn, position):
    pl = PromptLearner(tiny_rn, NAMES, n_ctx=4, class_token_position=position)
    ctx = torch.randn(3, 4, pl.encoder.width)
    batched = pl.construct_prompts_batched(ctx)
    assert batched.shape == (3, 3, pl.token_ids.shape[1], pl.encoder.width)
    for b in range(3):
        assert torch.equal(batched[b], pl.construct_prompts(ctx[b]))


def test_with_classnames_moves_unified_context_and_picks_csc_rows(tiny_rn):
    torch.manual_seed(1)
    uni = PromptLearner(tiny_rn, NAMES, n_ctx=4)
    other = uni.with_classnames(["dog", "cat"])
    assert torch.equal(other.ctx, uni.ctx) and other.classnames == ["dog", "cat"]
    ref = PromptLearner(tiny_rn, ["dog", "cat"], n_ctx=4)
    with torch.no_grad():
        ref.ctx.copy_(uni.ctx)
        assert torch.allclose(other.class_embeddings(), ref.class_embeddings(), atol=1e-6)
    csc = PromptLearner(tiny_rn, NAMES, n_ctx=4, csc=True)
    sub = csc.with_classnames(["blue triangle", "red square"])
    assert torch.equal(sub.ctx, csc.ctx[[2, 0]])
    with torch.no_grad():
        assert torch.allclose(sub.class_embeddings(), csc.class_embeddings()[[2, 0]], atol=1e-6)
    with pytest.raises(ValueError, match="class-specific"):
        csc.with_classnames(["dog"])
    state = torch.get_rng_state()
    uni.with_classnames(["x", "y"])
    assert torch.equal(state, torch.get_rng_state())  # moving a prompt does not consume the caller's RNG


def test_variant_names_and_config_variants():
    assert variant_name({}) == "m16_end"
    assert variant_name({"csc": True, "class_token_position": "middle"}) == "m16_middle_csc"
    assert variant_name({"ctx_init": "a photo of a", "n_ctx": 16}) == "m4_end_ctxv1"
    for profile in ("embedded", "real"):
        cfg = load_config(coop_main.CONFIG, profile)
        for key in cfg["variants"]:
            assert variant_name(coop_main.with_variant(cfg, key)) == key
        assert coop_main.cocoop_setting(cfg)["ctx_init"] == "a photo of a"
    with pytest.raises(ValueError, match="unknown CoOp variant"):
        coop_main.with_variant(cfg, "m3_end")


def test_official_epoch_schedule(tiny_rn):
    cfg = load_config(coop_main.CONFIG, "real")
    ds = Dataset("caltech101", ["a"], "{}", [], [], [])
    assert [epochs_for(cfg, Task(cfg, tiny_rn, ds, k, 1, None)) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert epochs_for(cfg, Task(cfg, tiny_rn, Dataset("imagenet[base]", ["a"], "{}", [], [], []), 16, 1, None)) == 50
    assert cfg["train"]["lr"] == 0.002 and cfg["batch_size"] == 32 and cfg["n_ctx"] == 16


def test_min_steps_extends_short_schedules(tiny_rn):
    cfg = {**load_config(coop_main.CONFIG, "real"), "batch_size": 128, "epochs_by_shots": {"1": 30, "16": 6}, "min_steps": 100}
    ds = Dataset("caltech101", ["a"], "{}", [], [], [])
    at = lambda k, n: epochs_for(cfg, Task(cfg, tiny_rn, ds, k, 1, None), n_train=n)  # noqa: E731
    assert at(16, 160) == 100        # 10 classes x 16 shots: one full batch per epoch -> 100 epochs of 1 step
    assert at(16, 816) == 17         # 51 x 16: 6 full batches (the partial one dropped) -> ceil(100 / 6)
    assert at(16, 5000) == 6         # the schedule already gives more than 100 steps
    assert at(1, 10) == 100          # smaller than one batch: one step per epoch
    assert epochs_for(cfg, Task(cfg, tiny_rn, ds, 16, 1, None)) == 6   # without the set size: the schedule
    assert epochs_for({**cfg, "epochs": 2}, Task(cfg, tiny_rn, ds, 16, 1, None), n_train=160) == 2  # fixed: as set
    with pytest.raises(ValueError, match="min_steps"):
        epochs_for({**cfg, "min_steps": -1}, Task(cfg, tiny_rn, ds, 16, 1, None), n_train=10)


def _toy_task(tmp_path, bundle, shots=2, seed=1, cfg=None):
    args = toy_overrides(tmp_path, bundle)
    cfg = cfg or load_config(coop_main.CONFIG, "embedded", args[1::2])
    ds = fewshot_split(build_dataset("toy", tmp_path / "data"), shots, seed)
    return Task(cfg, bundle, ds, shots, seed, tmp_path / "ckpt"), cfg


def test_training_loss_is_cross_entropy_of_the_clip_head(tmp_path, tiny_rn):
    """One epoch at an lr of ~0: the logged loss is CE(scale * cos(f, w)) of the zero-shot 'a photo of a' weights
    on the cached (augmented, normalised) training features; only the context moves, CLIP stays frozen."""
    task, cfg = _toy_task(tmp_path, tiny_rn)
    cfg = dict(cfg, ctx_init="a photo of a", epochs=1, train={"warmup_epochs": 0, "lr": 1e-12}, batch_size=64)
    task.cfg = cfg
    frozen = {k: v.clone() for k, v in tiny_rn.model.state_dict().items()}
    learner = train_coop(task, cfg)
    feats, labels = train_views(task, cfg)
    zs = zeroshot_classifier(tiny_rn, task.dataset.classnames, ["a photo of a {}."], cache_dir=None)
    scale = tiny_rn.model.logit_scale.exp().item()
    expected = F.cross_entropy(scale * feats[0] @ zs.t(), labels).item()
    log = _log(tmp_path / "ckpt")
    assert log[0]["loss"] == pytest.approx(expected, abs=1e-4)
    assert all(torch.equal(v, tiny_rn.model.state_dict()[k]) for k, v in frozen.items())
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"]


def _log(folder):
    """The epoch rows of the only run of a training log (the batched trainer logs a list of runs)."""
    (run,) = json.loads((folder / "train_log.json").read_text())
    return run["epochs"]


def test_training_fits_the_few_shot_set_and_resumes_exactly(tmp_path, tiny_rn):
    task, cfg = _toy_task(tmp_path, tiny_rn, shots=4)
    cfg = dict(cfg, epochs=4, batch_size=8, train={"lr": 0.05})
    task.cfg = cfg
    torch.manual_seed(0)
    full = train_coop(task, cfg)
    hist = _log(tmp_path / "ckpt")
    assert len(hist) == 4 and hist[-1]["loss"] < hist[0]["loss"]
    calls = []

    def crash_in_epoch_3(learner, logits, labels, text):  # 16 images / batch 8 = 2 steps per epoch
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return F.cross_entropy(logits, labels)

    task2 = Task(cfg, tiny_rn, task.dataset, 4, 1, tmp_path / "ckpt2")
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_coop(task2, cfg, loss_fn=crash_in_epoch_3)
    torch.manual_seed(0)
    resumed = train_coop(task2, cfg)
    assert torch.allclose(resumed.ctx, full.ctx, atol=1e-6)
    assert not torch.allclose(resumed.ctx, PromptLearner(tiny_rn, task.dataset.classnames).ctx, atol=1e-3)


def test_reproduce_and_eval_smoke(tmp_path, tiny_rn, tiny_vit, capsys):
    vit = tmp_path / "tiny-vit.pt"
    save_clip_checkpoint(tiny_vit.model, vit)
    args = toy_overrides(tmp_path, tiny_rn, {
        "epochs": 1, "shots": "[1]", "reproduce.ablation.variants": "[m4_end]", "reproduce.ablation.shots": "[1]",
        "reproduce.cocoop_setting.arch": "tiny-vit", "reproduce.cocoop_setting.pretrained": str(vit)})
    coop_main.main(["reproduce", *args])
    recs = load_records(paper="coop")
    got = sorted({(r["protocol"], r["variant"], r["backbone"]) for r in recs})
    assert got == [("base2novel", "m4_end_ctxv1", "tiny-vit"), ("cross_dataset", "m4_end_ctxv1", "tiny-vit"),
                   ("domain_generalization", "m16_end", "tiny-rn"), ("domain_generalization", "m4_end", "tiny-rn"),
                   ("domain_generalization", "m4_end_ctxv1", "tiny-vit"),
                   ("fewshot", "m16_end", "tiny-rn"), ("fewshot", "m4_end", "tiny-rn")]
    # toy has no second dataset: cross-dataset evaluates the source only
    assert {r["dataset"] for r in recs if r["protocol"] == "domain_generalization"} == {"toy", "toy_shift"}
    # train runs one named variant's few-shot grid
    coop_main.main(["train", *args, "--set", "variant=m16_end_csc"])
    assert {(r["variant"], r["shots"]) for r in load_records(paper="coop", variant="m16_end_csc")} == {("m16_end_csc", 1)}
    # eval re-scores the kept prompts and matches the records
    rows = coop_main.main(["eval", *args])
    stored = {(r["shots"], r["seed"]): r["metrics"]["top1"]
              for r in load_records(paper="coop", protocol="fewshot", variant="m16_end")}
    assert {(r["shots"], r["seed"]): round(r["top1"], 4) for r in rows} == stored


def test_batched_runs_train_exactly_like_separate_runs(tmp_path, tiny_rn):
    """Five runs (shot counts x seeds) in one batched model end where each would end alone: same contexts (up to
    float rounding), same predictions. Their schedules differ (epochs by shots), so runs finish at different steps."""
    from papers.coop.method import train_coop_many
    from common.engine.seed import seed_everything
    grid = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 3)]
    tasks = []
    for k, s in grid:
        task, cfg = _toy_task(tmp_path, tiny_rn, shots=k, seed=s)
        tasks.append(task)
    cfg = dict(cfg, epochs=None, epochs_by_shots={"1": 3, "2": 5, "4": 4}, batch_size=4, min_steps=0,
               train={"lr": 0.05, "warmup_epochs": 1})
    for t in tasks:
        t.cfg, t.out_dir = cfg, None
    together = train_coop_many(tasks, cfg)
    steps = [h[-1]["step"] for h in (l.train_history for l in together)]
    assert len(set(steps)) > 1                                   # different schedules in one batch
    for task, learner in zip(tasks, together):
        seed_everything(task.seed)
        alone = train_coop(task, cfg)
        assert torch.allclose(alone.ctx, learner.ctx, atol=1e-5), (task.shots, task.seed)
        assert evaluate(alone, task)["top1"] == evaluate(learner, task)["top1"]
