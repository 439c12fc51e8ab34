"""The flags reach the mechanisms: what a script's flag promises is checked where it acts, not in the saved config.

The scripts run in this process (run_inprocess: the same run_main, sys.argv and working folder as `python script`),
with the building blocks they call wrapped to record what they receive: the batch that reaches the loss (CutMix and
CopyBlob change it), the loss that trains (focal's class weights and gamma), the weights each training stage starts
from (the fine-tune continues stage 1), the sizes and scales the net sees in prediction (--test-size, --mst
--scales), the columns of compare.png. Independent computations stand beside them: focal loss written out, pixel
counts read with PIL, predictions of checkpoints loaded here. CPU only, tiny data (12 + 6 demo images, 32x64 crops).
"""
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import some_define as sd
from test_reliability import MY_PREDICT, MY_TRAIN, ORIGIN_PREDICT, ORIGIN_TRAIN, run_inprocess

FAST = ['--epochs', '1', '--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']
MY_FCN = ['--model', 'fcn', '--finetune-epochs', '0']       # my_train.py's flags on the quick model


def run_ok(script, args, cwd):
    res = run_inprocess(script, args, cwd)
    assert res.code == 0, f'{script.name} {" ".join(map(str, args))}\n{res.err}\n{res.out[-3000:]}'
    return res


def record(monkeypatch, name, module=sd):
    """Wraps module.<name>: the arguments of each call, by parameter name, are appended to the list returned."""
    real, calls = getattr(module, name), []
    signature = inspect.signature(real)

    def recorded(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, recorded)
    return calls


class Recorded:
    """The loader's batches as train_epoch iterates them, copied on the way (len kept)."""

    def __init__(self, batches, into):
        self.batches, self.into = batches, into

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for X, y in self.batches:
            self.into.append((X.clone(), y.clone()))
            yield X, y


def record_batches(monkeypatch):
    """(batches as the loader gives them, batches as the training step receives them, with the loss it calls)."""
    loaded, stepped = [], []
    epoch, step = sd.train_epoch, sd.train_batch_ch13
    epoch_sig, step_sig = inspect.signature(epoch), inspect.signature(step)

    def recorded_epoch(*args, **kwargs):
        bound = epoch_sig.bind(*args, **kwargs)
        bound.arguments['batches'] = Recorded(bound.arguments['batches'], loaded)
        return epoch(*bound.args, **bound.kwargs)

    def recorded_step(*args, **kwargs):
        bound = step_sig.bind(*args, **kwargs)
        stepped.append((bound.arguments['X'].clone(), bound.arguments['y'].clone(), bound.arguments['loss']))
        return step(*args, **kwargs)
    monkeypatch.setattr(sd, 'train_epoch', recorded_epoch)
    monkeypatch.setattr(sd, 'train_batch_ch13', recorded_step)
    return loaded, stepped


@pytest.fixture(scope='module')
def fcn(demo_voc, tmp_path_factory):
    """origin_train.py, one epoch: work/checkpoints/origin.pt."""
    work = tmp_path_factory.mktemp('fcn')
    run_ok(ORIGIN_TRAIN, ['--data-dir', demo_voc] + FAST, work)
    return work / 'checkpoints' / 'origin.pt'


@pytest.fixture(scope='module')
def finetuned(demo_voc, tmp_path_factory):
    """my_train.py --model fcn, 1 epoch + a 1-epoch fine-tune (lr 1e-3 then 1e-4), with each stage's call of
    train_ch13 recorded: the model's weights, the optimizer and the checkpoint it starts with."""
    work, starts = tmp_path_factory.mktemp('finetuned'), []
    train = sd.train_ch13
    signature = inspect.signature(train)

    def recorded(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        starts.append(dict(weights={k: v.clone() for k, v in sd.unwrapped(a['net']).state_dict().items()},
                           trainer=a['trainer'], lr=a['trainer'].param_groups[0]['lr'],
                           state=len(a['trainer'].state), path=Path(a['checkpoint'].path)))
        return train(*args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sd, 'train_ch13', recorded)
        res = run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--model', 'fcn', '--lr', '1e-3', '--finetune-epochs', '1',
                                '--finetune-lr', '1e-4'] + FAST, work)
    return work, starts, res


def val_labels(voc_dir):
    """The val split's labels as PIL reads them (palette indices)."""
    ids = (voc_dir / 'ImageSets' / 'Segmentation' / 'val.txt').read_text().split()
    return [np.array(Image.open(voc_dir / 'SegmentationClass' / f'{name}.png')) for name in ids]


# -------------------------------------------------------------------------------------------- CutMix, CopyBlob
def test_cutmix_changes_the_batch_that_reaches_the_loss(demo_voc, tmp_path, monkeypatch):
    """my_train.py --cutmix 1: each sample of the batch the step receives is the loader's sample with one box, image
    and label alike, from one other sample of the same batch."""
    loaded, stepped = record_batches(monkeypatch)
    run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--cutmix', '1', '--save', 'ck.pt'] + MY_FCN + FAST, tmp_path)
    assert len(stepped) == 3 and len(loaded) >= 3
    mixed = 0
    for (Xl, yl), (Xs, ys, _) in zip(loaded, stepped):
        for i in range(len(Xl)):
            own = (Xs[i] == Xl[i]).all(0) & (ys[i] == yl[i])
            if own.all():
                continue
            pasted, partners = ~own, []
            for j in range(len(Xl)):
                partner = (Xs[i] == Xl[j]).all(0) & (ys[i] == yl[j])
                if j != i and partner[pasted].all():
                    rows, cols = pasted.nonzero(as_tuple=True)
                    partners.append(bool(partner[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()))
            assert any(partners), f'sample {i}: the changed pixels are no box of another sample'
            mixed += 1
    assert mixed >= 4, f'only {mixed} of 12 samples were mixed'


def test_copyblob_changes_the_batch_that_reaches_the_loss(demo_voc, tmp_path, monkeypatch):
    """my_train.py --copyblob 1 with each demo class onto background: the step receives more object pixels than the
    loader gave, and every changed pixel holds an object class and a colour that another sample of the batch has at
    a pixel of that class (a pasted blob, image and label together)."""
    loaded, stepped = record_batches(monkeypatch)
    pairs = ['aeroplane:background', 'bird:background', 'car:background', 'cat:background', 'person:background']
    run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--copyblob', '1', '--copyblob-pairs', *pairs, '--save', 'ck.pt']
           + MY_FCN + FAST, tmp_path)
    assert len(stepped) == 3
    changed_pixels = 0
    for (Xl, yl), (Xs, ys, _) in zip(loaded, stepped):
        for i in range(len(Xl)):
            changed = (Xs[i] != Xl[i]).any(0) | (ys[i] != yl[i])
            if not changed.any():
                continue
            changed_pixels += int(changed.sum())
            assert set(ys[i][changed].tolist()) <= {1, 3, 7, 8, 15}
            donors = {(int(c),) + tuple(v.tolist()) for j in range(len(Xl)) if j != i
                      for c, v in zip(yl[j].flatten(), Xl[j].flatten(1).T) if c in (1, 3, 7, 8, 15)}
            for c, v in zip(ys[i][changed], Xs[i][:, changed].T):
                assert (int(c),) + tuple(v.tolist()) in donors, 'a changed pixel comes from no blob of the batch'
    assert changed_pixels > 0, 'CopyBlob pasted nothing'
    objects = sum(int(((y > 0) & (y < 255)).sum()) for _, y in loaded[:3])
    assert sum(int(((y > 0) & (y < 255)).sum()) for _, y, _ in stepped) > objects


# ------------------------------------------------------------------------------------------------------ losses
def focal_written_out(logits, target, weight, gamma):
    """-w[y] (1 - p_y)^gamma log p_y per pixel, 0 where void, averaged over H and W: one value per example."""
    logp = logits.double().log_softmax(1)
    valid = target != 255
    t = torch.where(valid, target, 0)
    logp_y = logp.gather(1, t[:, None])[:, 0]
    loss = -torch.as_tensor(weight, dtype=torch.float64)[t] * (1 - logp_y.exp()) ** gamma * logp_y
    return torch.where(valid, loss, 0).mean((1, 2))


def test_focal_with_class_weights_is_the_loss_that_trains(demo_voc, tmp_path, monkeypatch):
    """--loss focal --class-weights FILE --focal-gamma 1.5: the loss every training step calls is focal loss with
    exactly those weights and that gamma."""
    weights = [0.5 + 0.1 * k for k in range(21)]
    (tmp_path / 'weights.txt').write_text('\n'.join(map(str, weights)))
    _, stepped = record_batches(monkeypatch)
    run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--loss', 'focal', '--class-weights', 'weights.txt', '--focal-gamma',
                      '1.5', '--save', 'ck.pt'] + MY_FCN + FAST, tmp_path)
    losses = {id(loss): loss for _, _, loss in stepped}
    assert len(stepped) == 3 and len(losses) == 1
    loss = next(iter(losses.values()))
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 21, 6, 7, generator=g) * 3, torch.randint(21, (2, 6, 7), generator=g)
    target[:, 0] = 255
    expected = focal_written_out(logits, target, weights, 1.5)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-7)
    assert (expected - focal_written_out(logits, target, [1.0] * 21, 1.5)).abs().max() > 1e-3    # weights matter
    assert (expected - focal_written_out(logits, target, weights, 0.0)).abs().max() > 1e-3        # and gamma


def test_weighted_ce_from_pixel_counts(demo_voc, tmp_path, monkeypatch):
    """--loss weighted_ce (weights from the training labels' pixel counts, ENet's 1/ln(1.02 + share), mean 1 over
    the classes seen, unseen classes the largest): counted here with PIL, the loss written out."""
    _, stepped = record_batches(monkeypatch)
    res = run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--loss', 'weighted_ce', '--save', 'ck.pt'] + MY_FCN + FAST,
                 tmp_path)
    assert 'share' in res.out       # the table of counts and weights
    ids = (demo_voc / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()
    counts = np.zeros(21)
    for name in ids:
        label = np.array(Image.open(demo_voc / 'SegmentationClass' / f'{name}.png'))
        counts += np.bincount(label[label != 255], minlength=21)[:21]
    seen = counts > 0
    w = 1 / np.log(1.02 + counts / counts.sum())
    w = w / w[seen].mean()
    w[~seen] = w[seen].max()
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 21, 6, 7, generator=g), torch.randint(21, (2, 6, 7), generator=g)
    expected = F.cross_entropy(logits.double(), target, weight=torch.tensor(w), reduction='none').mean((1, 2))
    torch.testing.assert_close(stepped[0][2](logits, target).double(), expected, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------- my_train.py's stages
def test_the_fine_tune_starts_from_stage_1s_weights(finetuned):
    """Stage 2 starts from the weights stage 1 saved (not from fresh ones), with a fresh optimizer at --finetune-lr,
    into its own checkpoint whose curves continue stage 1's."""
    work, starts, res = finetuned
    assert [s['path'].name for s in starts] == ['my.pt', 'my_finetune.pt']
    first = sd.load_torch_file(work / 'checkpoints' / 'my.pt')
    second = sd.load_torch_file(work / 'checkpoints' / 'my_finetune.pt')
    moved = [k for k, v in starts[0]['weights'].items() if not torch.equal(v, first['model'][k])]
    assert moved, 'stage 1 did not change the weights: the comparison below would prove nothing'
    differ = [k for k, v in starts[1]['weights'].items() if not torch.equal(v, first['model'][k])]
    assert not differ, f'the fine-tune did not start from stage 1\'s weights: {differ[:4]}'
    assert (starts[0]['lr'], starts[1]['lr']) == (1e-3, 1e-4)
    assert starts[1]['trainer'] is not starts[0]['trainer'] and starts[1]['state'] == 0
    assert second['config']['stage'] == 'finetune' and second['epoch'] == 1 and len(second['history']) == 1
    assert second['config']['finetune_lr'] == 1e-4 and second['history'][0]['lr'] == 1e-4
    assert res.out.count('epoch 1/1:') == 2


def test_a_restart_keeps_the_old_checkpoint_as_prev(demo_voc, tmp_path):
    """Training again to the same --save without --resume keeps the old file, byte for byte, as *.prev.pt; --resume
    continues the new one and leaves *.prev.pt alone."""
    args = ['--data-dir', demo_voc, '--save', 'ck.pt'] + FAST
    run_ok(ORIGIN_TRAIN, args, tmp_path)
    old = (tmp_path / 'ck.pt').read_bytes()
    res = run_ok(ORIGIN_TRAIN, args + ['--seed', '1'], tmp_path)
    assert 'kept as' in res.out and 'ck.prev.pt' in res.out
    assert (tmp_path / 'ck.prev.pt').read_bytes() == old
    assert sd.load_torch_file(tmp_path / 'ck.pt')['config']['seed'] == 1
    run_ok(ORIGIN_TRAIN, args + ['--seed', '1', '--epochs', '2', '--resume'], tmp_path)
    assert (tmp_path / 'ck.prev.pt').read_bytes() == old
    assert sd.load_torch_file(tmp_path / 'ck.pt')['epoch'] == 2


def test_a_compiled_run_saves_a_checkpoint_that_loads_without_compile(demo_voc, tmp_path, monkeypatch):
    """--compile trains the compiled net but saves the model's own state_dict: the predict scripts (which never
    compile) load it. torch.compile runs with the 'eager' backend here (the same wrapper, no C++ build)."""
    compiled, compile = [], torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return compile(model, backend='eager')
    monkeypatch.setattr(torch, 'compile', eager_compile)
    run_ok(MY_TRAIN, ['--data-dir', demo_voc, '--compile', '--save', 'ck.pt'] + MY_FCN + FAST, tmp_path)
    assert len(compiled) == 1
    ckpt = sd.load_torch_file(tmp_path / 'ck.pt')
    assert set(ckpt['model']) == set(sd.build_model('fcn').state_dict())
    run_ok(ORIGIN_PREDICT, ['--checkpoint', 'ck.pt', '--eval', '--workers', '0'], tmp_path)
    assert json.loads(sd.results_path(tmp_path / 'ck.pt', '.json').read_text())['images'] == 6


def test_sync_bn_turns_batch_norm_into_sync_batch_norm_under_torchrun_on_gpus(demo_voc, tmp_path, monkeypatch):
    """--sync-bn reaches place_model, which converts every BatchNorm2d to SyncBatchNorm when several processes run on
    GPUs (faked here: two processes, a CUDA device, DDP and the move to the device stubbed), and leaves the model
    alone in one process or on the CPU, where SyncBatchNorm cannot run."""
    calls = record(monkeypatch, 'place_model')
    run_ok(ORIGIN_TRAIN, ['--data-dir', demo_voc, '--sync-bn', '--save', 'ck.pt'] + FAST, tmp_path)
    assert len(calls) == 1 and calls[0]['sync_bn'] is True
    monkeypatch.setattr(sd, 'world_size', lambda: 2)
    monkeypatch.setattr(nn.parallel, 'DistributedDataParallel', lambda model, device_ids=None: model)
    for device, sync, expected in (('cuda', True, True), ('cuda', False, False), ('cpu', True, False)):
        model = sd.build_model('fcn', num_classes=21)
        model.to = lambda *args, **kwargs: model        # no GPU here: the move is what cannot be faked
        sd.place_model(model, torch.device(device), sync_bn=sync)
        kinds = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        assert kinds == ({nn.SyncBatchNorm} if expected else {nn.BatchNorm2d}), (device, sync, kinds)


# ----------------------------------------------------------------------------------------------------- void
def test_void_as_background_trains_and_evaluates_on_void_pixels(demo_voc, fcn, tmp_path, monkeypatch):
    """--void-as-background: the training batches hold no 255 (void is background), and the predict script, given
    no flag, takes it from the checkpoint: its figures count every pixel of the val images. Without it (the fcn
    fixture) they count the labelled pixels only."""
    _, stepped = record_batches(monkeypatch)
    run_ok(ORIGIN_TRAIN, ['--data-dir', demo_voc, '--void-as-background', '--save', 'void.pt'] + FAST, tmp_path)
    assert stepped and not any((y == 255).any() for _, y, _ in stepped)
    assert sd.load_torch_file(tmp_path / 'void.pt')['config']['void_as_background'] is True
    labels = val_labels(demo_voc)
    assert sum(int((label == 255).sum()) for label in labels) > 0
    run_ok(ORIGIN_PREDICT, ['--checkpoint', 'void.pt', '--eval', '--workers', '0'], tmp_path)
    void = json.loads(sd.results_path(tmp_path / 'void.pt', '.json').read_text())
    assert void['pixels'] == sum(label.size for label in labels)
    run_ok(ORIGIN_PREDICT, ['--checkpoint', fcn, '--eval', '--workers', '0'], tmp_path)
    plain = json.loads(sd.results_path(fcn, '.json').read_text())
    assert plain['pixels'] == sum(int((label != 255).sum()) for label in labels)


# ---------------------------------------------------------------------------------------------- prediction
def mst_table_values(out, label):
    """The numbers of one row of the printed table (`mIoU     0.1234    0.2345`)."""
    line = next(line for line in out.splitlines() if line.startswith(label + ' '))
    return [float(v) for v in re.findall(r'\d+\.\d{4}', line)]


def test_mst_and_scales_through_the_script_beside_single_scale(fcn, tmp_path, monkeypatch):
    """origin_predict.py --eval, then --eval --mst --scales 0.5 1.0: the second run predicts with those scales (and
    only those), writes *_results_mst.json, and prints the single- and multi-scale figures side by side; its scores
    are the multi-scale ones, not the single-scale ones again."""
    calls = record(monkeypatch, 'predict_scores')
    run_ok(ORIGIN_PREDICT, ['--checkpoint', fcn, '--eval', '--workers', '0', '--picture', 'single.png'], tmp_path)
    assert calls and all(not c['scales'] for c in calls)
    calls.clear()
    res = run_ok(ORIGIN_PREDICT, ['--checkpoint', fcn, '--eval', '--mst', '--scales', '0.5', '1.0', '--workers', '0',
                                  '--picture', 'mst.png'], tmp_path)
    assert calls and all(tuple(c['scales']) == (0.5, 1.0) for c in calls if c['scales'])
    assert sum(len(c['X']) for c in calls if c['scales']) == 6      # each val image once (the picture: one scale)
    single = json.loads(sd.results_path(fcn, '.json').read_text())
    mst = json.loads(sd.results_path(fcn, '.json', mst=True).read_text())
    assert mst['mst'] is True and mst['scales'] == [0.5, 1.0] and mst['pixels'] == single['pixels']
    assert re.search(r'IoU single\s+acc single\s+IoU mst\s+acc mst', res.out), res.out
    assert mst_table_values(res.out, 'mIoU') == [round(single['miou'], 4), round(mst['miou'], 4)]
    assert mst_table_values(res.out, 'pixel acc') == [round(single['pixel_acc'], 4), round(mst['pixel_acc'], 4)]
    assert all(c['mode'] == 'softmax' for c in calls) and mst['mst_mode'] == 'softmax'
    calls.clear()       # --mst-mode tutorial reaches the multi-scale passes and is recorded with the figures
    run_ok(ORIGIN_PREDICT, ['--checkpoint', fcn, '--eval', '--mst', '--mst-mode', 'tutorial', '--scales', '0.5',
                            '1.0', '--workers', '0', '--picture', 'mst.png'], tmp_path)
    assert calls and all(c['mode'] == 'tutorial' for c in calls if c['scales'])
    assert json.loads(sd.results_path(fcn, '.json', mst=True).read_text())['mst_mode'] == 'tutorial'


def test_test_size_through_the_script(fcn, tmp_path, monkeypatch):
    """--test-size 64 96: the net sees every val image at 64x96, and the figures are still over every labelled pixel
    at the original size."""
    calls = record(monkeypatch, 'run_padded')
    run_ok(ORIGIN_PREDICT, ['--checkpoint', fcn, '--eval', '--test-size', '64', '96', '--workers', '0', '--picture',
                            'p.png', '--num-images', '1'], tmp_path)
    sizes = [tuple(c['x'].shape[-2:]) for c in calls]
    labels = val_labels(Path(sd.load_torch_file(fcn)['config']['data_dir']))
    assert sum(len(c['x']) for c in calls if tuple(c['x'].shape[-2:]) == (64, 96)) == len(labels) == 6
    assert set(sizes) == {(64, 96), (32, 64)}, sizes            # (32, 64): the picture's crop, as trained
    assert {label.shape for label in labels} != {(64, 96)}
    result = json.loads(sd.results_path(fcn, '.json').read_text())
    assert result['pixels'] == sum(int((label != 255).sum()) for label in labels)


def test_write_split_segments_every_val_image(fcn, tmp_path):
    """my_predict.py --write-split: every val image -> colour, overlay and class-id PNGs at its size, the ids those
    of the checkpoint's net."""
    run_ok(MY_PREDICT, ['--checkpoint', fcn, '--write-split', '--out-dir', 'split', '--picture', 'p.png'], tmp_path)
    voc = Path(sd.load_torch_file(fcn)['config']['data_dir'])
    ids = (voc / 'ImageSets' / 'Segmentation' / 'val.txt').read_text().split()
    assert sorted(p.name for p in (tmp_path / 'split').iterdir()) == sorted(
        f'{name}_{kind}.png' for name in ids for kind in ('color', 'overlay', 'labels'))
    net, _ = sd.load_model(fcn, torch.device('cpu'))
    for name in ids[:2]:
        image = sd.read_image(voc / 'JPEGImages' / f'{name}.jpg')
        with Image.open(tmp_path / 'split' / f'{name}_labels.png') as png:
            assert png.size == (image.shape[2], image.shape[1])
            assert torch.equal(torch.from_numpy(np.array(png)).long(), sd.predict(net, image))


def test_compare_columns_and_a_checkpoint_of_other_classes_left_out(fcn, finetuned, tmp_path, monkeypatch):
    """my_predict.py --compare A B C: compare.png has the image, the ground truth, then one column per checkpoint
    that predicts the same classes (each its own net's prediction of the row's image), titled with its name; C,
    trained on other classes, is left out with a line saying so. my_out.png's prediction row is the main net's."""
    work = finetuned[0]
    mine = work / 'checkpoints' / 'my.pt'
    other = dict(sd.load_torch_file(fcn))
    other.update(model=sd.build_model('fcn', num_classes=6).state_dict(), num_classes=6,
                 model_args=dict(other['model_args'], num_classes=6), classes=sd.DEMO_FOLDER_CLASSES._asdict())
    sd.save_checkpoint(other, tmp_path / 'other.pt')
    grids = record(monkeypatch, 'save_image_grid')
    res = run_ok(MY_PREDICT, ['--checkpoint', mine, '--compare', fcn, mine, tmp_path / 'other.pt', '--picture',
                              tmp_path / 'out.png'], tmp_path)
    assert f'{tmp_path / "other.pt"} is left out of the comparison' in res.out
    by_name = {Path(g['path']).name: g for g in grids}
    assert set(by_name) == {'out.png', 'compare.png'}
    compare, out = by_name['compare.png'], by_name['out.png']
    titles = compare['col_titles']
    assert titles[:2] == ['image', 'ground truth'] and len(titles) == 4
    assert titles[2].startswith('origin.pt\n') and titles[3].startswith('my.pt\n')
    nets = [sd.load_model(p, torch.device('cpu'))[0] for p in (fcn, mine)]
    assert len(compare['rows']) == 4
    for r, row in enumerate(compare['rows']):
        image = torch.as_tensor(np.asarray(row[0])).permute(2, 0, 1)
        assert len(row) == 4 and torch.equal(torch.as_tensor(np.asarray(out['rows'][0][r])), row[0])
        for net, column in zip(nets, row[2:]):
            assert torch.equal(torch.as_tensor(np.asarray(column)), sd.label2image(sd.predict(net, image)))
        assert torch.equal(torch.as_tensor(np.asarray(out['rows'][1][r])), row[3])      # the main net: my.pt
    assert out['row_titles'] == ['image', 'prediction', 'ground truth']


def test_compare_of_only_other_classes_falls_back_to_the_checkpoint(fcn, tmp_path):
    """Every --compare checkpoint of other classes: compare.png still shows the main checkpoint."""
    other = dict(sd.load_torch_file(fcn))
    other.update(model=sd.build_model('fcn', num_classes=6).state_dict(), num_classes=6,
                 model_args=dict(other['model_args'], num_classes=6), classes=sd.DEMO_FOLDER_CLASSES._asdict())
    sd.save_checkpoint(other, tmp_path / 'other.pt')
    res = run_inprocess(MY_PREDICT, ['--checkpoint', fcn, '--compare', 'other.pt', '--picture', 'p.png'], tmp_path)
    assert res.code == 0 and 'left out' in res.out and (tmp_path / 'compare.png').exists(), res.err + res.out
