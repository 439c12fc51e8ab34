"""The DeepLabV3 tutorial's techniques in some_define: focal / class-weighted losses, the normalisation swaps,
CutMix, CopyBlob, multi-scale + flip inference, and the models and losses the training scripts build from flags.
CPU only, a few seconds."""
import itertools
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import some_define  # noqa: E402
from some_define import (IGNORE_INDEX, EvoNorm2dB0, EvoNorm2dS0, FocalLoss, class_pixel_weights, copyblob,  # noqa: E402
                         cutmix_segmentation, num_groups, predict_scores, replace_norm)


def _seg_batch(n=2, c=5, h=6, w=7, seed=0, void_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 3
    target = torch.randint(c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < void_frac] = IGNORE_INDEX
    return logits, target


# ----------------------------------------------------------------------------- focal loss / weights

@pytest.mark.parametrize("weighted", [False, True])
def test_focal_gamma0_is_cross_entropy(weighted):
    logits, target = _seg_batch()
    weight = torch.rand(5) + 0.5 if weighted else None
    ours = FocalLoss(gamma=0.0, weight=weight)(logits, target)
    ref = F.cross_entropy(logits, target, weight=weight, reduction="none", ignore_index=IGNORE_INDEX)
    assert ours.shape == target.shape
    assert torch.allclose(ours, ref, atol=1e-6)


def test_focal_matches_brute_force():
    logits, target = _seg_batch(n=1, c=3, h=3, w=4, seed=1)
    weight = torch.tensor([0.5, 1.0, 2.0])
    ours = FocalLoss(gamma=2.0, weight=weight)(logits, target)
    for y, x in itertools.product(range(3), range(4)):
        t = int(target[0, y, x])
        if t == IGNORE_INDEX:
            assert ours[0, y, x] == 0
            continue
        p = torch.exp(logits[0, :, y, x].double())
        p = p / p.sum()
        expected = -weight[t].double() * (1 - p[t]) ** 2 * torch.log(p[t])
        assert abs(float(ours[0, y, x]) - float(expected)) < 1e-5
    assert (ours[target != IGNORE_INDEX] > 0).all()


def test_focal_downweights_easy_pixels_and_backprops():
    logits, target = _seg_batch(seed=2)
    logits.requires_grad_(True)
    focal = FocalLoss(gamma=2.0)(logits, target)
    ce = F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE_INDEX)
    assert (focal <= ce + 1e-7).all()
    focal.mean().backward()
    assert torch.isfinite(logits.grad).all()


def test_class_pixel_weights():
    counts = torch.tensor([1000.0, 500.0, 100.0, 10.0, 0.0])
    w = class_pixel_weights(counts)
    assert w.shape == (5,)
    assert (w[:4].diff() > 0).all()  # rarer -> bigger weight
    assert torch.isclose(w[:4].mean(), torch.tensor(1.0))
    assert w[4] == w[:4].max()  # unseen classes get the largest weight
    freq = counts[:4] / counts.sum()
    raw = 1 / torch.log(1.02 + freq)
    assert torch.allclose(w[:4], (raw / raw.mean()).float())
    assert torch.equal(class_pixel_weights(torch.zeros(3)), torch.ones(3))


# ----------------------------------------------------------------------------- normalisation

def test_num_groups():
    assert num_groups(64) == 32 and num_groups(48) == 24 and num_groups(20) == 20
    assert num_groups(512) == 32 and num_groups(3) == 3 and num_groups(37) == 1
    model = replace_norm(nn.Sequential(nn.BatchNorm2d(48), nn.BatchNorm2d(20)), "group")
    assert [m.num_groups for m in model] == [24, 20]


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "evo", "evo_b0", "evo_s0"])
def test_replace_norm_resnet18(norm):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert replace_norm(model, norm) is model
    if norm != "batch":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_relu_after = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert n_relu_after == (0 if norm.startswith("evo") else n_relu)
    expected = {"instance": nn.InstanceNorm2d, "group": nn.GroupNorm, "evo": EvoNorm2dS0,
                "evo_s0": EvoNorm2dS0, "evo_b0": EvoNorm2dB0, "batch": nn.BatchNorm2d}[norm]
    assert isinstance(model.bn1, expected) and isinstance(model.layer2[0].downsample[1], expected)
    x = torch.randn(2, 3, 64, 64)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (2, 1000) and torch.isfinite(out).all()
    model.train()
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("norm", ["instance", "group", "evo_b0", "evo_s0"])
def test_replace_norm_keeps_affine(norm):
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    new = replace_norm(nn.Sequential(bn), norm)[0]
    w, b = (new.gamma, new.beta) if norm.startswith("evo") else (new.weight, new.bias)
    assert torch.equal(w.flatten(), bn.weight) and torch.equal(b.flatten(), bn.bias)


def test_evonorm_b0_running_var_and_eval_batch_independence():
    torch.manual_seed(0)
    layer = EvoNorm2dB0(8)
    with torch.no_grad():
        layer.v1.normal_()
    for _ in range(5):
        layer(torch.randn(4, 8, 5, 5) * 3 + 1)
    assert not torch.allclose(layer.running_var, torch.ones(8))  # updated, towards 9
    layer.eval()
    batch = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        together = layer(batch)
        alone = layer(batch[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-6)
    # in training the batch statistics make it batch-dependent
    layer.train()
    with torch.no_grad():
        assert not torch.allclose(layer(batch)[1:2], layer(batch[1:2]), atol=1e-4)


def test_evonorm_b0_formula():
    layer = EvoNorm2dB0(4)
    x = torch.randn(3, 4, 5, 5)
    y = layer(x)
    bv = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    iv = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    ref = x / torch.maximum((bv + 1e-5).sqrt(), x + (iv + 1e-5).sqrt())
    assert torch.allclose(y, ref, atol=1e-6)


def test_evonorm_s0_batch_independent_and_formula():
    torch.manual_seed(0)
    layer = EvoNorm2dS0(48)
    assert layer.groups == 24
    x = torch.randn(3, 48, 6, 6)
    for train in (True, False):
        layer.train(train)
        with torch.no_grad():
            assert torch.allclose(layer(x)[2:3], layer(x[2:3]), atol=1e-6)
    g = x.reshape(3, 24, 2, 6, 6)
    std = (g.var(dim=(2, 3, 4), unbiased=False, keepdim=True) + 1e-5).sqrt().expand_as(g).reshape(3, 48, 6, 6)
    assert torch.allclose(layer(x), x * torch.sigmoid(x) / std, atol=1e-6)


# ----------------------------------------------------------------------------- cutmix

def _aug_batch(n=4, h=20, w=24, num_classes=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, h, w, generator=g)  # distinct values identify the source of every pixel
    if dtype == torch.uint8:
        images = torch.randint(256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(num_classes, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE_INDEX
    return images, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_cutmix_consistency(dtype):
    images, labels = _aug_batch(dtype=dtype)
    images0, labels0 = images.clone(), labels.clone()
    torch.manual_seed(0)
    out_img, out_lbl = cutmix_segmentation(images, labels, prob=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(images, images0) and torch.equal(labels, labels0)  # inputs untouched
    assert out_img.shape == images.shape and out_img.dtype == images.dtype
    assert out_lbl.shape == labels.shape and out_lbl.dtype == labels.dtype
    mixed = 0
    for i in range(len(images)):
        own = (out_img[i] == images[i]).all(0) & (out_lbl[i] == labels[i])
        # some single partner explains every other pixel, image and label together, and they form a box
        ok = False
        for j in range(len(images)):
            partner = (out_img[i] == images[j]).all(0) & (out_lbl[i] == labels[j])
            if (own | partner).all():
                ok = True
                void = out_lbl[i] == IGNORE_INDEX
                assert (~void | (labels[i] == IGNORE_INDEX) | (labels[j] == IGNORE_INDEX)).all()
                if j != i:
                    pasted = ~own
                    if pasted.any():
                        ys, xs = torch.nonzero(pasted, as_tuple=True)
                        assert partner[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
                break
        assert ok
        mixed += int((~own).any())
    assert mixed > 0


def test_cutmix_prob0_and_reproducible():
    images, labels = _aug_batch()
    out_img, out_lbl = cutmix_segmentation(images, labels, prob=0.0)
    assert torch.equal(out_img, images) and torch.equal(out_lbl, labels)
    assert out_img.data_ptr() != images.data_ptr()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(cutmix_segmentation(images, labels, prob=1.0, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ----------------------------------------------------------------------------- copyblob

SRC, HOST = 7, 0


def _copyblob_batch(seed=0):
    images, labels = _aug_batch(n=4, h=16, w=16, num_classes=3, seed=seed)
    labels[:, 4:14, 2:12][labels[:, 4:14, 2:12] != IGNORE_INDEX] = HOST  # a host area in every sample
    labels[0, 1:4, 10:13] = SRC  # an irregular blob (with void holes) in samples 0 and 2
    labels[0, 3, 13] = SRC
    labels[0, 2, 11] = IGNORE_INDEX
    labels[2, 12:15, 13:15] = SRC
    return images, labels


def _check_copyblob(images, labels, out_img, out_lbl):
    n, _, h, w = images.shape
    changed_any = False
    for i in range(n):
        changed = (out_img[i] != images[i]).any(0) | (out_lbl[i] != labels[i])
        assert ((labels[i] != IGNORE_INDEX) | changed | (out_lbl[i] == IGNORE_INDEX)).all()  # untouched void stays void
        if not changed.any():
            continue
        changed_any = True
        assert (out_lbl[i][changed] == SRC).all()
        ys, xs = torch.nonzero(changed, as_tuple=True)
        # some donor j and offset map every changed pixel onto a SRC pixel of j with the same image value
        found = False
        for j in range(n):
            if j == i:
                continue
            for dy, dx in itertools.product(range(-h + 1, h), range(-w + 1, w)):
                sy, sx = ys + dy, xs + dx
                if sy.min() < 0 or sx.min() < 0 or sy.max() >= h or sx.max() >= w:
                    continue
                if (labels[j, sy, sx] == SRC).all() and torch.equal(out_img[i][:, ys, xs], images[j][:, sy, sx]):
                    found = True
                    break
            if found:
                break
        assert found
    return changed_any


def test_copyblob_consistency():
    images, labels = _copyblob_batch()
    images0, labels0 = images.clone(), labels.clone()
    pasted = 0
    for seed in range(4):
        out_img, out_lbl = copyblob(images, labels, [(SRC, HOST)], prob=1.0,
                                    generator=torch.Generator().manual_seed(seed))
        assert out_img.shape == images.shape and out_lbl.shape == labels.shape
        assert out_img.dtype == images.dtype and out_lbl.dtype == labels.dtype
        pasted += _check_copyblob(images, labels, out_img, out_lbl)
    assert pasted > 0
    assert torch.equal(images, images0) and torch.equal(labels, labels0)


def test_copyblob_pastes_exact_blob():
    images, labels = torch.rand(2, 3, 12, 12), torch.zeros(2, 12, 12, dtype=torch.long)
    labels[0] = 1  # sample 0: no host, donor only
    labels[0, 2:4, 3:6] = SRC
    labels[0, 2, 3] = IGNORE_INDEX  # a void corner of the box must not be pasted
    out_img, out_lbl = copyblob(images, labels, [(SRC, HOST)], prob=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out_img[0], images[0]) and torch.equal(out_lbl[0], labels[0])
    changed = out_lbl[1] == SRC
    assert changed.sum() == 5
    ys, xs = torch.nonzero(changed, as_tuple=True)
    ty, tx = int(ys.min()), int(xs.min())  # the blob's bounding box is the pasted box
    assert torch.equal(changed[ty:ty + 2, tx:tx + 3], labels[0, 2:4, 3:6] == SRC)
    assert labels[1, ty + 1, tx + 1] == HOST  # centre of the pasted box was host
    assert _check_copyblob(images, labels, out_img, out_lbl)


def test_copyblob_skips():
    images, labels = _copyblob_batch()
    no_src = labels.clone()
    no_src[no_src == SRC] = 1
    out_img, out_lbl = copyblob(images, no_src, [(SRC, HOST)], prob=1.0)
    assert torch.equal(out_img, images) and torch.equal(out_lbl, no_src)
    # a blob spanning the whole frame fits only centred; with no host at the centre nothing is pasted
    images, labels = torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8, dtype=torch.long)
    labels[0, 0, 0] = labels[0, 7, 7] = SRC
    labels[1, :2] = HOST
    out_img, out_lbl = copyblob(images, labels, [(SRC, HOST)], prob=1.0)
    assert torch.equal(out_img, images) and torch.equal(out_lbl, labels)
    labels[1, 4, 4] = HOST  # now the centre is host: both corners land on the frame corners
    out_img, out_lbl = copyblob(images, labels, [(SRC, HOST)], prob=1.0)
    assert out_lbl[1, 0, 0] == SRC and out_lbl[1, 7, 7] == SRC and (out_lbl[1] == SRC).sum() == 2
    assert torch.equal(out_img[1, :, 0, 0], images[0, :, 0, 0])
    out_img, out_lbl = copyblob(images, labels, [(SRC, HOST)], prob=0.0)
    assert torch.equal(out_img, images) and torch.equal(out_lbl, labels)


# ----------------------------------------------------------------------------- multi-scale inference

class Needs32(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0, x.shape
        return {"out": self.conv(x)}


def test_multiscale_single_scale_equals_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    image = torch.randn(1, 3, 64, 64)
    probs = predict_scores(net, image, scales=(1.0,), flip=False)
    assert torch.allclose(probs, net(image).softmax(1), atol=1e-6)


def test_multiscale_flip_and_padding():
    torch.manual_seed(0)
    net = Needs32().eval()
    image = torch.randn(1, 3, 50, 70)
    with pytest.raises(AssertionError):
        net(image)
    single = predict_scores(net, image, scales=(1.0,), flip=False)
    assert single.shape == (1, 4, 50, 70)
    assert torch.allclose(single, net.conv(image).softmax(1), atol=1e-6)  # padding cropped exactly
    scales = (0.5, 0.75, 1.0, 1.25, 2.2)
    no_flip = predict_scores(net, image, scales=scales, flip=False)
    with_flip = predict_scores(net, image, scales=scales, flip=True)
    assert torch.allclose(no_flip, with_flip, atol=1e-6)  # a 1x1 conv commutes with flipping
    assert torch.allclose(with_flip.sum(1), torch.ones(1, 50, 70), atol=1e-5)


def test_multiscale_flip_averages_flipped_pass():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 3, (1, 3), padding=(0, 1)).eval()  # not flip-equivariant
    image = torch.randn(1, 3, 32, 32)
    probs = predict_scores(net, image, scales=(1.0,), flip=True)
    with torch.no_grad():
        ref = (net(image).softmax(1) + net(image.flip(-1)).softmax(1).flip(-1)) / 2
    assert torch.allclose(probs, ref, atol=1e-6)


class ScaleProbe(nn.Module):
    """A net whose scores depend on the scale it sees (3x3 convs), recording the input sizes it was given."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.body(x)


def test_multiscale_averages_the_softmax_of_every_scale_and_its_flip():
    """Against the tutorial's recipe written out here: each scale (and its flip) through the net, scores resized
    back bilinearly, softmax, averaged. Sizes are multiples of 32, so no padding enters."""
    torch.manual_seed(0)
    net = ScaleProbe().eval()
    image = torch.randn(1, 3, 64, 64)
    scales = (0.5, 1.0, 1.5)
    probs = predict_scores(net, image, scales=scales, flip=True)
    assert net.seen == [(32, 32), (32, 32), (64, 64), (64, 64), (96, 96), (96, 96)]
    expected = 0
    with torch.no_grad():
        for s in scales:
            x = F.interpolate(image, size=(round(64 * s),) * 2, mode='bilinear', align_corners=False)
            for flip in (False, True):
                scores = net.body(x.flip(-1) if flip else x)
                p = F.interpolate(scores, size=(64, 64), mode='bilinear', align_corners=False).softmax(1)
                expected = expected + (p.flip(-1) if flip else p)
    torch.testing.assert_close(probs, expected / 6, atol=1e-6, rtol=0)
    # several scales change the scores: the single-scale result is another one
    single = predict_scores(net, image, scales=(1.0,), flip=True)
    assert (probs - single).abs().max() > 1e-3


def test_multiscale_tutorial_mode_averages_the_raw_scores_resized_with_align_corners():
    """--mst-mode tutorial against the tutorial's predict written out here: each scale through F.interpolate's
    scale_factor with align_corners=True, and its flip, through the net; the raw scores resized back with
    align_corners=True and summed. Sides that do not scale to whole numbers (50x70 at 0.75 and 1.25) check the
    rounding down. The softmax mode, on the same passes, gives other scores."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()    # 1x1: padding adds nothing
    image = torch.randn(1, 3, 50, 70)
    scales = (0.5, 0.75, 1.25, 2.2)
    scores = predict_scores(net, image, scales=scales, flip=True, mode='tutorial')
    expected = 0
    with torch.no_grad():
        for s in scales:
            x = F.interpolate(image, scale_factor=s, mode='bilinear', align_corners=True)
            for flip in (False, True):
                out = net(x.flip(-1) if flip else x)
                out = F.interpolate(out.flip(-1) if flip else out, size=(50, 70), mode='bilinear', align_corners=True)
                expected = expected + out
    torch.testing.assert_close(scores * 2 * len(scales), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(scores.sum(1), torch.ones(1, 50, 70), atol=1e-2)      # scores, not probabilities
    softmax = predict_scores(net, image, scales=scales, flip=True)
    assert (softmax - scores.softmax(1)).abs().max() > 1e-3


def test_multiscale_low_resolution_output():
    # an output stride-8 net that does not upsample: the crop must scale with the output resolution
    net = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 2, 1)).eval()
    image = torch.randn(1, 3, 40, 72)
    probs = predict_scores(net, image, scales=(1.0, 0.75), flip=True)
    assert probs.shape == (1, 2, 40, 72)
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 72), atol=1e-5)


# ----------------------------------------------------------------------------- models and losses by name (the flags)

@pytest.mark.parametrize("norm", ["batch", "instance", "group", "evo", "evo_b0"])
def test_build_resnet_unet_with_norm_trains(norm):
    torch.manual_seed(0)
    net = some_define.build_model("resnet_unet", num_classes=21, norm=norm)
    expected = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d, "group": nn.GroupNorm,
                "evo": EvoNorm2dS0, "evo_b0": EvoNorm2dB0}[norm]
    assert isinstance(net.layer0[1], expected)          # the stem's bn1, reached through the U-Net's Sequential
    if norm != "batch":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    net.train()
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert out.shape == (2, 21, 64, 64) and torch.isfinite(out).all()
    target = torch.randint(21, (2, 64, 64))
    target[:, :4] = IGNORE_INDEX
    some_define.cross_entropy_loss(out, target).sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert net.conv_last.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(x[:1])).all()


def test_build_model_rejects_unknown_names():
    """Norm names are checked by the flags (test_reliability::test_12); a model name may also come from a
    checkpoint written elsewhere."""
    with pytest.raises(some_define.UserError):
        some_define.build_model("vgg16")


@pytest.mark.parametrize("aux_loss", [False, True])
def test_build_deeplabv3_resnet50_forward(aux_loss):
    torch.manual_seed(0)
    net = some_define.build_model("deeplabv3_resnet50", num_classes=21, aux_loss=aux_loss).eval()
    with torch.inference_mode():
        out = net(torch.randn(1, 3, 64, 64))
    assert isinstance(out, dict) and out["out"].shape == (1, 21, 64, 64)
    assert torch.isfinite(out["out"]).all()
    main, aux = some_define.model_output(out)
    assert main is out["out"]
    if aux_loss:
        assert out["aux"].shape == (1, 21, 64, 64) and aux is out["aux"]
    else:
        assert "aux" not in out and aux is None


class TwoHeads(nn.Module):
    """torchvision's segmentation output: {'out': main scores, 'aux': auxiliary scores}."""

    def __init__(self, classes=5):
        super().__init__()
        self.main, self.aux = nn.Conv2d(3, classes, 3, padding=1), nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return {'out': self.main(x), 'aux': self.aux(x)}


def test_the_training_step_adds_the_auxiliary_loss_at_weight_0_4():
    """--aux-loss: the step back-propagates sum(main loss + 0.4 * auxiliary loss) over the batch (torchvision's
    reference weighting), so the auxiliary head trains; the reported loss is that sum, the accuracy the main head's."""
    torch.manual_seed(0)
    net = TwoHeads()
    X = torch.randn(3, 3, 8, 10)
    _, y = _seg_batch(n=3, c=5, h=8, w=10, seed=5)
    trainer = torch.optim.SGD(net.parameters(), lr=0.1)
    l_sum, correct = some_define.train_batch_ch13(net, X, y, some_define.cross_entropy_loss, trainer, step=False)
    ref = TwoHeads()
    ref.load_state_dict(net.state_dict())
    out = ref(X)
    expected = (F.cross_entropy(out['out'], y, reduction='none', ignore_index=IGNORE_INDEX).mean((1, 2))
                + 0.4 * F.cross_entropy(out['aux'], y, reduction='none', ignore_index=IGNORE_INDEX).mean((1, 2))).sum()
    expected.backward()
    torch.testing.assert_close(l_sum, expected.detach())
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    valid = y != IGNORE_INDEX
    assert int(correct) == int(((out['out'].argmax(1) == y) & valid).sum())


def test_make_loss_focal_gamma0_and_weighted_ones_equal_ce():
    logits, target = _seg_batch(n=3, c=21, h=9, w=11, seed=4)
    ce = some_define.make_loss("ce")(logits, target)
    assert ce.shape == (3,)  # one value per example, as the book's loss
    focal0 = some_define.make_loss("focal", gamma=0.0)(logits, target)
    weighted = some_define.make_loss("weighted_ce", weight=torch.ones(21))(logits, target)
    assert focal0.shape == weighted.shape == (3,)
    assert torch.allclose(focal0, ce, atol=1e-6)
    assert torch.allclose(weighted, ce, atol=1e-6)
    # the same class weights give the same loss through both routes at gamma 0, and focal (gamma 2) is smaller
    w = torch.rand(21) + 0.5
    assert torch.allclose(some_define.make_loss("focal", weight=w, gamma=0.0)(logits, target),
                          some_define.make_loss("weighted_ce", weight=w)(logits, target), atol=1e-6)
    assert (some_define.make_loss("focal", gamma=2.0)(logits, target) < ce).all()
    with pytest.raises(some_define.UserError):
        some_define.make_loss("weighted_ce")


def test_fcn_training_crop_not_a_multiple_of_32(tmp_path):
    """The book's FCN only gives the input's size for multiples of 32: a --crop-size that is not ends, before any
    data is read or checkpoint written, in one clear line naming --crop-size and the book's 320 480, never in a
    size-mismatch traceback from the loss. The U-Net pads inside: the same crop trains with my_train.py."""
    from test_reliability import MY_TRAIN, ORIGIN_TRAIN, one_error_line, run_inprocess
    voc = some_define.make_demo_voc(tmp_path / 'VOC2012', num_train=8, num_val=4, num_small=0)
    args = ['--data-dir', voc, '--epochs', '1', '--batch-size', '4', '--crop-size', '48', '80', '--no-pretrained',
            '--workers', '0', '--save', tmp_path / 'ckpt.pt']
    for script, extra in ((ORIGIN_TRAIN, []), (MY_TRAIN, ['--model', 'fcn', '--finetune-epochs', '0'])):
        line = one_error_line(run_inprocess(script, args + extra, tmp_path), '--crop-size 48 80', 'multiples of 32')
        assert '320 480' in line
        assert not (tmp_path / 'ckpt.pt').exists()
    res = run_inprocess(MY_TRAIN, args + ['--finetune-epochs', '0'], tmp_path)     # the U-Net
    assert res.code == 0, res.err + res.out
    assert some_define.load_torch_file(tmp_path / 'ckpt.pt')['config']['crop_size'] == [48, 80]


def test_infer_test_size_runs_the_net_resized_and_returns_scores_at_the_input_size():
    """--test-size (the tutorial's Cityscapes evaluation): the net sees the resized image, scores come back at the
    label's size."""
    torch.manual_seed(0)
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return self.conv(x)

    net, x = Probe().eval(), torch.randn(1, 3, 40, 70)
    with torch.inference_mode():
        out = some_define.predict_scores(net, x, test_size=(64, 96))
        small = net.conv(F.interpolate(x, size=(64, 96), mode='bilinear', align_corners=False))
    assert seen == [(64, 96)]
    assert out.shape == (1, 4, 40, 70)
    assert torch.allclose(out, F.interpolate(small, size=(40, 70), mode='bilinear', align_corners=False), atol=1e-6)
