"""Visual Prompting (Bahng et al., 2022): one learnable, input-agnostic pixel perturbation per task, added to the
normalised image; the frozen CLIP classifies the prompted image against its zero-shot text classifier.

Prompt shapes (official `models/prompters.py`), image side S, prompt size p:
- ``padding``: a frame of width p: top/bottom blocks (3, p, S), left/right blocks (3, S-2p, p); inside it zero.
  2*3*p*S + 2*3*(S-2p)*p parameters (69,840 for S=224, p=30).
- ``fixed_patch``: one (3, p, p) patch at the top-left corner.
- ``random_patch``: one (3, p, p) patch at a location drawn uniformly from [0, S-p) x [0, S-p) at every forward
  pass (the official `np.random.choice(isize - psize)`), at evaluation too.
Every tensor starts from N(0, 1) (official `torch.randn`). The prompt is *added* everywhere (no clamping).

R independent runs (seeds, shot counts, learning rates) train together: every prompt tensor has a leading run axis
and `common.engine.batched` updates each run's slice with its own optimiser state and schedule. A step encodes the
concatenated real images of the active runs, each with its own run's prompt, through the frozen image tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.clip import ClipBundle, zeroshot_classifier
from common.clip.visual import encode_image_hooked
from common.data import Dataset
from common.engine.batched import BatchedTrainer, RunSchedule

SHAPES = ("padding", "fixed_patch", "random_patch")
PAPER_IMAGE_SIZE = 224
OFFICIAL_TEMPLATE = "This is a photo of a {}"


def scaled_size(paper_size: int, image_size: int, paper_image: int = PAPER_IMAGE_SIZE) -> int:
    """The paper's prompt size at another input side: the same fraction of the image, rounded (at least 1 pixel);
    30 px at 224 -> 9 px at 64 (tiny-rn), 6 px at 48 (tiny-vit)."""
    return max(1, int(round(paper_size * image_size / paper_image)))


def check_prompt(shape: str, size: int, image_size: int) -> None:
    if shape not in SHAPES:
        raise ValueError(f"prompt shape must be one of {SHAPES}, got {shape!r}")
    if shape == "padding" and not 1 <= size < image_size / 2:
        raise ValueError(f"padding size must be in [1, {(image_size - 1) // 2}] for {image_size}-px images "
                         f"(a frame of width p leaves S-2p > 0 pixels inside), got {size}")
    if shape != "padding" and not 1 <= size < image_size:
        raise ValueError(f"patch size must be in [1, {image_size - 1}] for {image_size}-px images, got {size}")


def n_parameters(shape: str, size: int, image_size: int) -> int:
    """Trainable values of one prompt (the paper's parameter count)."""
    check_prompt(shape, size, image_size)
    if shape == "padding":
        return 2 * 3 * size * image_size + 2 * 3 * (image_size - 2 * size) * size
    return 3 * size * size


def padding_mask(size: int, image_size: int) -> torch.Tensor:
    """(S, S) bool: the pixels a padding prompt of width `size` covers (the border frame)."""
    m = torch.ones(image_size, image_size, dtype=torch.bool)
    m[size:image_size - size, size:image_size - size] = False
    return m


class PixelPrompt(nn.Module):
    """`runs` independent prompts of one shape and size, stacked on a leading axis."""

    def __init__(self, shape: str, size: int, image_size: int, runs: int = 1,
                 generator: torch.Generator | None = None):
        super().__init__()
        check_prompt(shape, size, image_size)
        self.shape, self.size, self.image_size, self.runs = shape, int(size), int(image_size), int(runs)
        p, S, R = self.size, self.image_size, self.runs
        randn = lambda *s: nn.Parameter(torch.randn(*s, generator=generator))
        if shape == "padding":
            self.pad_up, self.pad_down = randn(R, 3, p, S), randn(R, 3, p, S)
            self.pad_left, self.pad_right = randn(R, 3, S - 2 * p, p), randn(R, 3, S - 2 * p, p)
        else:
            self.patch = randn(R, 3, p, p)

    def stacked(self) -> list[nn.Parameter]:
        return [p for p in self.parameters()]

    def image(self, runs: torch.Tensor | None = None, locations: torch.Tensor | None = None) -> torch.Tensor:
        """The (n, 3, S, S) prompt images of runs `runs` (default all); `locations` (n, 2) place a random patch
        (row, column of its top-left pixel)."""
        runs = torch.arange(self.runs) if runs is None else runs
        p, S = self.size, self.image_size
        if self.shape == "padding":
            left, right = self.pad_left[runs], self.pad_right[runs]
            middle = torch.cat([left, left.new_zeros(len(runs), 3, S - 2 * p, S - 2 * p), right], dim=3)
            return torch.cat([self.pad_up[runs], middle, self.pad_down[runs]], dim=2)
        patch = self.patch[runs]
        if self.shape == "fixed_patch":
            return F.pad(patch, (0, S - p, 0, S - p))
        if locations is None:
            raise ValueError("a random patch needs its locations")
        out = []
        for i in range(len(runs)):   # one location per run and step (n = runs, not images)
            r, c = (int(v) for v in locations[i])
            out.append(F.pad(patch[i], (c, S - p - c, r, S - p - r)))
        return torch.stack(out)

    def draw_locations(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Random-patch locations for n runs, uniform over [0, S-p) as the official code; None for other shapes."""
        if self.shape != "random_patch":
            return None
        return torch.randint(0, self.image_size - self.size, (n, 2), generator=generator)

    def prompted(self, images: torch.Tensor, run_of: torch.Tensor, runs: torch.Tensor,
                 locations: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, 3, S, S) + the prompt image of their run: `runs` are the distinct runs in this batch,
        `run_of` (N,) indexes into `runs`."""
        return images + self.image(runs, locations)[run_of]


def vp_classnames(dataset: Dataset, clean: bool = True) -> list[str]:
    """Class names as the official `main_clip.py` formats them: lower-cased, '_' and '-' read as spaces."""
    names = list(dataset.classnames)
    if not clean:
        return names
    return [" ".join(n.lower().replace("_", " ").replace("-", " ").split()) for n in names]


def text_weights(bundle: ClipBundle, dataset: Dataset, template: str | None, clean: bool) -> torch.Tensor:
    """(C, D) normalised zero-shot classifier of one template (null: the dataset's own hand-crafted one)."""
    return zeroshot_classifier(bundle, vp_classnames(dataset, clean), [template or dataset.template]).float()


def vp_logits(bundle: ClipBundle, images: torch.Tensor, weights: torch.Tensor, scale: float,
              prompt: torch.Tensor | None = None) -> torch.Tensor:
    """scale * cos(f(x + prompt), t_c): CLIP's zero-shot logits of the prompted images ((N, C))."""
    feats = encode_image_hooked(bundle.model, images, pixel_prompt=prompt, normalize=True)
    return scale * feats.float() @ weights.t()


@dataclass
class VPRun:
    """One run's inputs: its training pixels (N, 3, S, S), labels (N,), the text classifier (C, D) and schedule."""
    pixels: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    schedule: RunSchedule


def train_prompts(bundle: ClipBundle, prompt: PixelPrompt, runs: Sequence[VPRun], scale: float,
                  out_dir=None, desc: str = "vp", eval_fn=None, eval_every: int = 0,
                  seed: int = 0) -> BatchedTrainer:
    """Cross-entropy training of the stacked prompts (one slice per run) through the frozen CLIP. Each step
    encodes only the real images of the active runs (no padding), and a run's loss is the mean over its batch."""
    if prompt.runs != len(runs):
        raise ValueError(f"the prompt holds {prompt.runs} runs, {len(runs)} run inputs given")
    gen = torch.Generator().manual_seed(seed)
    dev = bundle.device
    bundle.model.eval()   # frozen, deterministic tower (no dropout / batch-norm updates)

    def step(batches):
        live = [i for i, b in enumerate(batches) if b is not None]
        xs, ys, owner, logits = [], [], [], []
        for j, r in enumerate(live):
            idx = batches[r].idx
            xs.append(runs[r].pixels[idx])
            ys.append(runs[r].labels[idx])
            owner.append(torch.full((len(idx),), j, dtype=torch.long))
        x, y, own = torch.cat(xs).to(dev), torch.cat(ys).to(dev), torch.cat(owner).to(dev)
        live_t = torch.tensor(live, device=dev)
        x = prompt.to(dev).prompted(x, own, live_t, prompt.draw_locations(len(live), gen))
        feats = F.normalize(encode_image_hooked(bundle.model, x).float(), dim=-1)
        ce = torch.empty(len(y), device=dev)
        correct = torch.empty(len(y), device=dev)
        for j, r in enumerate(live):          # each run's own classifier (runs may differ in classes)
            sel = own == j
            lg = scale * feats[sel] @ runs[r].weights.to(dev).t()
            ce[sel] = F.cross_entropy(lg, y[sel], reduction="none")
            correct[sel] = (lg.argmax(-1) == y[sel]).float() * 100
        count = torch.zeros(len(live), device=dev).index_add_(0, own, torch.ones_like(ce))
        loss = torch.zeros(len(live), device=dev).index_add(0, own, ce) / count
        acc = torch.zeros(len(live), device=dev).index_add_(0, own, correct) / count
        R = len(runs)
        full_loss = torch.zeros(R, device=dev).index_put((live_t,), loss)
        full_acc = torch.zeros(R, device=dev).index_put((live_t,), acc.detach())
        return full_loss.cpu(), {"acc": full_acc.cpu()}

    trainer = BatchedTrainer(prompt.stacked(), [r.schedule for r in runs], out_dir, desc=desc)
    trainer.fit(step, eval_fn, eval_every)
    return trainer


@torch.no_grad()
def predict(bundle: ClipBundle, prompt: PixelPrompt | None, run: int, pixels: torch.Tensor, weights: torch.Tensor,
            scale: float, batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """(N, C) logits of run `run`'s prompt on `pixels` (prompt None: zero-shot CLIP). A random patch draws one
    location per batch from a generator seeded by `seed` (the official evaluation is stochastic too)."""
    gen = torch.Generator().manual_seed(seed)
    dev = bundle.device
    bundle.model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = pixels[i:i + batch_size].to(dev)
        if prompt is not None:
            runs = torch.tensor([run], device=dev)
            x = prompt.prompted(x, torch.zeros(len(x), dtype=torch.long, device=dev), runs,
                                prompt.draw_locations(1, gen))
        out.append(vp_logits(bundle, x, weights.to(dev), scale).cpu())
    return torch.cat(out)
