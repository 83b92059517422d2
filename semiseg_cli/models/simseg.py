"""SimSeg (Yi et al., CVPR 2023, "A Simple Framework for Text-Supervised Semantic Segmentation";
specs/simseg.md): a CLIP-style image-text model (a timm ViT and a BERT, bias-free projections to 512 on every
token) trained with locality-driven alignment (LoDA), whose zero-shot segmentation is its own inference here.

Pooling (`simseg.pool`): loda = per-channel mean of the top `image_k` (5) projected patch tokens, per-channel
max (`text_k` 1) over the valid text tokens; avg = mean over patches / valid tokens ("w/o LoDA"); cls = the
ViT's CLS and BERT's [CLS] token (holistic alignment). Pooled vectors are L2-normalised as x / (|x| + 1e-8)
(SimSeg's eps form).

Zero-shot segmentation (`aggregate`, what eval / infer / gen-pseudo call; tools/seg_evaluation.py): the image
resized to a `simseg.image_size` square (288); class embeddings = the mean over CLIP's 80 ImageNet templates of
each prompt's L2-normalised text embedding, divided by its norm (no eps); image-level scores s_c = g . t_c of
the pooled image vector g; candidates = the top 5 classes walked in score order, background (class 0) skipped,
stopping at the first below theta = mean + sigma x std (unbiased) of the top-M scores (M = `simseg.top_m`,
clamped to K); per candidate, the cosine map of the L2-normalised patch projections with t_c, nearest x patch
to the square, min-max normalised, refined by a two-label dense CRF on the de-normalised square image
(`crf.dense_crf`, unary -log(p + 1e-8), Gaussian 3/3, bilateral 40/13/10, 3 iterations), one 7x7 closing, a
nearest resize to the image, times s_c; the label is the argmax over the class maps (background's is 0, so
a class with s_c < 0 loses to it; ties go to the lower index).

The text tower is HuggingFace `transformers`' BertModel (the optional extra `semiseg[simseg]`, imported on use),
tokenised by the `tokenizers` library's BERT WordPiece from the vocabulary stored in the model (`vocab`, the
bytes of vocab.txt), so converted files and trained checkpoints tokenise without the tokenizer folder.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.data.text import Tokenizer, read_vocab, token_count
from semiseg_cli.errors import UserError
from semiseg_cli.models.clip_vit import resize_pos_embed  # SimSeg's interpolate_pos_embed: bicubic, CLS kept

EPS = 1e-8  # SimSeg's L2norm: x / (|x| + 1e-8)
BERT_MAX_POSITIONS = 512  # bert-base-uncased's position table
CRF = dict(iters=3, gauss_sxy=3, gauss_compat=3, bilateral_sxy=40, bilateral_srgb=13, bilateral_compat=10, unary_eps=1e-8)
POOLS = ("loda", "avg", "cls")  # = config CHOICES["simseg.pool"]
VIT_MODULES = ("vision_transformer", "deit")  # timm modules of the ViTs the image tower takes; other names: a CNN


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def topk_mean(x: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel mean of the k largest values over tokens: x [B, N, C] -> [B, C] (LoDA). With a 0/1 `mask`
    [B, N] the masked tokens are set to -10000 first and k is cut to the batch's shortest valid length
    (SimSeg's TopKPooling, evaluation); without, every token counts (VanillaTopKPooling, training)."""
    if mask is not None:
        x = x.masked_fill(mask[..., None] == 0, -10000.0)
        k = min(k, int(mask.sum(1).min()))
    return x.topk(k, dim=1).values.mean(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens [B, N, C] -> [B, C], of the valid ones with a 0/1 mask [B, N] (AvgPooling)."""
    if mask is None:
        return x.mean(1)
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1)


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("model.name=simseg needs the `transformers` package (its BERT text tower): "
                        "pip install 'semiseg[simseg]'") from None
    return transformers


class SimSeg(nn.Module):
    """Image and text towers with token projections and a learnable temperature.

    Args:
        backbone: a timm ViT name (its depth / width / heads / patch overridable by `vit`); its position table
            on `table_size`'s patch grid (default image_size's), resized on the fly for other inputs (`resize_pos_embed`).
            Or a timm CNN (CPU recipes): the tokens are the positions of its stage `cnn_stage`'s feature map.
        vit: timm overrides {depth, embed_dim, num_heads} (None values: the named model's).
        text: BERT sizes {layers, width, heads, mlp} and dropout; vocab: the vocab.txt bytes (b"": none yet, a checkpoint's
            comes with its weights); vocab_size: BERT's token table (30522).
        embed_dim: the projection width (512); pool: loda | avg | cls; image_k, text_k: LoDA's k;
        temperature: initial tau (used as clamp(tau, 1e-3, 0.5)); max_length: text tokens (25).
    """

    free_shape_keys = ("vocab",)  # the vocabulary's bytes: a checkpoint's replaces the built one (any length)

    def __init__(self, backbone: str, vit: dict, text: dict, vocab: bytes, vocab_size: int, image_size: int = 288,
                 embed_dim: int = 512, pool: str = "loda", image_k: int = 5, text_k: int = 1,
                 temperature: float = 0.02, max_length: int = 25, table_size: int | None = None, cnn_stage: int = -1):
        super().__init__()
        import timm

        from semiseg_cli.models import timm_name_errors

        tf = transformers_module()
        with timm_name_errors(backbone):
            vit_entry = timm.models.is_model_in_modules(backbone, VIT_MODULES)
            if vit_entry:
                self.image_encoder = timm.create_model(backbone, pretrained=False, num_classes=0,
                                                       img_size=table_size or image_size, dynamic_img_size=True,
                                                       **{k: v for k, v in vit.items() if v})
            else:  # a CNN tower (CPU recipes): the tokens are one stage's feature-map positions
                self.image_encoder = timm.create_model(backbone, pretrained=False, features_only=True,
                                                       out_indices=(cnn_stage,))
        self.cnn = not vit_entry
        if self.cnn:
            width, self.patch = self.image_encoder.feature_info.channels()[-1], self.image_encoder.feature_info.reduction()[-1]
            if pool == "cls":
                raise UserError(f"simseg.pool=cls takes a ViT's CLS token; model.backbone {backbone!r} is a CNN "
                                "(use loda or avg)")
        elif not hasattr(self.image_encoder, "pos_embed") or not hasattr(self.image_encoder, "cls_token"):
            raise UserError(f"model.backbone {backbone!r}: SimSeg needs a timm ViT with a CLS token and a position "
                            "table (e.g. vit_small_patch16_224, vit_base_patch16_224) or a timm CNN")
        else:
            width, self.patch = self.image_encoder.embed_dim, self.image_encoder.patch_embed.patch_size[0]
        bert = tf.BertConfig(vocab_size=vocab_size, hidden_size=text["width"], num_hidden_layers=text["layers"],
                             num_attention_heads=text["heads"], intermediate_size=text["mlp"],
                             max_position_embeddings=BERT_MAX_POSITIONS,
                             hidden_dropout_prob=text.get("dropout", 0.1), attention_probs_dropout_prob=text.get("dropout", 0.1))
        self.text_encoder = tf.BertModel(bert, add_pooling_layer=False)
        self.image_projection = nn.Linear(width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text["width"], embed_dim, bias=False)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.register_buffer("vocab", torch.frombuffer(bytearray(vocab), dtype=torch.uint8).clone() if vocab
                             else torch.zeros(0, dtype=torch.uint8))
        self.image_size, self.pool, self.image_k, self.text_k = image_size, pool, image_k, text_k
        self.max_length = max_length
        self.zero_shot = dict(top_m=10, walk=5, sigma=1.0, crf=True)
        self.class_names: list = []
        self._tokenizer = None
        self._class_text = None  # cached class embeddings [K, E], dropped whenever the weights may change

    # --- towers -------------------------------------------------------------------------------------
    def image_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The ViT's normed tokens [B, 1 + h*w, D] (CLS first) and the patch grid (h, w): SimSeg's forward
        (patch embedding, CLS, + position table, blocks, final norm; no timm pooling)."""
        v = self.image_encoder
        if self.cnn:  # the stage's positions as tokens, their mean in the CLS slot (unused: pool cls needs a ViT)
            f = v(x)[-1]
            b, d, h, w = f.shape
            t = f.flatten(2).transpose(1, 2)
            return torch.cat([t.mean(1, keepdim=True), t], 1), (h, w)
        t = v.patch_embed(x)                                   # [B, h, w, D] (timm dynamic_img_size: NHWC)
        b, h, w, d = t.shape
        g = v.patch_embed.grid_size                            # the stored table's grid (image_size / patch)
        pos = resize_pos_embed(v.pos_embed, g, (h, w))
        t = torch.cat([v.cls_token.expand(b, -1, -1), t.reshape(b, h * w, d)], 1) + pos
        return v.norm(v.blocks(v.pos_drop(t))), (h, w)

    def image_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(pooled unit embedding g [B, E], projected patch tokens [B, h*w, E], grid)."""
        tokens, grid = self.image_tokens(x)
        if self.pool == "cls":
            return l2norm(self.image_projection(tokens[:, 0])), self.image_projection(tokens[:, 1:]), grid
        patches = self.image_projection(tokens[:, 1:])
        pooled = topk_mean(patches, self.image_k) if self.pool == "loda" else patches.mean(1)
        return l2norm(pooled), patches, grid

    def text_embedding(self, ids: torch.Tensor, mask: torch.Tensor, masked: bool = True) -> torch.Tensor:
        """Unit text embeddings [N, E] of token ids / attention masks [N, L]. `masked`: the LoDA max runs over
        the valid tokens only (evaluation, SimSeg's TopKPooling); False: over all positions, padding included
        (training, VanillaTopKPooling: the author's answer in SimSeg issue #10)."""
        states = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pool == "cls":
            return l2norm(self.text_projection(states[:, 0]))
        proj = self.text_projection(states)
        if self.pool == "avg":
            return l2norm(masked_mean(proj, mask))
        return l2norm(topk_mean(proj, self.text_k, mask if masked else None))

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.vocab.numel() == 0:
                raise UserError("this SimSeg model has no vocabulary: set simseg.vocab to a BERT vocab.txt")
            self._tokenizer = Tokenizer(bytes(self.vocab.cpu().numpy()), self.max_length)
        return self._tokenizer

    def encode_text(self, texts: list[str], masked: bool = True) -> torch.Tensor:
        ids, mask = self.tokenizer(texts)
        dev = self.temperature.device
        return self.text_embedding(ids.to(dev), mask.to(dev), masked)

    # --- zero-shot segmentation -------------------------------------------------------------------------
    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """[K, E]: per class, the mean over the 80 ImageNet templates of the unit prompt embeddings, divided by
        its norm (SimSeg's zero_shot_classifier); cached until the weights may change."""
        if self._class_text is None:
            from semiseg_cli.models.prompts import templates

            rows = []
            for name in self.class_names:
                emb = self.encode_text([t.format(name) for t in templates("imagenet80")]).mean(0)
                rows.append(emb / emb.norm())
            self._class_text = torch.stack(rows)
        return self._class_text

    def train(self, mode: bool = True):
        if mode:
            self._class_text = None
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        vocab = state_dict.get(prefix + "vocab")
        if vocab is not None and vocab.shape != self.vocab.shape:  # another vocabulary of the same size
            self.vocab = torch.empty_like(vocab, device=self.vocab.device)
        self._class_text, self._tokenizer = None, None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, need_fp: bool = False, text: tuple | None = None):
        """Zero-shot class maps of x; with `text` = (token ids, attention mask) [N, L] the unit embeddings
        (image [N, E], text [N, E]) of the pairs instead, the text max over all positions in training mode
        (SimSeg's VanillaTopKPooling) and over the valid ones in eval mode."""
        if text is not None:
            return self.image_embedding(x)[0], self.text_embedding(*text, masked=not self.training)
        if need_fp:  # trained by method simseg only (config OWN_METHOD): no segmentation method reaches this
            raise UserError("model.name=simseg has no feature-perturbation stream")
        return self.aggregate(x, {}, None)

    @torch.no_grad()
    def aggregate(self, x: torch.Tensor, ev: dict, labels=None) -> torch.Tensor:
        """Zero-shot class maps [B, K, H, W] for ImageNet-normalised images x [B, 3, H, W] (see the module
        docstring); their argmax is SimSeg's label."""
        from semiseg_cli.data.transforms import denormalize

        square = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                               antialias=True)  # = PIL's bilinear resize of the image before normalising
        g, patches, (h, w) = self.image_embedding(square)
        text = self.class_embeddings().to(g.dtype)
        dense = F.normalize(patches, dim=-1) @ text.T                         # [B, hw, K] cosines
        scores = g @ text.T                                                   # [B, K]
        images = (denormalize(square) * 255).clamp(0, 255).to(torch.uint8)   # the uint8 cast truncates, as SimSeg's
        out = x.new_zeros((x.shape[0], len(self.class_names)) + tuple(x.shape[-2:]))
        for i in range(x.shape[0]):
            maps = dense[i].T.reshape(-1, 1, h, w)
            for c in candidates(scores[i], self.zero_shot["top_m"], self.zero_shot["walk"], self.zero_shot["sigma"]):
                mask = class_mask(maps[c], images[i], self.patch, self.zero_shot["crf"])
                mask = F.interpolate(mask[None, None].float(), size=tuple(x.shape[-2:]), mode="nearest")[0, 0]
                out[i, c] = mask * scores[i, c]
        return out


def candidates(scores: torch.Tensor, top_m: int, walk: int = 5, sigma: float = 1.0) -> list[int]:
    """SimSeg's candidate classes of one image's scores [K]: the top `walk` in descending order, class 0
    (background) skipped, stopping at the first below theta = mean + sigma * std (unbiased) of the top
    min(top_m, K) scores."""
    k = scores.numel()
    top = scores.topk(min(top_m, k)).values
    theta = top.mean() + sigma * (top.std() if top.numel() > 1 else 0.0)
    order = scores.topk(min(walk, k)).indices.tolist()
    out = []
    for c in order:
        if c == 0:
            continue  # background never gets a mask (SimSeg also skips 255, which no class index can be here)
        if scores[c] < theta:
            break
        out.append(c)
    return out


def class_mask(cos: torch.Tensor, image: torch.Tensor, patch: int, crf: bool = True) -> torch.Tensor:
    """One candidate's binary mask [S, S] (bool) from its cosine map cos [1, h, w] and the uint8 square image
    [3, S, S]: nearest x patch, min-max normalised, two-label dense CRF argmax (without `crf`: p > 0.5), one
    7x7 closing (`cv2.dilate(m, k, 5)` puts 5 in `dst`: one iteration)."""
    import cv2
    import numpy as np

    p = F.interpolate(cos[None].float(), scale_factor=patch, mode="nearest")[0, 0]
    p = ((p - p.min()) / (p.max() - p.min()).clamp(min=1e-12)).cpu().numpy()  # a flat map: all 0 (SimSeg: NaN)
    if crf:
        from semiseg_cli.crf import dense_crf

        img = image.permute(1, 2, 0).cpu().numpy()
        fg = dense_crf(img, np.stack([1 - p, p]), **CRF).argmax(0)
    else:
        fg = p > 0.5
    m = fg.astype(np.uint8) * 255
    kernel = np.ones((7, 7), np.uint8)
    m = cv2.erode(cv2.dilate(m, kernel), kernel)
    return torch.from_numpy(m > 127)


def build_simseg(cfg: dict) -> SimSeg:
    """SimSeg from the `simseg` section and `model.backbone` (random weights: a converted SimSeg checkpoint,
    `semiseg convert-weights simseg`, or a trained run's, is loaded into it by eval / infer / gen-pseudo). The
    vocabulary: simseg.vocab (its size must be simseg.vocab_size), else a checkpoint's stored one replaces an
    empty placeholder. Class names: model.class_text (a bundled list, e.g. simseg_voc21) or the dataset's."""
    from semiseg_cli.models.semivl import load_class_text

    m, s = cfg["model"], cfg["simseg"]
    vocab = b""
    if s["vocab_size"] is None and not s["vocab"]:
        raise UserError("simseg.vocab_size=null takes the size from simseg.vocab: set simseg.vocab (a vocab.txt)")
    if s["vocab"]:
        vocab = read_vocab(s["vocab"])
        n = token_count(vocab)
        if s["vocab_size"] is None:
            s = {**s, "vocab_size": n}
        elif n != s["vocab_size"]:
            raise UserError(f"{s['vocab']}: {n} tokens, but simseg.vocab_size is {s['vocab_size']}; "
                            f"pass --set simseg.vocab_size={n}")
    model = SimSeg(m["backbone"], vit_overrides(s), text_sizes(s), vocab, s["vocab_size"], s["image_size"],
                   s["embed_dim"], s["pool"], s["image_k"], s["text_k"], s["temperature"], s["max_length"],
                   s["table_size"], s["cnn_stage"])
    if m["weights"]:
        from semiseg_cli.models import convert_hint, make_packaged_weights

        make_packaged_weights(m["backbone"], m["weights"])
        hint = convert_hint(m["backbone"], m["weights"]) if model.cnn else \
            f"semiseg convert-weights timm-vit vit_in21k.safetensors {m['weights']}"
        load_tower(model.image_encoder, m["weights"], "model.weights", hint, extra_allowed=model.cnn)
    if s["text_weights"]:
        load_tower(model.text_encoder, s["text_weights"], "simseg.text_weights",
                   f"semiseg convert-weights bert pytorch_model.bin {s['text_weights']}")
    model.zero_shot = dict(top_m=s["top_m"], walk=s["walk"], sigma=s["sigma"], crf=s["crf"])
    model.class_names = [n if isinstance(n, str) else n[0] for n in load_class_text(m["class_text"], cfg)]
    return model


def load_tower(tower: nn.Module, path: str, key: str, hint: str, extra_allowed: bool = False) -> None:
    """A tower's initial weights (a `convert-weights timm-vit` / `bert` file, config key `key`): every key of the
    tower with its shape (BERT's constant position_ids aside); a ViT's position table resized to the tower's grid
    first (bicubic, CLS kept, as SimSeg's interpolate_pos_embed). `extra_allowed`: keys the tower lacks are
    ignored (a CNN tower's stages after its token stage, its classifier)."""
    from semiseg_cli.io import key_mismatches
    from semiseg_cli.models import read_weights_file

    state = {k: v for k, v in read_weights_file(path, hint, key).items() if not k.endswith("position_ids")}
    own = {k: v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    pos, want = state.get("pos_embed"), own.get("pos_embed")
    if pos is not None and want is not None and pos.shape[1] != want.shape[1]:
        side = lambda n: int(round((n - 1) ** 0.5))  # noqa: E731  the grid of CLS + a square table
        state["pos_embed"] = resize_pos_embed(pos, (side(pos.shape[1]),) * 2, (side(want.shape[1]),) * 2)
    problems = key_mismatches(own, state, extra_allowed=extra_allowed)
    if problems:
        tower_name = "image" if key == "model.weights" else "text"
        raise UserError(f"{path}: does not fit this config's {tower_name} tower ({', '.join(problems)}); make it with "
                        f"`{hint}` and set the simseg sizes to the file's")
    tower.load_state_dict({k: state[k] for k in own}, strict=False)


def vit_overrides(s: dict) -> dict:
    return {"depth": s["vit_depth"], "embed_dim": s["vit_width"], "num_heads": s["vit_heads"], "patch_size": s["vit_patch"]}


def text_sizes(s: dict) -> dict:
    return {"layers": s["text_layers"], "width": s["text_width"], "heads": s["text_heads"], "mlp": s["text_mlp"],
            "dropout": s["text_dropout"]}
