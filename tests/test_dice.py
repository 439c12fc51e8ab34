"""--loss dice and --loss ce+dice: the multiclass soft Dice loss checked against segmentation_models_pytorch's DiceLoss
(mode='multiclass', from_logits=True, ignore_index=255) on the same tensors, values and gradients, unweighted and with
class weights; void (255) pixels drop out of both sums; fp32 under autocast; the per-example form the training step
sums; and my_train.py training with it on the demo data (a few steps), weighted too. CPU only."""
import pytest
import segmentation_models_pytorch.losses as smp_losses     # a test requirement (tests/requirements.txt)
import torch
from torch.nn import functional as F

import some_define as sd
from test_flags import FAST, MY_FCN, record_batches, run_ok
from test_reliability import MY_TRAIN


def smp_dice(logits, target, weight=None):
    """smp's DiceLoss; weighted: sum(w_c loss_c) / sum(w_c) from its per-class losses (classes=[c]), which every
    version since 0.3 has (class_weights itself came later)."""
    if weight is None:
        return smp_losses.DiceLoss('multiclass', from_logits=True, ignore_index=255)(logits, target)
    per_class = torch.stack([smp_losses.DiceLoss('multiclass', classes=[c], from_logits=True, ignore_index=255)(
        logits, target) for c in range(logits.shape[1])])
    weight = torch.as_tensor(weight, dtype=per_class.dtype)
    return (per_class * weight).sum() / weight.sum()


def tensors(seed=0, n=4, classes=6, size=(9, 11)):
    """Logits and a target with void rows, void dots, and one class that no labelled pixel has."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, classes, *size, generator=g) * 3).requires_grad_()
    target = torch.randint(0, classes, (n, *size), generator=g)
    target[target == classes - 1] = 2           # the last class is absent
    target[:, 0] = 255
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    return logits, target


@pytest.mark.parametrize('weighted', [False, True])
def test_dice_is_smps_dice_loss_on_the_same_tensors(weighted):
    logits, target = tensors()
    weight = torch.linspace(0.5, 2.0, 6) if weighted else None
    ours, theirs = sd.dice_loss(logits, target, weight), smp_dice(logits, target, weight)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    grad_ours, = torch.autograd.grad(ours, logits)
    grad_theirs, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-8)
    assert (sd.dice_loss(logits, target) - sd.dice_loss(logits, target, torch.ones(6))).abs() < 1e-7
    if weighted:        # the weights change it
        assert (ours - sd.dice_loss(logits, target)).abs() > 1e-3


def test_void_pixels_are_in_neither_sum():
    """Whatever the logits at void pixels, the loss and the other pixels' gradients stay; a labelled pixel counts."""
    logits, target = tensors(1)
    void = target == 255
    before = sd.dice_loss(logits, target)
    other = logits.detach() + 10 * torch.randn(logits.shape) * void.unsqueeze(1)
    torch.testing.assert_close(sd.dice_loss(other, target), before.detach())
    grad, = torch.autograd.grad(before, logits)
    assert grad.permute(1, 0, 2, 3)[:, void].abs().max() == 0
    relabelled = target.clone()
    relabelled[0, 0, 0] = 1
    assert (sd.dice_loss(logits, relabelled) - before).abs() > 1e-6


def test_dice_of_a_perfect_prediction_and_of_an_all_void_batch():
    target = torch.tensor([[[0, 1], [2, 255]]])
    logits = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert sd.dice_loss(logits, target) < 1e-6
    assert sd.dice_loss(logits, torch.full_like(target, 255)) == 0       # nothing labelled: nothing to learn


def test_fp32_under_autocast():
    logits, target = tensors(2)
    with torch.autocast('cpu', torch.bfloat16):
        low = logits.bfloat16()
        loss = sd.dice_loss(low, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, smp_dice(low.float(), target), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('weighted', [False, True])
def test_the_per_example_forms_the_training_step_sums(weighted):
    """dice: the batch's Dice for each example (the step's sum is N x Dice); ce+dice: the book's per-example cross
    entropy plus it, both weighted with weights."""
    logits, target = tensors(3)
    weight = torch.linspace(2.0, 0.5, 6) if weighted else None
    dice = smp_dice(logits, target, weight)
    per_example = sd.make_loss('dice', weight)(logits, target)
    assert per_example.shape == (4,)
    torch.testing.assert_close(per_example, dice.expand(4))
    ce = F.cross_entropy(logits, target, weight=weight, reduction='none', ignore_index=255).mean((1, 2))
    torch.testing.assert_close(sd.make_loss('ce+dice', weight)(logits, target), ce + dice)


def test_my_train_trains_with_dice(demo_voc, tmp_path, monkeypatch):
    """--loss dice: every step calls smp's Dice loss, and the reported loss per example is a Dice loss (0..1)."""
    _, stepped = record_batches(monkeypatch)
    run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--loss', 'dice', '--save', 'ck.pt'] + MY_FCN + FAST, tmp_path)
    losses = {id(loss): loss for _, _, loss in stepped}
    assert len(stepped) == 3 and len(losses) == 1
    logits, target = tensors(4, n=2, classes=21)
    torch.testing.assert_close(next(iter(losses.values()))(logits, target), smp_dice(logits, target).expand(2))
    history = sd.load_torch_file(tmp_path / 'ck.pt')['history']
    assert 0 < history[-1]['loss'] <= 1


def test_my_train_trains_with_weighted_ce_plus_dice(demo_voc, tmp_path, monkeypatch):
    """--loss ce+dice --class-weights FILE: the loss that trains is weighted cross entropy plus weighted Dice."""
    weights = [0.5 + 0.1 * k for k in range(21)]
    (tmp_path / 'weights.txt').write_text('\n'.join(map(str, weights)))
    _, stepped = record_batches(monkeypatch)
    run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--loss', 'ce+dice', '--class-weights', 'weights.txt', '--save',
                      'ck.pt'] + MY_FCN + FAST, tmp_path)
    loss = stepped[0][2]
    logits, target = tensors(5, n=2, classes=21)
    w = torch.tensor(weights)
    ce = F.cross_entropy(logits, target, weight=w, reduction='none', ignore_index=255).mean((1, 2))
    torch.testing.assert_close(loss(logits, target), ce + smp_dice(logits, target, w))
