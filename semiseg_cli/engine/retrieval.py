"""Image-text retrieval evaluation of an image-text model (SimSeg; tools/retrieval_evaluation.py, specs/simseg.md §3).

Data: a parquet file with one row per (image, caption) pair and the columns `imbytes` (encoded image bytes),
`caption`, `image_id` (rows with image_id <= -1 are dropped) and `id` (the caption id), SimSeg's
`valid.parquet` layout (read with pyarrow, the `semiseg[simseg]` extra). Images are embedded once per
image_id after a square resize to `simseg.retrieval_resize` (324) and a centre crop to `simseg.image_size`
(288), ImageNet-normalised; captions with the padded-token mask (evaluation pooling).

Metrics (RetrievalMetric): I2T ranks every caption for each image, T2I every image for each caption; a
query's rank is the position of its first matching item (same image_id) in descending cosine order; R@K is the
share of queries with rank < K, in %, for K = 1, 5, 10; RSUM is the sum of the six.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from semiseg_cli.errors import UserError

COLUMNS = ("imbytes", "caption", "image_id", "id")


def read_pairs(path: str | Path) -> dict:
    """{"images": {image_id: bytes} (first row of each id), "captions": [str], "caption_image": [image_id]}
    from a retrieval parquet; a missing column or file is one UserError naming it."""
    from semiseg_cli.data.pairs import open_parquet

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: retrieval file not found")
    table = open_parquet(path, COLUMNS, f"a retrieval parquet has {', '.join(COLUMNS)}")
    ids, captions, blobs = (table.column(c).to_pylist() for c in ("image_id", "caption", "imbytes"))
    images, caps, owners = {}, [], []
    for i, cap, blob in zip(ids, captions, blobs):
        if i is None or int(i) <= -1:
            continue
        images.setdefault(int(i), blob)
        caps.append(str(cap))
        owners.append(int(i))
    if not caps:
        raise UserError(f"{path}: no row with an image_id >= 0")
    return {"images": images, "captions": caps, "caption_image": owners}


def recall_at(sim: torch.Tensor, query_ids: torch.Tensor, item_ids: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """{k: % of queries whose first matching item ranks < k} for similarities [Q, N] (queries with no match
    are left out, as SimSeg's RetrievalMetric does)."""
    order = sim.argsort(dim=1, descending=True)
    matched = item_ids[order] == query_ids[:, None]
    has, first = matched.max(dim=1)
    rank = first[has]
    return {k: float((rank < k).float().mean() * 100) if rank.numel() else float("nan") for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, image_ids: torch.Tensor, text_emb: torch.Tensor,
                      text_image_ids: torch.Tensor) -> dict:
    """I2T / T2I R@1, 5, 10 (%) and RSUM of unit embeddings (one row per unique image; one per caption)."""
    sim = image_emb.float() @ text_emb.float().T
    i2t = recall_at(sim, image_ids, text_image_ids)
    t2i = recall_at(sim.T, text_image_ids, image_ids)
    out = {f"i2t_r{k}": round(v, 4) for k, v in i2t.items()} | {f"t2i_r{k}": round(v, 4) for k, v in t2i.items()}
    out["rsum"] = round(sum(i2t.values()) + sum(t2i.values()), 4)
    return out


def image_tensor(blob: bytes, resize: int, crop: int, where: str) -> torch.Tensor:
    """[3, crop, crop] float 0..255: the decoded RGB image resized to a resize x resize square (bilinear,
    antialiased: PIL's) and centre-cropped."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import center_crop

    try:
        im = Image.open(io.BytesIO(blob)).convert("RGB")
    except (UnidentifiedImageError, OSError, TypeError) as e:
        raise UserError(f"{where}: not a decodable image ({e})") from None
    im = center_crop(im.resize((resize, resize), Image.BILINEAR), [crop, crop])
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float()


@torch.no_grad()
def evaluate_retrieval(model, pairs: dict, path: str | Path, cfg: dict, device, batch_size: int = 32,
                       progress=None) -> dict:
    """Retrieval metrics of `model` (image_embedding / encode_text) on `pairs` (`read_pairs` of `path`)."""
    from semiseg_cli.data.transforms import normalize

    s = cfg["simseg"]
    model.eval()
    ids = sorted(pairs["images"])
    chunks = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    it = progress(chunks, total=len(chunks), desc="images") if progress else chunks
    image_emb = []
    for chunk in it:
        x = torch.stack([image_tensor(pairs["images"][i], s["retrieval_resize"], s["image_size"],
                                      f"{path} image_id {i}") for i in chunk]).to(device)
        image_emb.append(model.image_embedding(normalize(x))[0].cpu())
    caps = pairs["captions"]
    text_emb = [model.encode_text(caps[i:i + 256]).cpu() for i in range(0, len(caps), 256)]
    out = retrieval_metrics(torch.cat(image_emb), torch.tensor(ids), torch.cat(text_emb),
                            torch.tensor(pairs["caption_image"]))
    return {**out, "images": len(ids), "captions": len(caps)}
