"""Contrastive pretraining of the embedded tiny CLIPs on the synthetic world (CPU, minutes).

    python -m common.data.synthetic.pretrain --arch tiny-rn --out data/embedded/checkpoints/tiny-rn.pt
    python -m common.data.synthetic.pretrain --arch tiny-vit --out data/embedded/checkpoints/tiny-vit.pt \\
        --teacher data/embedded/checkpoints/tiny-rn.pt

A pool of scenes is rendered once (vectorised), then every step draws a batch from it and writes fresh
captions for it, so the same image is seen with different descriptions. Loss: open_clip's `ClipLoss`
(symmetric InfoNCE); the ViT recipe adds feature distillation from the ResNet (cosine between the
student's and the teacher's image embeddings) and starts from the teacher's text tower, because a
small ViT learns shape an order of magnitude slower than a ResNet on a CPU budget. The checkpoint is
written with `save_clip_checkpoint`, i.e. `load_clip(arch, path)` reads it; a JSON log sits beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.clip.loader import load_clip, save_clip_checkpoint
from common.clip.text import PromptTextEncoder, encode_text
from common.data.images import OPENAI_MEAN, OPENAI_STD

from .captions import CaptionStyle, captions
from .render import render
from .world import Distribution, SceneInfo, sample_scenes

# Defaults per architecture (params.yaml `pretrain:` passes the same keys explicitly).
DEFAULTS = {
    "tiny-rn": dict(steps=1200, batch=256, lr=1e-3, wd=0.1, warmup=50, pool=50000, seed=0, distill=0.0, curriculum=0.3,
                    logit_scale=100.0, contrastive=1.0, bank_distill=0.0, freeze_text=0, student_stream=0),
    "tiny-vit": dict(steps=800, batch=128, lr=1e-3, wd=0.1, warmup=50, pool=50000, seed=1, distill=1.0, curriculum=0.5,
                     logit_scale=100.0, contrastive=1.0, bank_distill=0.0, freeze_text=0, student_stream=0),
}
RENDER_CHUNK = 512

# The pretraining stream: mostly single objects on plain backgrounds, little pixel noise or blur, and captions
# that always name the object. Measured on 2 cores: with the downstream sets' noisier, busier photo world and
# captions that sometimes say only "a shape", object identity stayed near chance after 700 steps (colour 80%);
# a tiny-rn trained *supervised* on clean single objects reaches 91% in 300 steps, contrastively about half
# as fast. The downstream sets keep their noise, blur, clutter and styles: that gap is the room for transfer.
PRETRAIN_DIST = Distribution(
    solid_share=0.7, styles={"photo": 0.55, "cartoon": 0.35, "sketch": 0.05, "cluttered": 0.05},
    groups=(0.9, 0.08, 0.02), counts=(0.55, 0.15, 0.15, 0.15), sizes=(0.1, 0.45, 0.45),
    backgrounds={"scene": 0.25, "plain": 0.45, "gradient": 0.1, "pattern": 0.15, "noise": 0.05},
    noise=(0.0, 0.02), blur=0.1, rot_deg=10.0)
# Groups of 2-4 objects are 45% of the stream (they were 20%): emb_counting zero-shot 33.8 -> 38.7% (GPU sweep).
# Patterned backgrounds are named half the time (sometimes as "a striped texture"): with 5% of them, named a
# third of the time, the texture set stayed at chance.
PRETRAIN_CAPTIONS = CaptionStyle(p_vague_kind=0.0, p_wrong_kind=0.02, p_background=0.5)
# Curriculum: the first `curriculum` share of the steps draws from a cleaner stream (one object on a plain
# background) whose captions name little but the object, so object identity is what tells them apart.
# Measured (tiny-rn, 1000 steps): warm-up captions that also named colour (50%), pattern and style gave 19%
# object zero-shot at the end; object-only captions (colour 25%) gave 53%, with the same colour accuracy.
WARMUP_DIST = PRETRAIN_DIST.with_(groups=(1.0,), counts=(1.0,), sizes=(0.0, 0.5, 0.5), styles={"photo": 0.6, "cartoon": 0.4},
                                  backgrounds={"plain": 0.8, "gradient": 0.2}, noise=(0.0, 0.0), blur=0.0, rot_deg=0.0)
# The ViT student's main stream: the world's everyday photos (world.Distribution's defaults: scenes, clutter,
# cartoons, groups) rather than the ResNet's clean stream. The student learns to see what its teacher sees
# on busy images too; a small ViT trained on the clean stream alone reached 18% zero-shot on emb_objects
# (its teacher 50%). No downstream image is ever drawn: these are fresh renders of the world's generator.
STUDENT_DIST = Distribution()
WARMUP_CAPTIONS = CaptionStyle(p_colour=0.25, p_pattern=0.0, p_size=0.0, p_position=0.0, p_scene=0.0, p_background=0.0,
                               p_style=0.0, p_synonym=0.0, p_vague_kind=0.0, p_wrong_kind=0.0, p_wrong_colour=0.0,
                               p_tags=0.0, p_filler=0.0)


def render_pool(n: int, seed: int, dist: Distribution = PRETRAIN_DIST, size: int = 64, progress: bool = True):
    """n scenes as uint8 (n, size, size, 3) and their SceneInfos; chunk c uses the rng seeded (seed, c)."""
    images = np.empty((n, size, size, 3), np.uint8)
    infos: list[SceneInfo] = []
    chunks = range(0, n, RENDER_CHUNK)
    for c, start in enumerate(tqdm(chunks, desc="render pool", disable=not progress, unit="chunk")):
        rng = np.random.default_rng([seed, c])
        m = min(RENDER_CHUNK, n - start)
        spec, inf = sample_scenes(rng, m, dist, size)
        images[start:start + m] = render(spec, rng, size)
        infos.extend(inf)
    return images, infos


def to_model_input(images: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, S, S) as the CLIP eval transform makes it."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def bf16_supported() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere it is emulated."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover
        return False
    if "AVX512" not in cap:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:  # pragma: no cover
        return False


def param_groups(model: torch.nn.Module, wd: float):
    """open_clip's split: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * t))


@torch.no_grad()
def quick_zero_shot(model, tokenizer, image_size: int, seed: int = 12345, n: int = 512,
                    dist: Distribution = PRETRAIN_DIST) -> dict[str, float]:
    """Progress check on fresh photo-style single objects of the distribution's kinds: object-name and
    colour zero-shot accuracy."""
    from .vocab import COLOURS, KINDS
    from .world import ALL_KINDS
    rng = np.random.default_rng(seed)
    pool = sorted(k for k in dist.kinds if k in ALL_KINDS)
    kinds = rng.choice(pool, n)
    basic = [i for i, c in enumerate(COLOURS) if c.basic == c.name]
    colours = rng.choice(basic, n)
    spec, _ = sample_scenes(rng, n, dist, 64, fixed={"kind": kinds, "style": np.zeros(n, int), "colour": colours,
                                                     "count": np.ones(n, int)})
    imgs = render(spec, rng, 64)
    model.eval()
    device = next(model.parameters()).device
    feats = F.normalize(model.encode_image(to_model_input(imgs, image_size).to(device)).float(), dim=-1)
    out = {}
    for name, labels, classes, tmpl in (("object", np.searchsorted(pool, kinds), [KINDS[k].name for k in pool], "a photo of a {}."),
                                        ("colour", np.searchsorted(basic, colours), [COLOURS[i].name for i in basic], "a photo of a {} object.")):
        t = F.normalize(model.encode_text(tokenizer([tmpl.format(c) for c in classes]).to(device)).float(), dim=-1)
        out[name] = float(((feats @ t.T).argmax(1).cpu().numpy() == labels).mean())
    model.train()
    return out


class SharedCaptionClipLoss(open_clip.ClipLoss):
    """open_clip's `ClipLoss`, except that pairs whose captions are the same token sequence are all positives
    (UniCL's target, Yang et al. 2022). A small world repeats captions within a batch ("a star."): plain
    InfoNCE would push an image away from its own caption's duplicates, which stalls learning of the object.
    With unique captions the target is the identity and the value is exactly `ClipLoss`'s."""

    def forward(self, image_features, text_features, logit_scale, tokens=None, output_dict=False):
        if tokens is None:
            return super().forward(image_features, text_features, logit_scale, output_dict=output_dict)
        logits = logit_scale * image_features @ text_features.T
        same = (tokens[:, None, :] == tokens[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)  # symmetric relation: one target serves both directions
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        return {"contrastive_loss": loss} if output_dict else loss


@torch.no_grad()
def teacher_targets(teacher, images: np.ndarray, device, progress: bool = True, chunk: int = 512) -> torch.Tensor:
    """The teacher's normalised image embeddings of a rendered pool (uint8 (N, 64, 64, 3)), on the CPU."""
    out = []
    for i in tqdm(range(0, len(images), chunk), desc="teacher targets", disable=not progress, unit="chunk"):
        x = to_model_input(images[i:i + chunk], 64).to(device).contiguous(memory_format=torch.channels_last)
        out.append(F.normalize(teacher.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def concept_bank(teacher, tokenizer, device) -> torch.Tensor:
    """The teacher's normalised text embeddings of the world's concepts as zero-shot prompts name them (object
    kinds, colours, fill patterns, scenes): the classes a student's zero-shot view of an image is compared on."""
    from .vocab import COLOURS, KINDS, PATTERNS, SCENES
    texts = ([f"a photo of a {k.name}." for k in KINDS] + [f"a photo of a {c.name} object." for c in COLOURS]
             + [f"a {p.name} texture." for p in PATTERNS] + [f"a photo of a {s.name}." for s in SCENES])
    return F.normalize(teacher.encode_text(tokenizer(texts).to(device)).float(), dim=-1)


def train_step(model, opt, loss_fn, x: torch.Tensor, tok: torch.Tensor | None, bf16: bool = False,
               target: torch.Tensor | None = None, distill: float = 0.0, text_encoder=None,
               contrastive: float = 1.0, bank: torch.Tensor | None = None, bank_distill: float = 0.0) -> float:
    """One optimiser step of contrastive x the contrastive loss + distill x the cosine distance to the
    teacher's (normalised) image embedding `target`. Returns the loss. `text_encoder` (a PromptTextEncoder
    sharing the model's text tower) encodes the captions up to the batch's last EOT: the same function as
    `model.encode_text`, cheaper."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        fi = F.normalize(model.encode_image(x).float(), dim=-1)
        loss = torch.zeros((), device=x.device)
        if contrastive:
            text = encode_text(text_encoder, tok) if text_encoder is not None else model.encode_text(tok)
            ft = F.normalize(text.float(), dim=-1)
            loss = loss + contrastive * loss_fn(fi, ft, model.logit_scale.exp(), tokens=tok)
        if target is not None and distill > 0:
            loss = loss + distill * (1 - (fi * target).sum(-1)).mean()
        if bank is not None and bank_distill > 0:  # match the teacher's zero-shot distribution over the concepts
            scale = model.logit_scale.exp().detach()
            p_teacher = F.softmax(scale * target @ bank.T, dim=-1)
            loss = loss + bank_distill * F.kl_div(F.log_softmax(scale * fi @ bank.T, dim=-1), p_teacher,
                                                  reduction="batchmean")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    if model.logit_scale.requires_grad:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def pretrain(arch: str, out: str | Path, steps: int, batch: int, lr: float, wd: float, warmup: int, pool: int, seed: int,
             distill: float = 0.0, teacher: str | None = None, curriculum: float = 0.0, logit_scale: float = 0.0,
             contrastive: float = 1.0, bank_distill: float = 0.0, freeze_text: bool = False,
             student_stream: bool = False, dist: Distribution = PRETRAIN_DIST,
             cstyle: CaptionStyle = PRETRAIN_CAPTIONS, threads: int = 2, amp: str = "auto", eval_every: int = 0,
             eval_n: int = 512, progress: bool = True, device: str = "cpu") -> dict:
    """Train `arch` from scratch and save it to `out`. Returns the training log (also written to out.json).
    The pipeline trains on the CPU (seeded, deterministic); `device="cuda"` is for quick recipe sweeps.
    `logit_scale` > 0 fixes the temperature at that value (OpenAI's released CLIPs all end at the clamp, 100);
    0 learns it from 1/0.07 as CLIP does. `contrastive` weighs the contrastive loss; 0 with a teacher is pure
    feature distillation: the student's text tower is the teacher's, frozen, and only the image tower learns
    to map images to the teacher's image embeddings (computed once per rendered pool). `bank_distill` adds the
    KL divergence between the teacher's and the student's zero-shot distributions over the world's concepts."""
    t_start = time.time()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if threads:
        torch.set_num_threads(threads)
    bundle = load_clip(arch, "random")
    model, tokenizer, image_size = bundle.model, bundle.tokenizer, bundle.image_size
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA GPU; the default is --device cpu")
    use_bf16 = (device.type == "cuda" or bf16_supported()) if amp == "auto" else amp == "bf16"

    teacher_model = None
    teacher = None if teacher in (None, "", "none") else teacher
    if distill > 0 or teacher:
        if not teacher:
            raise ValueError(f"{arch}: distill={distill} needs --teacher (a tiny-rn checkpoint)")
        tb = load_clip("tiny-rn", teacher)
        teacher_model = tb.model.eval().to(device)
        # start from the teacher's text tower when the shapes agree (same text config)
        t_sd = {k: v for k, v in teacher_model.state_dict().items() if not k.startswith("visual.")}
        own = model.state_dict()
        same = {k: v for k, v in t_sd.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(same, strict=False)
        if tb.image_size != 64:
            raise ValueError("the teacher must read 64 px images")

    for p in model.parameters():
        p.requires_grad_(True)
    if contrastive < 0 or (contrastive == 0 and teacher_model is None):
        raise ValueError(f"contrastive must be > 0, or 0 with a teacher to distil from; got {contrastive}")
    if freeze_text and teacher_model is None:
        raise ValueError("freeze_text keeps a teacher's text tower: give --teacher")
    if contrastive == 0 or freeze_text:  # the teacher's text tower as it is: the teacher's embedding space
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("visual."))
    if logit_scale < 0:
        raise ValueError(f"logit_scale must be > 0 (fixed) or 0 (learned), got {logit_scale}")
    if logit_scale:
        # A learned temperature settles near 15-19 on this world (its captions repeat, so batches hold many
        # near-duplicate negatives); OpenAI's CLIPs end at 100. Methods' official learning rates see logits
        # scale x cos, so the tiny towers are trained at OpenAI's temperature (REGIME note in data/README.md).
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
        model.logit_scale.requires_grad_(False)
    model = model.to(device)
    if not bundle.is_vit:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = SharedCaptionClipLoss()
    text_encoder = PromptTextEncoder(model)

    t0 = time.time()
    if not 0.0 <= curriculum < 1.0:
        raise ValueError(f"curriculum must be a share of the steps in [0, 1), got {curriculum}")
    warm_steps = int(round(curriculum * steps))
    # (caption style, images, infos) per curriculum stage; the warm-up pool is half size, its own seed
    main_stream = (cstyle, *render_pool(pool, seed, STUDENT_DIST if student_stream else dist, 64, progress))
    warm_stream = (WARMUP_CAPTIONS, *render_pool(pool // 2, seed + 7919, WARMUP_DIST, 64, progress)) if warm_steps else None
    targets, bank = {}, None
    if bank_distill > 0:
        if teacher_model is None:
            raise ValueError("bank_distill needs a teacher")
        bank = concept_bank(teacher_model, tokenizer, device)
    if teacher_model is not None and (distill > 0 or bank_distill > 0):  # the teacher's embeddings, once per image
        for name, stream in (("main", main_stream), ("warm", warm_stream)):
            if stream is not None:
                targets[name] = teacher_targets(teacher_model, stream[1], device, progress)
    t_render = time.time() - t0
    rng = np.random.default_rng([seed, 999])
    log = {"arch": arch, "device": device.type, "steps": steps, "batch": batch, "lr": lr, "wd": wd, "warmup": warmup, "pool": pool, "seed": seed,
           "distill": distill, "contrastive": contrastive, "bank_distill": bank_distill, "freeze_text": bool(freeze_text),
           "student_stream": bool(student_stream), "logit_scale": logit_scale or "learned", "teacher": str(teacher) if teacher else None, "bf16": use_bf16, "render_s": round(t_render, 1),
           "curriculum": curriculum, "distribution": asdict(STUDENT_DIST if student_stream else dist), "caption_style": asdict(cstyle),
           "warmup_distribution": asdict(WARMUP_DIST) if warm_steps else None,
           "warmup_caption_style": asdict(WARMUP_CAPTIONS) if warm_steps else None, "loss": [], "evals": []}
    bar = tqdm(range(steps), desc=f"pretrain {arch}", disable=not progress)
    t_train = time.time()
    for step in bar:
        if step == 0 or step == warm_steps:  # a new stage of the curriculum: reshuffle its pool
            step_cstyle, images, infos = warm_stream if step < warm_steps else main_stream
            stage_targets = targets.get("warm" if step < warm_steps else "main")
            order, cursor = rng.permutation(len(images)), 0
        if cursor + batch > len(images):
            order, cursor = rng.permutation(len(images)), 0
        idx = np.sort(order[cursor:cursor + batch])
        cursor += batch
        tok = None
        if contrastive:
            tok = tokenizer(captions([infos[i] for i in idx], seed * 1_000_003 + step, step_cstyle)).to(device)
        x = to_model_input(images[idx], image_size).to(device)
        if not bundle.is_vit:
            x = x.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, warmup, lr)
        target = stage_targets[torch.as_tensor(idx)].to(device) if stage_targets is not None else None
        loss = train_step(model, opt, loss_fn, x, tok, use_bf16, target, distill, text_encoder, contrastive, bank,
                          bank_distill)
        log["loss"].append(round(float(loss), 4))
        bar.set_postfix(loss=f"{loss:.3f}", scale=f"{float(model.logit_scale.exp()):.1f}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            ev = quick_zero_shot(model, tokenizer, image_size, n=eval_n, dist=dist)
            log["evals"].append({"step": step + 1, "min": round((time.time() - t_train) / 60, 2), **ev})
            tqdm.write(f"step {step + 1}: {ev}")
    train_s = time.time() - t_train
    model.eval()
    ev = quick_zero_shot(model, tokenizer, image_size, n=eval_n, dist=dist)
    log["evals"].append({"step": steps, "min": round(train_s / 60, 2), **ev})
    log.update(train_s=round(train_s, 1), total_s=round(time.time() - t_start, 1), s_per_step=round(train_s / max(steps, 1), 3))
    model = model.to("cpu", memory_format=torch.contiguous_format)
    out = save_clip_checkpoint(model, out)
    Path(str(out) + ".json").write_text(json.dumps(log, indent=1))
    print(f"saved {out}: {ev}, {train_s / 60:.1f} min training, {t_render:.0f} s rendering")
    return log


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, choices=sorted(DEFAULTS), help="embedded architecture")
    ap.add_argument("--out", required=True, help="checkpoint path (a .json log is written beside it)")
    ap.add_argument("--teacher", default=None, help="tiny-rn checkpoint to distil from (tiny-vit recipe); 'none' for none")
    for k, v in DEFAULTS["tiny-rn"].items():
        ap.add_argument(f"--{k}", type=type(v), default=None, help=f"default per arch: " +
                        ", ".join(f"{a}={d[k]}" for a, d in DEFAULTS.items()))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the default machine has 2 cores)")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"], help="bf16 autocast (auto: if the CPU has bf16)")
    ap.add_argument("--device", default="cpu", help="cpu (the pipeline) or cuda (recipe sweeps on a GPU)")
    ap.add_argument("--eval-every", type=int, default=0, help="print a quick zero-shot check every N steps")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    cfg = dict(DEFAULTS[a.arch])
    cfg.update({k: getattr(a, k) for k in cfg if getattr(a, k) is not None})
    pretrain(a.arch, a.out, teacher=a.teacher, threads=a.threads, amp=a.amp, eval_every=a.eval_every,
             progress=not a.no_progress, device=a.device, **cfg)


if __name__ == "__main__":
    main()
