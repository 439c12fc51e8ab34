"""Several processes through torchrun, on the CPU (gloo): the same code path as several GPUs, minus the GPUs.

A 2-process origin_train.py run on a tiny synthetic VOC must print its report once (rank 0), write one checkpoint,
and evaluate exactly the items a single process evaluates: the per-epoch test figures of the 2-process run must equal
a single process's evaluation of the same weights. A helper run through torchrun compares the confusion matrix
itself, and a fast in-process check shows how make_loader deals the test items to ranks."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

MAIN = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(MAIN))
import some_define as sd  # noqa: E402
from conftest import finish  # noqa: E402
from test_reliability import run_inprocess  # noqa: E402

CROP = (32, 64)
BATCH = 4

if not torch.distributed.is_available():
    pytest.skip('this PyTorch build has no torch.distributed', allow_module_level=True)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_torchrun(args, cwd, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(MAIN))
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
           '--master_addr=127.0.0.1', f'--master_port={free_port()}'] + [str(a) for a in args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)




# A helper launched through torchrun: evaluate_crops of given weights over the test loader, in each rank; rank 0
# writes the all-reduced confusion matrix and the items every rank saw.
HELPER = textwrap.dedent('''
    import json, sys
    import torch
    import some_define as sd
    demo, weights, out = sys.argv[1:4]
    crop, batch = (int(sys.argv[4]), int(sys.argv[5])), int(sys.argv[6])
    sd.setup_distributed()
    net = sd.build_model('fcn', num_classes=21)
    net.load_state_dict(torch.load(weights, weights_only=True))
    test = sd.VOCSegDataset(False, crop, demo, normalize=False)
    loader = sd.make_loader(test, batch, False, seed=0, num_workers=0)
    matrices = []
    compute = sd.ConfusionMatrix.compute
    sd.ConfusionMatrix.compute = lambda self: (matrices.append(self.mat.clone()), compute(self))[1]
    result = sd.evaluate_crops(net, sd.DeviceLoader(loader, torch.device('cpu')))
    gathered = [None] * sd.world_size()
    torch.distributed.all_gather_object(gathered, [i for i, _ in loader.sampler])
    if sd.is_main_process():
        json.dump({'mat': matrices[0].tolist(), 'items': gathered, 'miou': result['miou']}, open(out, 'w'))
    torch.distributed.destroy_process_group()
''')


# A helper launched through torchrun: main_process_first's work done by rank 0 while rank 1 waits, then a failing
# work that must stop both ranks, rank 0 with its one line and rank 1 quietly.
FIRST = textwrap.dedent('''
    import datetime, sys
    import torch
    import some_define as sd

    def fail():
        raise sd.UserError('rank 0 could not do it')

    def main():
        sd.setup_distributed(torch.device('cpu'))
        marker, wait = sys.argv[1], datetime.timedelta(seconds=60)
        sd.main_process_first(lambda: open(marker, 'w').write('written by rank 0'), timeout=wait)
        print(f'rank {sd.rank()} read: {open(marker).read()}', flush=True)
        sd.main_process_first(fail, timeout=wait)
        print('not reached', flush=True)
    sd.run_main(main)
''')


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    return Path(sd.make_demo_voc(tmp_path_factory.mktemp('voc') / 'VOC2012', num_train=12, num_val=6))


@pytest.fixture(scope='module')
def runs(demo, tmp_path_factory):
    """Both torchrun launches side by side (2 x 2 processes; most of their time is importing torch)."""
    train_dir, eval_dir = tmp_path_factory.mktemp('ddp'), tmp_path_factory.mktemp('ddp_eval')
    torch.manual_seed(0)
    state = sd.build_model('fcn', num_classes=21).state_dict()   # the same weights for 2 processes and for 1
    torch.save(state, eval_dir / 'weights.pt')
    (eval_dir / 'helper.py').write_text(HELPER)
    train = start_torchrun([MAIN / 'origin_train.py', '--data-dir', demo, '--epochs', 1, '--batch-size', BATCH,
                            '--crop-size', *CROP, '--no-pretrained', '--workers', 0, '--save', 'ckpt'], train_dir)
    evaluate = start_torchrun([eval_dir / 'helper.py', demo, eval_dir / 'weights.pt', eval_dir / 'cm.json', *CROP,
                               BATCH], eval_dir)
    unet_dir = tmp_path_factory.mktemp('ddp_unet')
    unet_args = UNET + ['--data-dir', as_folder(demo, unet_dir)]
    unet = start_torchrun([MAIN / 'my_train.py'] + unet_args, unet_dir)
    first_dir = tmp_path_factory.mktemp('ddp_first')
    (first_dir / 'first.py').write_text(FIRST)
    first = start_torchrun([first_dir / 'first.py', first_dir / 'marker.txt'], first_dir)
    done = {'train': (train_dir,) + finish(train)}
    images = train_dir / 'photos'       # own images to segment, besides the evaluation
    images.mkdir()
    for image, _ in sd.voc_files(demo, False).items[:5]:
        shutil.copy(image, images)
    predict = start_torchrun([MAIN / 'origin_predict.py', '--checkpoint', 'ckpt', '--eval', '--workers', 0, images,
                              '--out-dir', 'segmented'], train_dir)
    return dict(done, eval=(eval_dir,) + finish(evaluate), unet=(unet_dir,) + finish(unet),
                predict=(train_dir,) + finish(predict), first=(first_dir,) + finish(first), state=state,
                unet_args=unet_args)


# my_train.py's U-Net on the demo in the folder layout, both stages, one SGD update each (12 examples, a global batch
# of 8: 4 per process): GroupNorm (no batch statistics, which differ with the batch each process sees) and SGD (its
# step is proportional to the gradient, unlike Adam's), so that two processes must reach one process's weights.
UNET = ['--dataset', 'folder', '--epochs', 1, '--finetune-epochs', 1, '--batch-size', 8, '--crop-size', *CROP,
        '--no-pretrained', '--workers', 0, '--save', 'ckpt', '--norm', 'group', '--optimizer', 'sgd', '--lr', '1e-3',
        '--finetune-lr', '1e-3']


def as_folder(voc, dst):
    """The VOC demo in the folder layout (a user's own data): images/, masks/ (index PNGs), classes.txt."""
    root = dst / 'mydata'
    for split, is_train in (('train', True), ('val', False)):
        for folder in ('images', 'masks'):
            (root / folder / split).mkdir(parents=True)
        for image, label in sd.voc_files(voc, is_train).items:
            shutil.copy(image, root / 'images' / split)
            shutil.copy(label, root / 'masks' / split)
    (root / 'classes.txt').write_text('\n'.join(sd.VOC_CLASSES) + '\n')
    return root


def single_process_eval(state, demo):
    """evaluate_crops of these weights over the test loader, in this (single) process: (result, matrix, items)."""
    assert 'WORLD_SIZE' not in os.environ and not torch.distributed.is_initialized()
    net = sd.build_model('fcn', num_classes=21)
    net.load_state_dict(state)
    test = sd.VOCSegDataset(False, CROP, demo, normalize=False)
    loader = sd.make_loader(test, BATCH, False, seed=0, num_workers=0)
    matrices = []
    compute = sd.ConfusionMatrix.compute
    try:
        sd.ConfusionMatrix.compute = lambda self: (matrices.append(self.mat.clone()), compute(self))[1]
        result = sd.evaluate_crops(net, sd.DeviceLoader(loader, torch.device('cpu')))
    finally:
        sd.ConfusionMatrix.compute = compute
    return result, matrices[0], [i for i, _ in loader.sampler]


def test_eval_items_dealt_to_ranks_are_those_of_one_process(demo, monkeypatch):
    """The test loader of each rank: together the ranks must see each item of a single process's loader once
    (no padding, nothing beyond the dataset), with the same crop seeds."""
    test = sd.VOCSegDataset(False, CROP, demo, normalize=False)
    single = list(sd.make_loader(test, BATCH, False, seed=0, num_workers=0).sampler)
    assert [i for i, _ in single] == list(range(len(test) // BATCH * BATCH))   # the book drops the partial batch
    dealt = []
    for rank in range(2):
        monkeypatch.setenv('WORLD_SIZE', '2')
        monkeypatch.setenv('RANK', str(rank))
        dealt += list(sd.make_loader(test, BATCH, False, seed=0, num_workers=0).sampler)
    assert sorted(dealt) == sorted(single)


def test_two_process_training_runs(runs, demo):
    """origin_train.py under torchrun: rank 0 alone reports and writes, the report counts the whole training split
    and both processes, and the saved weights are trained ones (moved from the seed's, finite)."""
    cwd, rc, out, err = runs['train']
    assert rc == 0, f'torchrun exited {rc}\n{out[-3000:]}\n{err[-4000:]}'
    lines = (out + err).splitlines()
    assert sum(line.startswith('epoch 1/1:') for line in lines) == 1, out     # rank 0 reports, rank 1 does not
    assert sum(line.startswith('read ') for line in lines) == 2               # train + test, once each
    train = sd.VOCSegDataset(True, CROP, demo)
    assert f'{len(train)} training examples, device cpu x2' in out, out
    assert re.search(r"examples/sec on \['cpu', 'cpu'\]", out), out
    ckpt = torch.load(cwd / 'ckpt', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 1 and len(ckpt['history']) == 1
    h = ckpt['history'][0]
    assert h['loss'] > 0 and 0 <= h['train_acc'] <= 1 and 0 <= h['test_acc'] <= 1
    torch.manual_seed(0)
    initial = sd.build_model('fcn', num_classes=21).state_dict()
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    assert not torch.equal(ckpt['model']['final_conv.weight'], initial['final_conv.weight'])
    assert not torch.equal(ckpt['model']['0.weight'], initial['0.weight'])    # the gradient reached the stem
    assert not list(cwd.glob('*.tmp'))


def test_two_process_resnet_unet_on_a_folder_dataset(runs):
    """my_train.py's own model (whose registered resnet18 fc is unused: DDP must not wait for it), both stages, on
    data in the folder layout: each stage reported once, its checkpoint with the folder's classes."""
    cwd, rc, out, err = runs['unet']
    assert rc == 0, f'torchrun exited {rc}\n{out[-3000:]}\n{err[-4000:]}'
    assert sum(line.startswith('epoch 1/1:') for line in out.splitlines()) == 2, out    # stage 1 and fine-tune
    for name in ('ckpt', 'ckpt_finetune'):
        ckpt = torch.load(cwd / name, map_location='cpu', weights_only=True)
        assert ckpt['epoch'] == 1 and ckpt['config']['dataset'] == 'folder'
        assert ckpt['classes']['names'] == sd.VOC_CLASSES and ckpt['model_args']['name'] == 'resnet_unet'


def test_two_processes_train_to_the_weights_of_one(runs, tmp_path):
    """The same global batch in two processes (4 + 4, DDP) and in one (8): the same weights after each stage, within
    float32 rounding. DDP averages the processes' gradients; train_batch_ch13 scales the summed loss by the number of
    processes, so that the update is the book's sum over the whole batch, as in one process (averaged, every update
    would be half as large). The tolerance is relative to how far each tensor moved: on an Intel Xeon the two runs
    differ by at most 0.5% of it after the second update, a halved update by 50%."""
    cwd, rc, out, err = runs['unet']
    assert rc == 0, f'torchrun exited {rc}\n{out[-3000:]}\n{err[-4000:]}'
    one = run_inprocess(MAIN / 'my_train.py', runs['unet_args'], tmp_path)
    assert one.code == 0, one.err + one.out[-3000:]
    torch.manual_seed(0)        # what my_train.py does before building the model
    initial = sd.build_model('resnet_unet', num_classes=21, norm='group').state_dict()
    for name in ('ckpt', 'ckpt_finetune'):
        two = torch.load(cwd / name, map_location='cpu', weights_only=True)
        single = torch.load(tmp_path / name, map_location='cpu', weights_only=True)
        moved = [k for k, v in single['model'].items() if not torch.equal(v, initial[k])]
        assert len(moved) > 10, moved
        for key, value in single['model'].items():
            step = float((value - initial[key]).abs().max())
            torch.testing.assert_close(two['model'][key], value, rtol=0, atol=0.05 * step + 1e-7,
                                       msg=lambda m: f'{name} {key}, moved by {step:.3g}: {m}')
        assert two['history'][0]['loss'] == pytest.approx(single['history'][0]['loss'], rel=1e-5)


def test_two_process_test_figures_equal_one_process_evaluation(runs, demo):
    """The 2-process run's own test acc / mIoU (evaluated with the weights it saved) = a single process's."""
    cwd, rc, out, err = runs['train']
    assert rc == 0, f'torchrun exited {rc}\n{err[-3000:]}'
    ckpt = torch.load(cwd / 'ckpt', map_location='cpu', weights_only=True)
    result, _, _ = single_process_eval(ckpt['model'], demo)
    h = ckpt['history'][-1]
    assert h['test_acc'] == pytest.approx(result['pixel_acc'], abs=1e-12)
    assert h['test_miou'] == pytest.approx(result['miou'], abs=1e-12)


def test_confusion_matrix_two_processes_equals_one(runs, demo):
    cwd, rc, out, err = runs['eval']
    assert rc == 0, f'torchrun exited {rc}\n{out[-3000:]}\n{err[-4000:]}'
    two = json.loads((cwd / 'cm.json').read_text())
    result, matrix, items = single_process_eval(runs['state'], demo)
    assert sorted(sum(two['items'], [])) == items          # each item once, no padding, nothing else
    assert all(two['items'])                               # and both ranks had work
    assert matrix.sum() == result['pixels'] > 0
    assert torch.equal(torch.tensor(two['mat']), matrix)
    assert two['miou'] == result['miou']


def test_two_process_evaluation_of_the_predict_script_equals_one_process(runs, demo):
    """origin_predict.py --eval under torchrun: each process evaluates its share, the matrix is summed, rank 0
    writes the figures of the whole split (not of its half); the own images are shared out, each written once."""
    cwd, rc, out, err = runs['predict']
    assert rc == 0, f'torchrun exited {rc}\n{out[-3000:]}\n{err[-4000:]}'
    two = json.loads(sd.results_path(cwd / 'ckpt', '.json').read_text())
    net, _ = sd.load_model(cwd / 'ckpt', torch.device('cpu'))
    val = sd.VOCSegDataset(False, None, demo, normalize=False)
    one = sd.evaluate_full(net, val, num_workers=0).compute()
    assert two['images'] == len(val) and two['pixels'] == one['pixels'] > 0
    assert two['miou'] == pytest.approx(one['miou'], abs=1e-12)
    assert sorted(p.name for p in (cwd / 'segmented').iterdir()) == sorted(
        f'{p.stem}_{kind}.png' for p in (cwd / 'photos').iterdir() for kind in ('color', 'overlay', 'labels'))
    assert out.count('segmented 5 image(s)') == 1, out


def test_work_of_rank_0_first_then_a_failure_stops_every_rank(runs):
    cwd, rc, out, err = runs['first']
    assert rc != 0 and 'not reached' not in out, out + err
    assert sorted(line for line in out.splitlines() if line.startswith('rank')) == [
        'rank 0 read: written by rank 0', 'rank 1 read: written by rank 0']
    assert [line for line in err.splitlines() if line.startswith('error:')] == ['error: rank 0 could not do it']
