import pytest
import torch

from semiseg_cli.config import load_config
from semiseg_cli.engine.distributed import DistEnv
from semiseg_cli.engine.trainer import BATCH_KEYS, StepContext, load_method
from semiseg_cli.methods import METHODS
from semiseg_cli.methods.fixmatch import cutmix, mix_targets, unsup_ce
from semiseg_cli.models.deeplabv3plus import DeepLabV3Plus


def fake_batch(n=2, size=32, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for name in BATCH_KEYS:
        for key in BATCH_KEYS[name]:
            if key in ("y",):
                batch[key] = torch.randint(0, k, (n, size, size), generator=g)
            elif key.startswith("ign"):
                ign = torch.zeros(n, size, size, dtype=torch.long)
                ign[:, -4:] = 255  # padded bottom rows
                batch[key] = ign
            elif key.startswith("box"):
                box = torch.zeros(n, size, size)
                box[:, 4:20, 8:24] = 1
                batch[key] = box
            else:
                batch[key] = torch.randn(n, 3, size, size, generator=g)
    return batch


@pytest.mark.parametrize("method", list(METHODS))
def test_two_train_steps_give_finite_losses_and_gradients(method):
    torch.manual_seed(0)
    cfg = load_config(None, [f"method={method}", "ssl.conf_thresh=0.0"])  # tau 0: every pixel contributes
    model = DeepLabV3Plus("resnet18", 6, head_channels=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    module = load_method(method)
    for step in range(2):
        batch = {k: v for k, v in fake_batch(seed=step).items()}
        loss, logs = module.train_step(model, batch, StepContext(cfg, step, 2, DistEnv()))
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
    assert model.training  # the eval-mode pseudo-label pass puts the model back in train mode


def test_cutmix_uses_the_same_box_for_images_labels_confidences_and_ignore():
    box = torch.zeros(1, 4, 5)
    box[0, 1:3, 2:4] = 1
    img, img_mix = torch.zeros(1, 3, 4, 5), torch.ones(1, 3, 4, 5)
    mixed = cutmix(img, img_mix, box)
    assert torch.equal(mixed[0, 0], box[0]) and torch.equal(mixed[0, 2], box[0])
    label, label_mix = torch.full((1, 4, 5), 2), torch.full((1, 4, 5), 7)
    conf, conf_mix = torch.full((1, 4, 5), 0.5), torch.full((1, 4, 5), 0.9)
    ign, ign_mix = torch.zeros(1, 4, 5, dtype=torch.long), torch.full((1, 4, 5), 255)
    l, c, i = mix_targets(box, label, conf, ign, label_mix, conf_mix, ign_mix)
    inside = box.bool()
    assert (l[inside] == 7).all() and (l[~inside] == 2).all()
    assert (c[inside] == 0.9).all() and (c[~inside] == 0.5).all()
    assert (i[inside] == 255).all() and (i[~inside] == 0).all()


def test_unsup_loss_divides_by_non_padded_pixels():
    logits = torch.zeros(1, 2, 2, 2)  # CE = log 2 everywhere
    label = torch.zeros(1, 2, 2, dtype=torch.long)
    conf = torch.tensor([[[0.99, 0.5], [0.99, 0.99]]])
    ign = torch.tensor([[[0, 0], [0, 255]]])
    # confident and not padded: 2 pixels; non-padded: 3 pixels (UniMatch's denominator)
    assert float(unsup_ce(logits, label, conf, ign, 0.95)) == pytest.approx(2 * torch.log(torch.tensor(2.0)).item() / 3)
