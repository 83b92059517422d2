"""SimSeg's contrastive objective and its exact gradient cache (specs/simseg.md §1.3, §1.4), the pieces the
text-supervised training step is built from.

`nce_loss`: symmetric InfoNCE over the global batch. Each process scores its local image embeddings against
the text embeddings of every process (and the reverse), logits = f . g / clamp(tau, 1e-3, 0.5), targets = the
local samples' global indices; loss = (CE_i2t + CE_t2i) / 2. The all-gather carries gradients
(`torch.distributed.nn.functional.all_gather`: its backward sums the gradients of every process's copy),
SimSeg's `gather_backward: True`; this is open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` with
logit_scale = 1 / clamp(tau).

`cached_backward`: ZeroVL's decoupled gradient accumulation (SimSeg's global batch 4096 in chunks of 1024,
`clip_bsgs`), as an exact gradient cache: (1) embeddings of the whole batch in chunks without gradients,
each chunk's RNG state recorded; (2) the loss of the whole batch on those embeddings (as leaves) and its
backward, giving d loss / d embedding and tau's true gradient; (3) each chunk re-forwarded with gradients
from its recorded RNG state (the same dropout masks), backpropagating embedding . (d loss / d embedding).
The parameter gradients equal those of one backward through the whole batch.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F


def gather(x: torch.Tensor, env) -> torch.Tensor:
    """Every process's x concatenated in rank order, differentiable; x itself on one process."""
    if env is None or env.world == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), 0)


def nce_loss(image: torch.Tensor, text: torch.Tensor, tau: torch.Tensor, env=None) -> tuple[torch.Tensor, dict]:
    """(loss, {"i2t_acc", "t2i_acc"}) of unit embeddings image, text [N, E] (pairs by row) over the global batch."""
    rank = 0 if env is None else env.rank
    all_image, all_text = gather(image, env), gather(text, env)
    scale = 1.0 / tau.clamp(1e-3, 0.5)
    i2t = scale * image.float() @ all_text.float().T
    t2i = scale * text.float() @ all_image.float().T
    target = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    loss = 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target))
    with torch.no_grad():
        logs = {"i2t_acc": (i2t.argmax(1) == target).float().mean(), "t2i_acc": (t2i.argmax(1) == target).float().mean()}
    return loss, logs


class _RngState:
    """The CPU (and current CUDA device's) RNG state at creation, restorable for a re-forward."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def cached_backward(model, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor,
                    chunk: int, env=None, scale=lambda t: t, no_sync=None) -> tuple[torch.Tensor, dict]:
    """Backpropagate the whole local batch's `nce_loss` through `model(images, text=(ids, mask))` (image and text
    embeddings [n, E]) in chunks of `chunk` pairs (see the module docstring); returns (the loss, detached; logs).

    tau: the temperature parameter (its gradient comes from step 2 directly). scale: applied to each tensor
    before `.backward()` (a GradScaler's `scale`). no_sync: a context manager factory that suspends DDP's
    gradient all-reduce (the wrapper's `no_sync`), used for every chunk but the last.
    """
    n = images.shape[0]
    spans = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    states, feats = [], []
    with torch.no_grad():
        for a, b in spans:
            states.append(_RngState(images.device))
            feats.append(model(images[a:b], text=(ids[a:b], mask[a:b])))
    after = _RngState(images.device)  # the RNG as the uncached forward would leave it
    f = torch.cat([x[0] for x in feats]).detach().requires_grad_(True)
    g = torch.cat([x[1] for x in feats]).detach().requires_grad_(True)
    loss, logs = nce_loss(f, g, tau, env)
    scale(loss).backward()  # d loss / d f, d g, and tau's gradient
    for k, ((a, b), state) in enumerate(zip(spans, states)):
        state.restore()
        ctx = no_sync() if no_sync is not None and k < len(spans) - 1 else nullcontext()
        with ctx:
            fc, gc = model(images[a:b], text=(ids[a:b], mask[a:b]))
            surrogate = (fc * f.grad[a:b]).sum() + (gc * g.grad[a:b]).sum()
            surrogate.backward()  # f.grad already carries the loss scale
    after.restore()
    return loss.detach(), logs
