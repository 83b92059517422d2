"""Fully connected CRF refinement (Krähenbühl & Koltun) through pydensecrf (the `pydensecrf2` wheel).

Defaults are SLRNet's `utils/dcrf.py` (specs/slrnet_s4mc.md): unary -log(clip(p, 1e-5)), Gaussian
pairwise sxy 3 / compat 3, bilateral sxy 80 / srgb 13 / compat 10, 10 mean-field iterations. The keyword
arguments are the config's `crf` section keys: `dense_crf(image, probs, **cfg["crf"])`.
"""
from __future__ import annotations

import numpy as np


def dense_crf(image: np.ndarray, probs: np.ndarray, iters: int = 10, gauss_sxy: float = 3, gauss_compat: float = 3,
              bilateral_sxy: float = 80, bilateral_srgb: float = 13, bilateral_compat: float = 10,
              unary_eps: float | None = None) -> np.ndarray:
    """Refine class probabilities with a dense CRF.

    Args:
        image: uint8 RGB [H, W, 3], the image the probabilities belong to.
        probs: float [K, H, W] softmax probabilities.
        unary_eps: None = pydensecrf's unary -log(clip(p, 1e-5)) (SLRNet); a number e = -log(p + e) (SimSeg: 1e-8).

    Returns:
        float32 [K, H, W] marginals after `iters` mean-field iterations.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    unary = unary_from_softmax(probs.astype(np.float32)) if unary_eps is None else \
        -np.log(probs.reshape(k, -1) + unary_eps).astype(np.float32)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image, dtype=np.uint8),
                             compat=bilateral_compat)
    return np.array(crf.inference(iters), dtype=np.float32).reshape(k, h, w)
