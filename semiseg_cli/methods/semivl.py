"""SemiVL (Hoyer et al., "SemiVL: Semi-Supervised Semantic Segmentation with Vision-Language Guidance",
ECCV 2024; specs/semivl_unimatch.md §4): UniMatch's streams on the CLIP ViT + language-guided decoder
(semiseg_cli/models/semivl.py), plus dense CLIP guidance (§4d, the paper's Eq. 4-5):

    L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 + lambda_t (0.25 L_mc,s1 + 0.25 L_mc,s2 + 0.5 L_mc,fp)
    lambda_t = ssl.guidance_weight (0.1) x (1 - t/T)          (the guidance term is not halved)

Guidance labels m come from a frozen copy of the CLIP ViT (MaskCLIP's dense value path, built from the same
converted weights, never trained, not part of the model or its checkpoint): cosine similarity with the
guidance text (class definitions: max over each class's concepts), bilinear upsampling, softmax of
100 x similarity, kept where the confidence >= ssl.guidance_conf (0.9) and not padding. They are CutMixed with
the same boxes as the self-training targets. L_mc = summed CE / all pixels (the original's "mean_all").

Cityscapes (`ssl.conf_mode: pixelavg`): no threshold; each image's unlabeled CE is weighted by its mean
pseudo-label confidence over its valid pixels. The original multiplies a batch-summed loss (padding
included) by a sum of per-image confidences, which is only that for one image per GPU; here it is computed
per image, so any batch size gives the intended loss.

State (`make_state`): the frozen guidance encoder and guidance text. With no model.weights (the CPU recipe's
random tiny ViT) the encoder is a copy of the initial backbone, stored in the run's checkpoints so a resumed
run uses the same one.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from semiseg_cli.errors import UserError
from semiseg_cli.methods.fixmatch import cutmix, pseudo_label
from semiseg_cli.methods.losses import IGNORE
from semiseg_cli.models import maskclip
from semiseg_cli.methods.unimatch import LOADERS, logs, streams, unlabeled_sum  # noqa: F401 (LOADERS: the trainer's)


class Guidance:
    """The frozen dense-CLIP encoder and the guidance text embeddings [N, E] with the class of each row."""

    def __init__(self, cfg: dict, model):
        from semiseg_cli.models.clip_vit import MaskClipViT
        from semiseg_cli.models.semivl import embed_class_text, load_class_text

        m = cfg["model"]
        text_name = cfg["ssl"]["guidance_text"] or m["class_text"]
        self.text, self.owner = embed_class_text(cfg, load_class_text(text_name, cfg), average=False, seed=1)
        self.num_classes = cfg["dataset"]["num_classes"]
        self.from_file = bool(m["weights"])
        if self.from_file:
            self.encoder = MaskClipViT.from_file(m["weights"], img_size=cfg["train"]["crop_size"], act=m["vit_act"],
                                                 ln_eps=m["vit_ln_eps"], out_indices=())
        else:
            self.encoder = copy.deepcopy(model.backbone)
        device = next(model.parameters()).device
        self.encoder.to(device).eval().requires_grad_(False)
        self.text, self.owner = self.text.to(device), self.owner.to(device)
        self.renorm = model.vit_input

    def state_dict(self) -> dict:
        return {} if self.from_file else {"encoder": self.encoder.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "encoder" in state:
            self.encoder.load_state_dict(state["encoder"])

    @torch.no_grad()
    def labels(self, images: torch.Tensor, ign: torch.Tensor, conf_thresh: float) -> torch.Tensor:
        """MaskCLIP pseudo-labels [B, H, W] (255 = not confident or padding)."""
        logits = maskclip.dense_logits(self.encoder, self.text, self.owner, self.num_classes, self.renorm(images))
        return maskclip.labels(logits, conf_thresh, ign)


def make_state(cfg: dict, model, out, env) -> Guidance:
    if cfg["model"]["name"] != "semivl":
        raise UserError(f"method semivl needs the CLIP ViT model: set model.name=semivl (not {cfg['model']['name']!r})")
    return Guidance(cfg, model)


def guidance_ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """CE on the guidance labels (255 ignored), summed and divided by all pixels ("mean_all")."""
    return F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="sum") / label.numel()


def guidance_weight(cfg: dict, it: int, total: int) -> float:
    """lambda_t = ssl.guidance_weight x (1 - t/T): linear decay to 0."""
    return cfg["ssl"]["guidance_weight"] * (1 - it / total)


def confidence_weights(logits, ign, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixelavg` filter: every pixel kept, with its confidence as the weight (made per-image below)."""
    conf, label = pseudo_label(logits)
    return label, conf


def pixelavg_ce(logits, label, conf, ign) -> torch.Tensor:
    """Per image: CE over its valid pixels weighted by the image's mean confidence over those pixels;
    summed over the batch and divided by the number of valid pixels."""
    valid = (ign != IGNORE).float()
    mean_conf = (conf * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
    loss = F.cross_entropy(logits, label, reduction="none") * valid * mean_conf.view(-1, 1, 1)
    return loss.sum() / valid.sum().clamp(min=1)


def semivl_streams(model, batch: dict, ctx, extra_weak=None) -> dict:
    """UniMatch's streams with SemiVL's confidence mode (`ssl.conf_mode`)."""
    if ctx.cfg["ssl"]["conf_mode"] == "pixelavg":
        return streams(model, batch, ctx, select=confidence_weights, loss_u=pixelavg_ce, extra_weak=extra_weak)
    return streams(model, batch, ctx, extra_weak=extra_weak)  # tau threshold, UniMatch's loss


def guidance_terms(s: dict, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
    """lambda_t (0.25 L_mc,s1 + 0.25 L_mc,s2 + 0.5 L_mc,fp) on the unlabeled streams `s`, and its logs."""
    ssl, guide = ctx.cfg["ssl"], ctx.state
    m, m_mix = guide.labels(torch.cat([batch["u_w"], batch["u_w_mix"]]), torch.cat([batch["ign"], batch["ign_mix"]]),
                            ssl["guidance_conf"]).chunk(2)
    loss_mc = unlabeled_sum(guidance_ce(s["pred_u_s1"], cutmix(m, m_mix, batch["box1"])),
                            guidance_ce(s["pred_u_s2"], cutmix(m, m_mix, batch["box2"])),
                            guidance_ce(s["pred_u_w_fp"], m))
    lam = guidance_weight(ctx.cfg, ctx.iteration, ctx.total)
    return lam * loss_mc, {"loss_mc": loss_mc.detach(), "mc_ratio": (m != IGNORE).float().mean()}


def train_step(model, batch: dict, ctx) -> tuple:
    s = semivl_streams(model, batch, ctx)
    loss_guide, guide_logs = guidance_terms(s, batch, ctx)
    loss = (s["loss_x"] + unlabeled_sum(s["loss_s1"], s["loss_s2"], s["loss_fp"])) / 2 + loss_guide
    return loss, {**logs(s), **guide_logs}
