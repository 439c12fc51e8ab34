"""--keep-best (the epoch of the best test mIoU kept as *_best.pt, mended by a resume after a stop between its two
writes) and --resume's check of the recipe flags (refused in one line naming each with both values, deny by
default; the allowed ones said in one line). Real tiny runs through the scripts, and unit tests on configs."""
import math

import pytest
import torch

import some_define as sd
from test_reliability import MY_PREDICT, MY_TRAIN, ORIGIN_TRAIN, one_error_line, run_inprocess, voc_master  # noqa: F401

COMMON = ['--batch-size', '4', '--crop-size', '32', '64', '--no-pretrained', '--workers', '0', '--seed', '0',
          '--model', 'fcn', '--lr', '1e-3', '--keep-best']


def my_train(voc_master, save, *extra):
    return ['--data-dir', voc_master, '--save', save] + COMMON + [str(e) for e in extra]


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_file(a, b):
    """The same epoch, history and weights (the config's --resume aside)."""
    ca, cb = load(a), load(b)
    assert (ca['epoch'], ca.get('kept_as'), ca['best']) == (cb['epoch'], cb.get('kept_as'), cb['best'])
    keys = ('epoch', 'loss', 'train_acc', 'test_acc', 'test_miou')
    assert [[h[k] for k in keys] for h in ca['history']] == [[h[k] for k in keys] for h in cb['history']]
    differ = [k for k in ca['model'] if not torch.equal(ca['model'][k], cb['model'][k])]
    assert not differ, f'weights differ: {differ[:5]}'


# ------------------------------------------------------------------------------------------------ --keep-best
class Tiny:
    """What Checkpoint.end_epoch needs of a run: a model and an optimizer."""
    model = torch.nn.Linear(2, 2)
    trainer = torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_best_copy_follows_strict_improvements_of_the_miou(tmp_path):
    ckpt = sd.Checkpoint(tmp_path / 'ck.pt', keep_best=True)
    ckpt.model = Tiny.model
    kept = []
    for epoch, miou in enumerate([math.nan, 0.2, 0.5, 0.5, 0.4, 0.6, math.nan], 1):
        with torch.no_grad():
            Tiny.model.weight.fill_(epoch)
        ckpt.end_epoch(Tiny.trainer, None, dict(epoch=epoch, test_miou=miou))
        kept.append(load(tmp_path / 'ck_best.pt')['epoch'] if (tmp_path / 'ck_best.pt').exists() else None)
    assert kept == [None, 2, 3, 3, 3, 6, 6]      # a NaN never counts, a tie keeps the earlier epoch
    best = load(tmp_path / 'ck_best.pt')
    assert best['kept_as'] == 'best' and best['best'] == dict(epoch=6, test_miou=0.6)
    assert torch.equal(best['model']['weight'], torch.full((2, 2), 6.0))
    assert load(tmp_path / 'ck.pt')['best'] == dict(epoch=6, test_miou=0.6) and load(tmp_path / 'ck.pt')['epoch'] == 7


def test_a_stop_between_the_two_writes_is_mended_by_the_resume(tmp_path, voc_master, monkeypatch):
    whole, stopped = tmp_path / 'whole.pt', tmp_path / 'stopped.pt'
    res = run_inprocess(MY_TRAIN, my_train(voc_master, whole, '--epochs', '3', '--finetune-epochs', '2'), tmp_path)
    assert res.code == 0, res.err
    best = load(whole)['best']['epoch']
    tuned_best = load(sd.finetune_path(whole))['best']['epoch']
    assert load(sd.best_path(whole))['epoch'] == best and load(sd.best_path(sd.finetune_path(whole)))['epoch'] == \
        tuned_best, 'the fine-tune keeps its own best'

    real_save = sd.save_checkpoint

    def stop_before_the_best(obj, path):        # a Ctrl-C right after the checkpoint of the last best epoch
        if path == sd.best_path(stopped) and obj['epoch'] == best:
            raise KeyboardInterrupt()
        real_save(obj, path)
    monkeypatch.setattr(sd, 'save_checkpoint', stop_before_the_best)
    res = run_inprocess(MY_TRAIN, my_train(voc_master, stopped, '--epochs', '3', '--finetune-epochs', '2'), tmp_path)
    assert res.code == 130, res.err + res.out
    monkeypatch.setattr(sd, 'save_checkpoint', real_save)
    assert load(stopped)['epoch'] == best and load(stopped)['best']['epoch'] == best
    best_file = sd.best_path(stopped)
    assert not best_file.exists() or load(best_file)['epoch'] < best, 'the stop did not land between the writes'

    res = run_inprocess(MY_TRAIN, my_train(voc_master, stopped, '--epochs', '3', '--finetune-epochs', '2',
                                           '--resume'), tmp_path)
    assert res.code == 0, res.err
    assert f'{best_file}: epoch {best} written' in res.out
    assert_same_file(sd.best_path(whole), best_file)
    assert_same_file(whole, stopped)
    assert_same_file(sd.best_path(sd.finetune_path(whole)), sd.best_path(sd.finetune_path(stopped)))

    # the predict scripts take it like any checkpoint, and the picture says which epoch it holds
    res = run_inprocess(MY_PREDICT, ['--checkpoint', best_file, '--workers', '0', '--picture', tmp_path / 'b.png',
                                     '--compare', best_file, stopped], tmp_path)
    assert res.code == 0, res.err
    assert (tmp_path / 'b.png').exists()
    assert sd.metrics_for_title(best_file, load(best_file)).endswith(f'best epoch {best} of 3')


# --------------------------------------------------------------------------------------------------- --resume
def config(**changes):
    base = dict(model='fcn', optimizer='sgd', lr=1e-3, epochs=30, workers=4, device=None, stage='train', amp=None,
                save='checkpoints/origin.pt', resume=False, crop_size=[320, 480], keep_best=False,
                flag_defaults=dict(keep_best=False, workers=None, epochs=30, lr=1e-3))
    return dict(base, **changes)


def test_resume_changes_refuses_by_default():
    new = config(optimizer='adam', lr=1e-4, workers=0, resume=True, crop_size=[64, 96], some_new_flag=3)
    changes = {c.key: c for c in sd.resume_changes(config(), new)}
    assert set(changes) == {'optimizer', 'lr', 'workers', 'crop_size', 'some_new_flag'}, 'only what differs'
    assert {k for k, c in changes.items() if c.allowed} == {'workers'}
    assert (changes['lr'].was, changes['lr'].now) == (1e-3, 1e-4)
    assert not changes['some_new_flag'].allowed and not changes['some_new_flag'].recorded


@pytest.mark.parametrize('key', ['amp', 'optimizer', 'lr', 'weight_decay', 'batch_size', 'crop_size', 'seed', 'loss',
                                 'class_weights', 'cutmix', 'copyblob', 'void_as_background', 'data_dir', 'dataset',
                                 'accum_steps', 'model', 'norm', 'keep_best', 'pretrained'])
def test_what_breaks_an_exact_resume_is_refused(key):
    assert key not in sd.RESUME_MAY_CHANGE and all(key not in keys for keys in sd.STAGE_MAY_CHANGE.values())


def test_a_stage_may_extend_itself_not_shorten_or_change_its_base():
    assert [c.allowed for c in sd.resume_changes(config(), config(epochs=40), finished=30)] == [True]
    assert [c.allowed for c in sd.resume_changes(config(), config(epochs=20), finished=10)] == [True]
    assert [c.allowed for c in sd.resume_changes(config(), config(epochs=5), finished=10)] == [False]
    tuned = config(stage='finetune', finetune_epochs=10, finetune_lr=1e-5)
    assert [c.allowed for c in sd.resume_changes(tuned, dict(tuned, finetune_epochs=12), finished=10)] == [True]
    for key, value in (('epochs', 40), ('finetune_lr', 1e-4)):      # the fine-tune's base and its recipe
        assert [c.allowed for c in sd.resume_changes(tuned, dict(tuned, **{key: value}), finished=1)] == [False]
    assert [c.allowed for c in sd.resume_changes(config(finetune_lr=1e-5), config(finetune_lr=1e-4))] == [True]


def test_a_key_the_checkpoint_lacks_is_the_flag_default(capsys):
    old = {k: v for k, v in config().items() if k not in ('keep_best', 'flag_defaults')}
    sd.check_resume('old.pt', dict(config=old, epoch=3), config())
    assert 'predates --keep-best: taken as the default' in capsys.readouterr().out
    with pytest.raises(sd.UserError, match=r'--keep-best was not recorded \(the checkpoint predates it: taken as its '
                                           r'default, off\), now on'):
        sd.check_resume('old.pt', dict(config=old, epoch=3), config(keep_best=True))


def test_check_resume_names_every_refused_flag_in_one_line(capsys):
    with pytest.raises(sd.UserError) as info:
        sd.check_resume('ck.pt', dict(config=config(optimizer='adam', lr=1e-4), epoch=3),
                        config(optimizer='sgd', lr=1e-3, epochs=40))
    text = str(info.value)
    assert '--optimizer was adam, now sgd; --lr was 0.0001, now 0.001:' in text and '\n' not in text
    assert 'start a new --save' in text and '--epochs' not in text
    sd.check_resume('ck.pt', dict(config=config(), epoch=3), config(epochs=40, workers=0, resume=True))
    assert capsys.readouterr().out.strip() == 'resuming ck.pt with --epochs 40 (was 30), --workers 0 (was 4)'


def test_sgd_resumed_as_adam_is_refused_before_any_state_is_loaded(tmp_path, voc_master, monkeypatch):
    save = tmp_path / 'sgd.pt'
    res = run_inprocess(MY_TRAIN, my_train(voc_master, save, '--epochs', '1', '--finetune-epochs', '0',
                                           '--optimizer', 'sgd'), tmp_path)
    assert res.code == 0, res.err
    before = save.read_bytes()
    loaded = []
    monkeypatch.setattr(torch.optim.Optimizer, 'load_state_dict', lambda self, state: loaded.append(state))
    res = run_inprocess(MY_TRAIN, my_train(voc_master, save, '--epochs', '2', '--finetune-epochs', '0',
                                           '--optimizer', 'adam', '--resume'), tmp_path)
    one_error_line(res, '--optimizer was sgd, now adam', str(save))
    assert not loaded and save.read_bytes() == before
    monkeypatch.undo()
    res = run_inprocess(MY_TRAIN, my_train(voc_master, save, '--epochs', '2', '--finetune-epochs', '0',
                                           '--optimizer', 'sgd', '--resume'), tmp_path)
    assert res.code == 0, res.err
    assert f'resuming {save} with --epochs 2 (was 1)' in res.out and load(save)['epoch'] == 2


def test_a_fine_tune_refuses_a_longer_first_stage_before_it_trains(tmp_path, voc_master):
    save = tmp_path / 'my.pt'
    res = run_inprocess(MY_TRAIN, my_train(voc_master, save, '--epochs', '1', '--finetune-epochs', '1'), tmp_path)
    assert res.code == 0, res.err
    res = run_inprocess(MY_TRAIN, my_train(voc_master, save, '--epochs', '2', '--finetune-epochs', '1', '--resume'),
                        tmp_path)
    one_error_line(res, sd.finetune_path(save), '--epochs was 1, now 2')
    assert load(save)['epoch'] == 1, 'the first stage trained on before the refusal'


def test_the_effective_mixed_precision_is_compared(tmp_path, voc_master):
    save = tmp_path / 'o.pt'
    args = ['--data-dir', voc_master, '--save', save, '--epochs', '1'] + COMMON[:10]
    res = run_inprocess(ORIGIN_TRAIN, args, tmp_path)
    assert res.code == 0, res.err
    ckpt = load(save)
    assert ckpt['autocast'] == 'off'
    torch.save(dict(ckpt, autocast='bfloat16'), save)      # as a GPU's default wrote it
    res = run_inprocess(ORIGIN_TRAIN, args[:5] + ['2'] + args[6:] + ['--resume'], tmp_path)
    one_error_line(res, 'mixed precision was bfloat16, now off', '--amp')


def test_only_resume_goes_uncompared():
    """Only --resume itself goes uncompared, and every name RESUME_MAY_CHANGE allows is a flag."""
    import my_train
    flags = {a.dest for a in my_train.build_parser()._actions if a.dest != 'help'}
    assert set(sd.NOT_COMPARED) & flags == {'resume'}
    assert set(sd.RESUME_MAY_CHANGE) <= flags, 'a name in RESUME_MAY_CHANGE that is no flag'
