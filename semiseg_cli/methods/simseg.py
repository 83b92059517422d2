"""SimSeg (Yi et al., CVPR 2023; specs/simseg.md §1): text-supervised training of an image-text model with
locality-driven alignment (LoDA, the model's pooling: models/simseg.py), on image-caption pairs only.

Per step, over the global batch B of pairs (image_i, caption_i):
    f_i = L2(pool(W_I ViT(image_i)))      g_j = L2(pool(W_T BERT(caption_j)))    (text max over every position,
                                                                                 padding included: training)
    s_ij = f_i . g_j / clamp(tau, 1e-3, 0.5)
    L = 1/2 [ CE_i(s_i., i) + CE_j(s_.j, j) ]                                    (symmetric InfoNCE)
the all-gather carrying gradients (every process's embeddings are negatives), through the exact gradient cache
(`simseg_loss.cached_backward`): SimSeg's global batch 4096 in sub-batches of 1024 (`captions.chunk`, over all
processes: each re-forwards chunk / world pairs at a time), with the
gradients of one backward through the whole batch. tau is a learnable parameter with its true gradient.

The step backpropagates itself (`OWN_BACKWARD`: the trainer then only steps the optimizer). Under torchrun tau
is used outside the DDP wrapper's forward (in the loss), so DDP leaves it out (`DDP_IGNORE`) and its gradient is
averaged here, as DDP averages the others.
"""
from __future__ import annotations

from semiseg_cli.errors import UserError
from semiseg_cli.methods.simseg_loss import cached_backward

LOADERS = ("captions",)
OWN_BACKWARD = True
DDP_IGNORE = ("temperature",)


def train_step(model, batch: dict, ctx) -> tuple:
    bare = getattr(model, "module", model)  # the DDP wrapper's model
    tau, env = bare.temperature, ctx.env
    chunk = ctx.cfg["captions"]["chunk"]
    if chunk and chunk % env.world:
        raise UserError(f"captions.chunk = {chunk} does not divide over {env.world} processes; use a multiple of {env.world}")
    loss, logs = cached_backward(model, batch["c"], batch["c_ids"], batch["c_mask"], tau,
                                 chunk // env.world if chunk else batch["c"].shape[0], env, ctx.scale or (lambda t: t),
                                 getattr(model, "no_sync", None))
    if env.world > 1 and tau.grad is not None:
        import torch.distributed as dist

        dist.all_reduce(tau.grad)
        tau.grad /= env.world
    return loss, {"loss_nce": loss, **logs, "tau": tau.detach().clamp(1e-3, 0.5)}


