"""Guards a user relies on without seeing them, each checked where it acts: a checkpoint on disk before it replaces
the last one, a resume with other model flags refused, an fp16 run's GradScaler restored, my_train.py's resume
through both stages, a mask value one past the classes named, my_predict.py's --test-size and --mst on photos, the
cached class counts keyed by what changes them, a batch that torchrun's processes cannot share refused, and --seed
behind every draw (batch order, crops, dropout, CutMix/CopyBlob).

Mostly direct calls of the mechanisms (training loops with a stub epoch, Checkpoint on its own, check_pair on a
tensor); the scripts run in this process (run_inprocess) where the flag's path through a script is the point. CPU
only, tiny data (12 + 6 demo images, 32x64 crops). tests/mutations.py breaks each guard ('issue 21' there).
"""
import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import some_define as sd
from test_flags import record, run_ok
from test_reliability import FAST, MY_PREDICT, MY_TRAIN, ORIGIN_TRAIN, one_error_line, run_inprocess

TINY = ['--batch-size', '2', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0']
FCN_ARGS = dict(name='fcn', num_classes=21, norm='batch', aux_loss=False)
CONFIG = dict(model='fcn', optimizer='adam', lr=1e-3, epochs=2, stage='train', data_title='test data')


# ------------------------------------------------------------------------- 1: a checkpoint is durable first
@pytest.fixture
def disk_calls(monkeypatch):
    """Records os.fsync (what the descriptor is: a file or a folder, its inode and size at that moment) and
    os.replace (source, destination, the source's inode) in the order write_atomically makes them."""
    calls, fsync, replace = [], os.fsync, os.replace

    def recorded_fsync(fd):
        st = os.fstat(fd)
        calls.append(('fsync', 'folder' if stat.S_ISDIR(st.st_mode) else 'file', st.st_ino, st.st_size))
        return fsync(fd)

    def recorded_replace(src, dst):
        calls.append(('replace', Path(src), Path(dst), os.stat(src).st_ino))
        return replace(src, dst)
    monkeypatch.setattr(sd.os, 'fsync', recorded_fsync)
    monkeypatch.setattr(sd.os, 'replace', recorded_replace)
    return calls


WRITERS = {'checkpoint': lambda path, n: sd.save_checkpoint({'epoch': n, 'weights': torch.arange(3001.)}, path),
           # the results' JSON, the class counts, the pictures: a few bytes, left in Python's buffer until a flush
           'results': lambda path, n: sd.write_atomically(path, lambda f: f.write(b'%d' % n * 1001), 'fix')}


@pytest.mark.parametrize('writer', WRITERS)
def test_a_checkpoint_is_on_disk_before_it_replaces_the_last_one(tmp_path, disk_calls, writer):
    """The temporary file is flushed and fsynced whole, then renamed over the last checkpoint, then the folder is
    fsynced: a power cut at any moment finds the old file or the new one, both complete."""
    path = tmp_path / 'ck.pt'
    WRITERS[writer](path, 1)
    disk_calls.clear()
    WRITERS[writer](path, 2)
    assert [c[:2] for c in disk_calls] == [('fsync', 'file'), ('replace', path.with_name(f'ck.pt.{os.getpid()}.tmp')),
                                           ('fsync', 'folder')], disk_calls
    (_, _, file_inode, synced_size), (_, _, dst, moved_inode), (_, _, folder_inode, _) = disk_calls
    assert dst == path and file_inode == moved_inode == path.stat().st_ino    # the fsynced file is the one renamed
    assert synced_size == path.stat().st_size, 'bytes were still in a buffer when the file was fsynced'
    assert folder_inode == tmp_path.stat().st_ino
    assert (sd.load_torch_file(path)['epoch'] if writer == 'checkpoint' else path.read_bytes()[:1]) in (2, b'2')


@pytest.mark.parametrize('refusal', ['fsync_EINVAL', 'open_refused'])
def test_a_folder_that_cannot_be_fsynced_is_skipped_quietly(tmp_path, disk_calls, monkeypatch, refusal):
    """Some filesystems refuse an fsync of a folder (EINVAL), and Windows cannot open one: the write goes on."""
    fsync, open_ = os.fsync, os.open
    if refusal == 'fsync_EINVAL':
        def refusing_fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return fsync(fd)
        monkeypatch.setattr(sd.os, 'fsync', refusing_fsync)
    else:
        def refusing_open(file, flags, *args, **kwargs):
            if os.path.isdir(file):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return open_(file, flags, *args, **kwargs)
        monkeypatch.setattr(sd.os, 'open', refusing_open)
    path = tmp_path / 'results.json'
    sd.write_atomically(path, lambda f: f.write(b'{}'), 'fix')
    assert path.read_bytes() == b'{}' and sorted(p.name for p in tmp_path.iterdir()) == ['results.json']


def test_a_folder_fsync_that_fails_for_real_is_one_line(tmp_path, monkeypatch):
    """An I/O error on the folder's fsync is not a platform's refusal: the run stops with the usual one line."""
    fsync = os.fsync

    def failing_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return fsync(fd)
    monkeypatch.setattr(sd.os, 'fsync', failing_fsync)
    with pytest.raises(sd.UserError, match='Input/output error'):
        sd.write_atomically(tmp_path / 'ck.pt', lambda f: f.write(b'x'), 'fix')


# ------------------------------------------------------------------------ 2: --resume with other model flags
def write_checkpoint(path, model_args, epoch=1):
    """A checkpoint as train_ch13 leaves it after `epoch` epochs, for these model_args (weights of a fresh model)."""
    state = dict(epoch=epoch, history=[dict(epoch=e + 1, loss=1.0) for e in range(epoch)], model_args=model_args,
                 num_classes=model_args['num_classes'], model=sd.build_model(**model_args).state_dict(),
                 config=dict(CONFIG), classes=sd.VOC._asdict())
    sd.save_checkpoint(state, path)
    return path


@pytest.mark.parametrize('changed', [dict(norm='instance'), dict(norm='evo'), dict(aux_loss=True),
                                     dict(num_classes=6)], ids=['norm_instance', 'norm_evo', 'aux_loss', 'classes'])
def test_resume_with_other_model_flags_is_refused(tmp_path, changed):
    """A checkpoint of --norm group resumed with --norm instance (the same keys and shapes: its weights would load
    without a word) is refused in one line naming the file and both sets of flags."""
    saved = dict(FCN_ARGS, norm='group')
    path = write_checkpoint(tmp_path / 'ck.pt', saved)
    assert sd.Checkpoint(path, dict(saved), CONFIG, sd.VOC, resume=True).resuming     # the same flags resume
    other = dict(saved, **changed)
    with pytest.raises(sd.UserError) as err:
        sd.Checkpoint(path, other, CONFIG, sd.VOC, resume=True)
    line = sd.error_line(err.value)
    assert '\n' not in str(err.value) and str(path) in line and str(saved) in line and str(other) in line, line


def test_group_norm_weights_would_load_into_instance_norm_silently():
    """Why the check above is the only guard for norms: group and instance norms hold the same keys and shapes."""
    group = sd.build_model(**dict(FCN_ARGS, norm='group')).state_dict()
    sd.build_model(**dict(FCN_ARGS, norm='instance')).load_state_dict(group)      # strict: no error


def test_resume_with_another_norm_through_the_script(demo_voc, tmp_path):
    path = write_checkpoint(tmp_path / 'ck.pt', dict(FCN_ARGS, norm='group'))
    res = run_inprocess(MY_TRAIN, ['--data-dir', demo_voc, '--model', 'fcn', '--norm', 'instance', '--epochs', '2',
                                   '--finetune-epochs', '0', '--save', path, '--resume'] + TINY, tmp_path)
    line = one_error_line(res, path, "'group'", "'instance'", '--save')
    assert not list(tmp_path.glob('*.prev.pt')) and sd.load_torch_file(path)['epoch'] == 1, line


# --------------------------------------------------------------------- a training loop with a stub epoch
class StubLoader(list):
    """What train_ch13 asks of its training loader: its length, its dataset and its SeededSampler."""

    def __init__(self, seed, batches=2):
        super().__init__([None] * batches)
        self.dataset = list(range(8))
        self.sampler = sd.SeededSampler(self.dataset, shuffle=True, seed=seed)


def train_stub(monkeypatch, tmp_path, seed=0, epochs=2, resume=False, amp=None, name='ck.pt', epoch=None):
    """sd.train_ch13 on a 1x1 conv with train_epoch replaced by `epoch(**its arguments)` (which returns the
    epoch's sums) and no evaluation: the loop's own work (seeds, the scaler, the checkpoint) at no cost."""
    monkeypatch.setattr(sd, 'train_epoch', epoch)
    monkeypatch.setattr(sd, 'evaluate_crops', lambda net, data_iter, amp=None: dict(pixel_acc=0.5, miou=0.5))
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 2, 1)
    ckpt = sd.Checkpoint(tmp_path / name, dict(FCN_ARGS), CONFIG, sd.VOC, resume=resume)
    sd.train_ch13(net, StubLoader(seed), None, sd.cross_entropy_loss, torch.optim.SGD(net.parameters(), lr=0.1),
                  epochs, checkpoint=ckpt, amp=amp)
    return sd.load_torch_file(tmp_path / name)


# ------------------------------------------------------------------------------- 3: fp16's GradScaler resumes
def test_an_fp16_run_resumes_with_its_grad_scalers_scale_and_growth_tracker(tmp_path, monkeypatch):
    """fp16 (a GPU without bf16) trains with a GradScaler: its scale and growth tracker after epoch 1 are saved,
    and the resumed epoch 2 steps with exactly them, not with a fresh scaler's 65536 and 0."""
    after_epoch_1 = {'scale': 512.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                     '_growth_tracker': 37}
    seen = []

    def epoch(net, batches, loss, trainer, amp=None, scaler=None, accum_steps=1, augment=None, seed=0):
        seen.append(scaler.state_dict())
        scaler.load_state_dict(after_epoch_1)      # what an epoch of fp16 steps leaves in the scaler
        return [1.0, 2, 1, 2]
    saved = train_stub(monkeypatch, tmp_path, epochs=1, amp=torch.float16, epoch=epoch)
    assert saved['scaler'] == after_epoch_1
    resumed = train_stub(monkeypatch, tmp_path, epochs=2, amp=torch.float16, epoch=epoch, resume=True)
    assert resumed['epoch'] == 2 and len(seen) == 2
    assert seen[0] == torch.amp.GradScaler('cpu').state_dict()             # the first run: a fresh scaler
    assert seen[1] == after_epoch_1, f'the resumed epoch stepped with {seen[1]}, saved {after_epoch_1}'


# ------------------------------------------------------------------------ 4: --resume through both stages
def test_resume_after_a_stop_in_stage_1_finishes_it_then_fine_tunes_from_it(demo_voc, tmp_path, monkeypatch):
    """my_train.py stopped after stage 1's first epoch (no *_finetune.pt yet), then the same command with --resume:
    stage 1 continues, the fine-tune starts from its weights into a new file, and both end as an uninterrupted
    run's, bit for bit."""
    common = ['--data-dir', demo_voc, '--model', 'fcn', '--optimizer', 'adam', '--lr', '1e-3', '--epochs', '2',
              '--finetune-epochs', '1', '--finetune-lr', '1e-4', '--seed', '3'] + TINY
    run_ok(MY_TRAIN, common + ['--save', 'straight.pt'], tmp_path)
    end_epoch = sd.Checkpoint.end_epoch

    def stop_after_epoch_1(self, trainer, scaler, record):
        end_epoch(self, trainer, scaler, record)
        raise KeyboardInterrupt     # Ctrl-C (or SIGTERM) once epoch 1 is saved
    with monkeypatch.context() as m:
        m.setattr(sd.Checkpoint, 'end_epoch', stop_after_epoch_1)
        res = run_inprocess(MY_TRAIN, common + ['--save', 'resumed.pt'], tmp_path)
    assert res.code == 130 and 'holds 1 finished epoch' in res.out, res.err + res.out
    assert not (tmp_path / 'resumed_finetune.pt').exists()
    res = run_ok(MY_TRAIN, common + ['--save', 'resumed.pt', '--resume'], tmp_path)
    assert res.out.count('resuming') == 1, res.out      # stage 1 resumes; the fine-tune starts
    for name in ('.pt', '_finetune.pt'):
        a, b = (sd.load_torch_file(tmp_path / f'{run}{name}') for run in ('straight', 'resumed'))
        assert a['epoch'] == b['epoch'] == (2 if name == '.pt' else 1)
        differ = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
        assert not differ, f'{name}: {len(differ)} tensors differ from the uninterrupted run: {differ[:4]}'
        assert [h['loss'] for h in a['history']] == [h['loss'] for h in b['history']]


# ------------------------------------------------------------------------------ 5: a mask value of K classes
def folder_with_masks(root, num_classes, values):
    """A folder dataset of one val image whose mask holds `values` (and 255), classes c0..c<num_classes-1>."""
    for kind in ('images', 'masks'):
        (root / kind / 'val').mkdir(parents=True)
    (root / 'classes.txt').write_text(''.join(f'c{i}\n' for i in range(num_classes)))
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(root / 'images' / 'val' / 'a.png')
    mask = np.full((8, 12), 255, np.uint8)
    for i, v in enumerate(values):
        mask[i, :6] = v
    Image.fromarray(mask, mode='L').save(root / 'masks' / 'val' / 'a.png')
    return root


@pytest.mark.parametrize('k', [2, 3, 21])
def test_a_mask_value_equal_to_the_number_of_classes_is_named_at_load(tmp_path, k):
    """Classes 0..K-1: a mask holding K is a value outside the classes (named with the file); K-1 and 255 are
    not."""
    image = torch.zeros(3, 4, 5, dtype=torch.uint8)
    label = torch.full((4, 5), sd.IGNORE_INDEX, dtype=torch.int64)
    label[0, :2] = torch.tensor([0, k - 1])
    sd.check_pair(image, label, 'img.png', 'mask.png', k)      # no error
    label[1, 1] = k
    with pytest.raises(sd.UserError, match=rf'mask\.png holds label values \[{k}\] outside 0\.\.{k - 1} and 255'):
        sd.check_pair(image, label, 'img.png', 'mask.png', k)
    good = folder_with_masks(tmp_path / 'good', k, [0, k - 1])
    bad = folder_with_masks(tmp_path / 'bad', k, [0, k - 1, k])
    read = sd.SegDataset(sd.folder_files(good, False), sd.read_classes(good / 'classes.txt')).read(0)[1]
    assert set(read.unique().tolist()) == {0, k - 1, 255}
    with pytest.raises(sd.UserError, match=rf'{bad / "masks" / "val" / "a.png"} holds label values \[{k}\]'):
        sd.SegDataset(sd.folder_files(bad, False), sd.read_classes(bad / 'classes.txt'), normalize=False).read(0)


# -------------------------------------------------------------------- 6: my_predict.py --test-size, photos --mst
@pytest.fixture(scope='module')
def fcn(demo_voc, tmp_path_factory):
    """origin_train.py, one epoch: its checkpoint."""
    work = tmp_path_factory.mktemp('guards_fcn')
    run_ok(ORIGIN_TRAIN, ['--data-dir', demo_voc] + FAST, work)
    return work / 'checkpoints' / 'origin.pt'


def test_my_predict_evaluates_at_the_test_size(fcn, demo_voc, tmp_path, monkeypatch):
    """my_predict.py --eval --test-size 64 96: every val image reaches the net at 64x96, the figures count every
    labelled pixel at the original size."""
    calls = record(monkeypatch, 'run_padded')
    run_ok(MY_PREDICT, ['--checkpoint', fcn, '--eval', '--test-size', '64', '96', '--workers', '0', '--picture',
                        'p.png', '--num-images', '1', '--compare', fcn], tmp_path)
    ids = (demo_voc / 'ImageSets' / 'Segmentation' / 'val.txt').read_text().split()
    labels = [np.array(Image.open(demo_voc / 'SegmentationClass' / f'{i}.png')) for i in ids]
    assert sum(len(c['x']) for c in calls if tuple(c['x'].shape[-2:]) == (64, 96)) == len(labels) == 6
    assert {label.shape for label in labels} != {(64, 96)}
    result = json.loads(sd.results_path(fcn, '.json').read_text())
    assert result['pixels'] == sum(int((label != 255).sum()) for label in labels)


def test_my_predict_segments_photos_at_every_scale_with_the_flip(fcn, demo_voc, tmp_path, monkeypatch):
    """my_predict.py photos/ --mst: each photo passes the net at each of the default scales, once as it is and once
    flipped, and its three PNGs are written; no dataset is read."""
    photos = tmp_path / 'photos'
    photos.mkdir()
    sources = sorted((demo_voc / 'JPEGImages').glob('*.jpg'))
    sizes = {}
    for src in sources:
        size = Image.open(src).size[::-1]
        if size not in sizes.values():
            sizes[src.stem] = size
            shutil.copy(src, photos / src.name)
        if len(sizes) == 2:
            break
    calls = record(monkeypatch, 'run_padded')
    run_ok(MY_PREDICT, [photos, '--checkpoint', fcn, '--mst', '--out-dir', 'seg'], tmp_path)
    inputs = [c['x'] for c in calls]
    assert len(inputs) == 2 * len(sd.MST_SCALES) * len(sizes), [tuple(x.shape) for x in inputs]
    per_photo = [inputs[i:i + 2 * len(sd.MST_SCALES)] for i in range(0, len(inputs), 2 * len(sd.MST_SCALES))]
    for (stem, (h, w)), passes in zip(sorted(sizes.items()), per_photo):
        expected = [(round(h * s), round(w * s)) for s in sd.MST_SCALES for _ in (0, 1)]
        assert [tuple(x.shape[-2:]) for x in passes] == expected, stem
        for plain, flipped in zip(passes[::2], passes[1::2]):
            assert torch.equal(plain.flip(-1), flipped)
        for kind in ('color', 'overlay', 'labels'):
            assert (tmp_path / 'seg' / f'{stem}_{kind}.png').exists()


# ------------------------------------------------------------------------- 7: the cached class pixel counts
@pytest.fixture
def voc_copy(demo_voc, tmp_path, monkeypatch):
    """A copy of the demo data (its masks may be edited), no cached counts, run from an empty folder."""
    root = tmp_path / 'VOC2012'
    shutil.copytree(demo_voc, root, ignore=shutil.ignore_patterns('class_pixels_*'))
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def counted(dataset, cache_dir):
    """class_pixel_counts, and whether it counted (True) or read the cache (False)."""
    read = []
    real = dataset.read
    dataset.read = lambda i: (read.append(i), real(i))[1]
    counts, ignored = sd.class_pixel_counts(dataset, cache_dir)
    del dataset.read
    return counts.tolist(), ignored, bool(read)


def test_cached_class_counts_follow_void_as_background(voc_copy, tmp_path):
    """A run with --void-as-background counts void as background; the other setting in the same folder must not
    read its counts (nor the other way round); each setting then reads its own."""
    cache = tmp_path / 'cache'
    cache.mkdir()
    ignored_ds = sd.VOCSegDataset(True, (32, 64), voc_copy, normalize=False)
    void_ds = sd.VOCSegDataset(True, (32, 64), voc_copy, void_as_background=True, normalize=False)
    counts, ignored, fresh = counted(ignored_ds, cache)
    assert fresh and ignored > 0
    void_counts, void_ignored, fresh = counted(void_ds, cache)
    assert fresh, "--void-as-background read the counts of a run without it"
    assert void_ignored == 0 and void_counts[0] == counts[0] + ignored and void_counts[1:] == counts[1:]
    for ds, expected in ((ignored_ds, (counts, ignored)), (void_ds, (void_counts, 0.0))):
        again = counted(ds, cache)
        assert again == (*expected, False)


def test_cached_class_counts_follow_an_edited_mask_and_the_classes(voc_copy, tmp_path):
    """A mask corrected after a first run, or another class table on the same data, is counted again."""
    cache = tmp_path / 'cache'
    cache.mkdir()
    ds = sd.VOCSegDataset(True, (32, 64), voc_copy, normalize=False)
    counts, ignored, _ = counted(ds, cache)
    mask = Path(ds.items[-1][1])        # not the first item: an edit anywhere counts
    label = np.array(Image.open(mask))
    before = int((label == 0).sum())
    palette = Image.open(mask).getpalette()
    label[label == 0] = 15
    edited = Image.fromarray(label, mode='P')
    edited.putpalette(palette)
    st = mask.stat()
    edited.save(mask)
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))      # saved a second later
    new_counts, new_ignored, fresh = counted(sd.VOCSegDataset(True, (32, 64), voc_copy, normalize=False), cache)
    assert fresh, 'an edited mask was not counted again'
    assert new_counts[0] == counts[0] - before and new_counts[15] == counts[15] + before
    names = sd.VOC_CLASSES[:15] + ['person', 'extra']
    other = sd.Classes(names, sd.palette_colors(len(names)))
    _, _, fresh = counted(sd.VOCSegDataset(True, (32, 64), voc_copy, normalize=False, classes=other), cache)
    assert fresh, 'another class table read the counts of the VOC classes'


# ------------------------------------------------------------------ 8: a batch torchrun's processes cannot share
@pytest.mark.parametrize('world, batch, accum, ok', [(4, 10, 1, False), (4, 8, 1, True), (4, 8, 2, True),
                                                     (4, 12, 2, False), (4, 16, 2, True), (2, 6, 4, False),
                                                     (1, 10, 1, True), (1, 10, 4, False)])
def test_a_batch_the_processes_cannot_share_is_refused(tmp_path, monkeypatch, world, batch, accum, ok):
    """--batch-size is global: each of torchrun's processes takes batch / (processes x accum) per micro-batch. A
    batch of 10 on 4 processes would train 8 without a word: refused in one line naming the flags and the count."""
    monkeypatch.setenv('WORLD_SIZE', str(world))
    check = lambda: sd.check_training_flags('fcn', (32, 64), batch, accum, 1, [tmp_path / 'ck.pt'])  # noqa: E731
    if ok:
        check()
        return
    with pytest.raises(sd.UserError) as err:
        check()
    line = str(err.value)
    assert '\n' not in line and f'--batch-size {batch}' in line and '--accum-steps' in line, line
    assert f'({accum} x {world})' in line, line


def test_the_scripts_refuse_such_a_batch_before_starting_processes(demo_voc, tmp_path, monkeypatch):
    """What torchrun --nproc_per_node=4 origin_train.py --batch-size 10 meets: one line, before any process group."""
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('RANK', '0')
    res = run_inprocess(ORIGIN_TRAIN, ['--data-dir', demo_voc, '--epochs', '1', '--batch-size', '10', '--crop-size',
                                       '32', '64', '--no-pretrained', '--workers', '0'], tmp_path)
    one_error_line(res, '--batch-size 10', '(1 x 4)')
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------ 9: --seed drives every draw
def loader_draws(dataset, seed, epoch=0):
    """(item order, each item's crop seed, the first batch) of make_loader's training loader for this seed."""
    loader = sd.make_loader(dataset, 4, True, seed, num_workers=0)
    loader.sampler.set_epoch(epoch)
    items = list(loader.sampler)
    return [i for i, _ in items], dict(items), next(iter(loader))


def test_two_seeds_give_other_batch_orders_and_crops(demo_voc):
    ds = sd.VOCSegDataset(True, (32, 64), demo_voc, normalize=False)
    (order_a, crops_a, batch_a), (order_b, crops_b, batch_b) = loader_draws(ds, 0), loader_draws(ds, 1)
    order_again, crops_again, batch_again = loader_draws(ds, 0)
    assert order_again == order_a and crops_again == crops_a and torch.equal(batch_again[0], batch_a[0])
    assert order_a != order_b, '--seed does not change the batch order'
    assert all(crops_a[i] != crops_b[i] for i in crops_a), '--seed does not change the crops'
    assert not torch.equal(batch_a[0], batch_b[0])
    assert loader_draws(ds, 0, epoch=1)[:2] != (order_a, crops_a)      # and each epoch draws anew


def test_two_seeds_give_other_dropout_and_batch_augmentation_draws(tmp_path, monkeypatch):
    """train_ch13 seeds the model's own draws (dropout) and hands the epoch its CutMix/CopyBlob seed from --seed (the
    loader's seed) and the epoch: another --seed, other draws; the same --seed, the same."""
    def draws(seed):
        seen = []

        def epoch(net, batches, loss, trainer, amp=None, scaler=None, accum_steps=1, augment=None, seed=0):
            seen.append((seed, torch.rand(3).tolist()))     # the augment seed; what dropout would draw
            return [1.0, 2, 1, 2]
        train_stub(monkeypatch, tmp_path, seed=seed, epochs=2, epoch=epoch, name=f'seed{seed}_{len(runs)}.pt')
        return seen
    runs = []
    for seed in (0, 0, 1):
        runs.append(draws(seed))
    (a1, a2), (b1, b2), (c1, c2) = runs
    assert (a1, a2) == (b1, b2)
    assert a1[0] != a2[0] and a1[1] != a2[1]          # each epoch its own
    for x, y in ((a1, c1), (a2, c2)):
        assert x[0] != y[0], 'the CutMix/CopyBlob seed does not follow --seed'
        assert x[1] != y[1], "the model's own draws (dropout) do not follow --seed"


def test_two_seeds_give_other_cutmix_and_copyblob_draws(monkeypatch):
    """train_epoch draws each step's CutMix/CopyBlob from the epoch's seed: the batch it trains on differs."""
    images, labels = torch.rand(4, 3, 16, 20), torch.zeros(4, 16, 20, dtype=torch.long)
    labels[::2, 3:9, 4:12] = 1
    augment = sd.batch_augment(cutmix=1.0, copyblob_prob=1.0, pairs=[(1, 0)])
    model = torch.nn.Conv2d(3, 2, 1)

    def trained_on(seed):
        seen = []

        def recorded(X, y, generator):
            X, y = augment(X, y, generator)
            seen.append((X.clone(), y.clone()))
            return X, y
        sd.train_epoch(model, [(images.clone(), labels.clone())] * 2, sd.cross_entropy_loss,
                            torch.optim.SGD(model.parameters(), lr=0.0), augment=recorded, seed=seed)
        return seen
    a, b, c = trained_on(7), trained_on(7), trained_on(8)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c)), 'another seed, the same CutMix/CopyBlob draws'
