"""No tensor left on the CPU while the batch is on the GPU, proven without a GPU.

Every model (with every norm), loss, augmentation and inference block runs here with its weights moved and its
batch made on the `meta` device, which stands in for CUDA: a tensor made on the CPU and combined with the batch
fails there exactly as it would on a GPU ("Tensor on device cpu is not on the expected device meta!"). Models are
built on the CPU and then moved, as the scripts do, so that a tensor an __init__ keeps outside the parameters and
buffers stays behind and is caught. With `python -m pytest tests --device cuda` the same checks run on the GPU.

What reads values (CopyBlob, the confusion matrix, the training loop's end-of-epoch checks) cannot run on meta: it
runs on tests/devices.py's fake accelerator, which computes on the CPU, refuses CPU tensors beside device ones as
CUDA does, and counts the host reads (each a wait for the GPU) and uploads, so that "no per-step host
synchronisation" is a tested claim. Last, the decisions a GPU machine makes (mixed-precision type, current device,
torchrun's backend), checked with the CUDA calls replaced.
"""
import pytest
import torch
from torch import nn

import some_define as sd
from devices import fake_device

DEEPLABS = ('deeplabv3_resnet50', 'deeplabv3_resnet101')
# InstanceNorm cannot normalise DeepLabV3's 1x1 image-pooling branch (the README says so): not a device question.
MODEL_NORMS = [(m, n) for m in sd.MODELS for n in sd.NORMS if not (m in DEEPLABS and n == 'instance')]


@pytest.fixture(autouse=True)
def fresh_caches():
    """The tensors cached per device (the ImageNet stats, the upsample's matrices): the fake accelerator's device is
    meta too, and must not be handed the real meta device's tensors, which have no values."""
    for cached in (sd.imagenet_stats, sd.interpolation_matrix):
        cached.cache_clear()
    yield
    for cached in (sd.imagenet_stats, sd.interpolation_matrix):
        cached.cache_clear()


@pytest.fixture
def on(device, monkeypatch):
    """The device the batch lives on: meta (for CUDA) here, the GPU with --device cuda; the U-Net's CUDA branch
    (its matrix upsample) is taken either way."""
    monkeypatch.setattr(sd.Upsample2x, 'everywhere', True)
    return torch.device('cuda' if device == 'cuda' else 'meta')


def batch(on, n=2, classes=21, size=(64, 96), channels_last=False):
    X = torch.randn(n, 3, *size).to(on)
    if channels_last:
        X = X.contiguous(memory_format=torch.channels_last)
    return X, torch.randint(0, classes, (n, *size)).to(on)


def assert_on(on, *tensors):
    for t in tensors:
        assert t.device.type == on.type, f'a {tuple(t.shape)} tensor is on {t.device}, the batch on {on}'


@pytest.mark.parametrize('name, norm', MODEL_NORMS)
def test_every_model_and_norm_trains_on_the_device(name, norm, on):
    torch.manual_seed(0)
    aux = name in DEEPLABS
    model = sd.build_model(name, 21, norm=norm, aux_loss=aux).to(on)
    X, y = batch(on, channels_last=True)
    out, aux_out = sd.model_output(model.train()(X))
    assert out.shape == (2, 21, 64, 96) and (aux_out is not None) == aux
    loss = sd.cross_entropy_loss(out, y).sum() + (0 if aux_out is None else sd.cross_entropy_loss(aux_out, y).sum())
    loss.backward()
    assert_on(on, out, loss, *(p.grad for p in model.parameters() if p.requires_grad))
    assert_on(on, *model.state_dict().values())


def test_deeplabv3_without_its_auxiliary_head(on):
    model = sd.build_model('deeplabv3_resnet50', 21).to(on)
    out, aux = sd.model_output(model(batch(on)[0]))
    assert aux is None and out.device.type == on.type


@pytest.mark.parametrize('name', sd.LOSSES)
@pytest.mark.parametrize('weighted', [False, True])
def test_every_loss_with_and_without_class_weights(name, weighted, on):
    if name == 'weighted_ce' and not weighted:
        pytest.skip('weighted_ce needs weights')
    logits = torch.randn(2, 21, 8, 12).to(on).requires_grad_()
    y = torch.randint(0, 21, (2, 8, 12))
    y[:, 0] = sd.IGNORE_INDEX
    weights = torch.rand(21) + 0.5 if weighted else None      # made on the CPU, as the scripts make them
    loss = sd.make_loss(name, weights, 2.0, on)(logits, y.to(on))
    assert loss.shape == (2,)
    loss.sum().backward()
    assert_on(on, loss, logits.grad)


def test_the_training_step_and_the_batch_augmentations(on):
    """train_batch_ch13 (the book's step) on a batch that CutMix has mixed (CopyBlob: below, it reads values)."""
    model = sd.build_model('fcn', 5).to(on)
    X, y = batch(on, n=4, classes=5, size=(32, 64))
    X, y = sd.cutmix_segmentation(X, y, prob=1.0, generator=torch.Generator().manual_seed(0))
    trainer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    l_sum, correct = sd.train_batch_ch13(model, X, y, sd.cross_entropy_loss, trainer, step=False)
    assert_on(on, X, y, l_sum, correct, *(p.grad for p in model.parameters()))
    sd.train_batch_ch13(model, X, y, sd.cross_entropy_loss, trainer)        # the book's call: it steps
    assert_on(on, *model.parameters(), *(s['momentum_buffer'] for s in trainer.state.values()))


def test_the_unet_upsample_and_its_matrices(on):
    x = torch.randn(2, 4, 5, 7).to(on).requires_grad_()
    y = sd.Upsample2x()(x)
    y.sum().backward()
    assert y.shape == (2, 4, 10, 14)
    assert_on(on, y, x.grad, sd.interpolation_matrix(5, torch.float32, on))


def test_batches_reach_the_device_normalised(on, demo_voc):
    """Both data paths: streamed uint8 batches normalised on the device, and splits kept there."""
    for keep in ('off', 'on'):
        train_iter, _ = sd.load_data_voc(4, (32, 64), data=demo_voc, num_workers=0, device=on, on_device=keep)
        X, y = next(iter(train_iter))
        assert X.dtype == torch.float32 and y.dtype == torch.int64
        assert_on(on, X, y, *sd.imagenet_stats(on))


def test_multi_scale_inference(on):
    model = sd.build_model('resnet_unet', 21).to(on).eval()
    scores = sd.predict_scores(model, batch(on, n=1, size=(37, 53))[0], scales=(0.5, 1.0, 1.5))
    assert scores.shape == (1, 21, 37, 53)
    assert_on(on, scores)


# ------------------------------------------------------------- what reads values: on the fake accelerator
def blob_batch(n=8):
    labels = torch.zeros(n, 16, 20, dtype=torch.long)
    for i in range(n):
        labels[i, 2 + i % 5:7 + i % 5, 3 + i % 3:8 + i % 3] = 1 if i % 2 else 2     # blobs of class 1 and 2
    labels[:, 0] = sd.IGNORE_INDEX
    return torch.rand(n, 3, 16, 20, generator=torch.Generator().manual_seed(0)), labels


def test_copyblob_reads_the_device_once_per_pair_and_pastes_what_the_cpu_does():
    images, labels = blob_batch()
    pairs = [(1, 0), (2, 0)]
    want = sd.copyblob(images, labels, pairs, prob=1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(want[1], labels)     # something was pasted
    with fake_device() as dev:
        X, y = images.to(dev.device), labels.to(dev.device)
        dev.reset()
        got = sd.copyblob(X, y, pairs, prob=1.0, generator=torch.Generator().manual_seed(3))
        assert dev.host_reads == len(pairs), dev.reads
        assert torch.equal(dev.value(got[0]), want[0]) and torch.equal(dev.value(got[1]), want[1])


def test_cutmix_and_the_losses_never_wait_for_the_device():
    images, labels = blob_batch()
    with fake_device() as dev:
        X, y = images.to(dev.device), labels.to(dev.device)
        losses = [sd.make_loss(name, torch.rand(3) + 0.5, 2.0, dev.device) for name in ('weighted_ce', 'focal')]
        dev.reset()
        X, y = sd.cutmix_segmentation(X, y, prob=1.0, generator=torch.Generator().manual_seed(0))
        logits = torch.randn(8, 3, 16, 20).to(dev.device)
        dev.reset()
        for loss in losses + [sd.cross_entropy_loss]:
            loss(logits, y).sum()
        assert (dev.host_reads, dev.uploads) == (0, 0), dev.reads


def test_the_training_loop_waits_for_the_device_only_at_the_end_of_an_epoch():
    """The same number of host reads for 2 steps as for 6 (the loss, the weights and the sums are read once, at the
    end of the epoch); batches already on the device need no upload, the normalisation constants come once."""
    torch.manual_seed(0)
    model = sd.fcn_resnet18(num_classes=5)
    reads = {}
    with fake_device() as dev:
        model = model.to(dev.device)
        trainer = torch.optim.SGD(model.parameters(), lr=0.01)
        for steps in (2, 6):
            batches = [sd.to_device(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                                    torch.randint(0, 5, (2, 32, 32), dtype=torch.uint8), dev.device)
                       for _ in range(steps)]
            dev.reset()
            sd.train_epoch(model, batches, sd.cross_entropy_loss, trainer,
                                augment=sd.batch_augment(cutmix=1.0))
            reads[steps] = dev.host_reads
            assert dev.uploads == 0
        dev.reset()
        sd.to_device(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 8, dtype=torch.uint8), dev.device)
        assert (dev.host_reads, dev.uploads) == (0, 2)          # the batch's two tensors, nothing more
    assert reads[2] == reads[6] <= 3, reads


def test_data_kept_on_the_device_is_cropped_there_without_waiting(demo_voc):
    with fake_device() as dev:
        train_iter, _ = sd.load_data_voc(4, (32, 64), data=demo_voc, num_workers=0, device=dev.device, on_device='on')
        list(train_iter)            # the first epoch puts the normalisation constants on the device
        train_iter.sampler.set_epoch(1)
        dev.reset()
        batches = list(train_iter)
        assert batches and (dev.host_reads, dev.uploads) == (0, 0), dev.reads


def test_the_unet_upsample_makes_its_matrices_on_the_device():
    with fake_device() as dev:
        x = torch.randn(1, 2, 11, 13).to(dev.device)
        dev.reset()
        sd.upsample2x(x)
        assert (dev.host_reads, dev.uploads) == (0, 0), 'interpolation_matrix copied from the host'


def test_the_confusion_matrix_on_the_device_equals_the_cpus():
    pred = torch.randint(0, 4, (2, 16, 20), generator=torch.Generator().manual_seed(1))
    target = blob_batch(2)[1]
    want = sd.ConfusionMatrix(4)
    want.update(pred, target)
    cm = sd.ConfusionMatrix(4)
    with fake_device() as dev:
        pred, target = pred.to(dev.device), target.to(dev.device)
        dev.reset()
        cm.update(pred, target)
        cm.update(pred, target)
        want.update(dev.value(pred), dev.value(target))
        assert dev.host_reads <= 2 and dev.uploads <= 1, dev.reads     # bincount's output size; the first zeros
        assert torch.equal(dev.value(cm.mat), want.mat) and str(cm.compute()) == str(want.compute())  # nan: absent


# ---------------------------------------------------------------------- the decisions a GPU machine makes
@pytest.mark.parametrize('capability, dtype', [((6, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_mixed_precision_type_by_compute_capability(capability, dtype, monkeypatch):
    """P100, T4 (Colab's) and V100 get fp16 with a GradScaler: cuDNN runs no bf16 convolutions below 8.0, whatever
    torch.cuda.is_bf16_supported() says (it counts emulation)."""
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: True)
    gpu = torch.device('cuda', 0)
    assert sd.amp_dtype(gpu) == dtype and sd.amp_dtype(gpu, False) is None
    assert sd.amp_dtype(torch.device('cpu')) is None and sd.amp_dtype(torch.device('cpu'), True) == torch.bfloat16


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda answering as on a machine with GPUs; the GPU made current is recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', current.append)
    return current


@pytest.mark.parametrize('name, local_rank, expected', [('cuda:1', None, 'cuda:1'), (None, '1', 'cuda:1'),
                                                        ('cuda', '1', 'cuda:1'), (None, None, 'cuda:0')])
def test_the_chosen_gpu_becomes_the_current_one(fake_gpus, monkeypatch, name, local_rank, expected):
    """Otherwise CUDA's context (hundreds of MB) lands on GPU 0 whatever --device says."""
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    if local_rank is not None:
        monkeypatch.setenv('LOCAL_RANK', local_rank)
    assert sd.pick_device(name) == torch.device(expected)
    assert fake_gpus == [torch.device(expected)]


@pytest.mark.parametrize('name, backend', [('cpu', 'gloo'), ('cuda', 'nccl')])
def test_torchruns_backend_follows_the_device(fake_gpus, monkeypatch, name, backend):
    """`--device cpu` on a GPU machine: gloo (DDP with nccl fails on CPU tensors)."""
    started = []
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda backend, **kwargs: started.append(backend))
    sd.setup_distributed(torch.device(name))
    assert started == [backend]


# --------------------------------------------------------------------------------- the matrices themselves
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_matrices_keep_rows_summing_to_one(dtype):
    """Rounded weight by weight, bf16 rows sum to 1 +- 0.002: a flat region comes out brighter or darker."""
    for n in (5, 13, 40, 121):
        exact, rounded = sd.interpolation_matrix(n), sd.interpolation_matrix(n, dtype)
        assert torch.equal(rounded.double().sum(1), torch.ones(2 * n, dtype=torch.float64))
        assert (rounded.double() - exact).abs().max() <= torch.finfo(dtype).eps / 4     # half a unit in [0.5, 1)
    flat = torch.full((1, 2, 40, 60), 0.7, dtype=dtype)
    assert torch.equal(sd.upsample2x(flat), torch.full((1, 2, 80, 120), 0.7, dtype=dtype))


def test_the_upsample_compiles_whole(monkeypatch):
    """Under --compile the matrices' cache is traced through, not used: they must be made with the graph's own ops
    (on its device), with no graph break."""
    monkeypatch.setattr(sd.Upsample2x, 'everywhere', True)
    x = torch.randn(1, 2, 7, 9, requires_grad=True)
    compiled = torch.compile(sd.Upsample2x(), backend='aot_eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), sd.upsample2x(x))
