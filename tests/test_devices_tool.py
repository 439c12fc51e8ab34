"""tests/devices.py, the fake accelerator, does what GPU-only code needs proven on the CPU: it refuses CPU tensors
next to device tensors, computes the CPU's values, counts host reads and uploads; and it catches the project's own
device bugs that way (test_device_audit.py uses it on the project's code)."""
import copy
import io

import pytest
import torch
import torchvision
from torch.nn import functional as F

from devices import DeviceTensor, fake_device


def same_device_error():
    return pytest.raises(RuntimeError, match='Expected all tensors to be on the same device')


def test_cpu_tensor_with_dims_next_to_a_device_tensor_raises():
    with fake_device() as dev:
        x = torch.randn(2, 3).to(dev.device)
        assert x.device == dev.device and x.device.type != 'cpu'
        with same_device_error():
            x + torch.ones(3)                               # a forgotten device=
        with same_device_error():
            F.cross_entropy(torch.randn(2, 5, device=dev.device), torch.tensor([1, 4], device=dev.device),
                            weight=torch.ones(5))           # class weights left on the CPU
        g = torch.Generator().manual_seed(0)
        with same_device_error():
            x * torch.rand(2, 3, generator=g)               # a CPU draw combined with the device
        with pytest.raises(RuntimeError, match="device type for generator"):
            torch.rand(2, 3, generator=g, device=dev.device)
        # what CUDA allows: 0-dim CPU tensors as scalars, Python numbers drawn on the CPU, tensors made on x.device,
        # CPU index tensors
        y = x + torch.tensor(2.0) + float(torch.rand((), generator=g)) + torch.zeros(3, device=x.device)
        y = y + torch.ones_like(x) + x.new_zeros(3) + torch.tensor([1.0, 2.0, 3.0], device=x.device)
        assert type(y) is DeviceTensor and type(y[torch.tensor([1, 0])]) is DeviceTensor


def test_values_equal_the_cpu_ones():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    labels = torch.randint(0, 4, (2, 8, 8))
    labels[0, :2] = 255

    def compute(x, w, labels, device):
        scores = F.conv2d(x.contiguous(memory_format=torch.channels_last), w, padding=1)
        up = F.interpolate(scores, scale_factor=2, mode='bilinear', align_corners=True)
        loss = F.cross_entropy(scores, labels, weight=torch.arange(1.0, 5.0, device=device), ignore_index=255)
        pasted = x.clone()
        pasted[1, :, 2:5] = x[0, :, 4:7]                    # in-place slice assignment through views
        pasted[0][:, labels[0] == 3] = 0.5                  # a boolean mask
        kept = torch.where(labels == 255, torch.zeros_like(labels), labels)
        found = torch.nonzero(kept == 2)
        total = torch.zeros_like(x)
        assert torch.add(x, pasted, out=total) is total and total.mul_(2) is total     # out= and in place: same tensor
        return [scores, up, loss, pasted, kept.float(), found, torch.stack([x, x]), torch.cat([x, x]).long(),
                scores.softmax(1).to(torch.float64), total]

    expected = compute(x, w, labels, 'cpu')
    with fake_device() as dev:
        got = compute(*(t.to(dev.device) for t in (x, w, labels)), dev.device)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    for e, g in zip(expected, got):
        assert type(g) is DeviceTensor and torch.equal(dev.value(g), e)


def test_host_reads_and_uploads_are_counted():
    with fake_device() as dev:
        x = torch.tensor([[1.0, -2.0], [3.0, 4.0]], device=dev.device)
        assert (dev.uploads, dev.host_reads) == (1, 0)
        y = (x * 2 + 1).relu().sum(0) / x.abs().max()       # arithmetic: no read
        z = torch.zeros(3, 2, device=dev.device)
        z[1:] = x.flip(0)                                   # a copy within the device: neither
        z.copy_(torch.ones(3, 2))                           # from the CPU: an upload
        assert (dev.uploads, dev.host_reads) == (2, 0)
        counted = [lambda: x.sum().item(), lambda: x.tolist(), lambda: bool((x > 0).any()), lambda: x.nonzero(),
                   lambda: x[x > 0], lambda: int(y[0]), lambda: x.cpu(), lambda: x.unique(),
                   lambda: torch.allclose(x, y), lambda: f'{x.sum():.1f}', lambda: torch.save(x, io.BytesIO())]
        for i, read in enumerate(counted, 1):
            read()
            assert dev.host_reads == i, dev.reads
        assert dev.reads[0][1].endswith('test_devices_tool.py:' + str(counted[0].__code__.co_firstlineno))
        torch.ones(3).to(dev.device)
        assert dev.uploads == 3
        torch.sum(torch.ones(3), 0).item()                  # CPU work is not counted
        assert (dev.host_reads, dev.uploads) == (len(counted), 3)


@pytest.mark.parametrize('optimizer', [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
    lambda p: torch.optim.Adam(p, lr=0.01)], ids=['sgd', 'adam_foreach_false', 'adam_default'])
def test_resnet18_step_without_host_reads_equals_the_cpu_step(optimizer):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=3)
    X, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    on_cpu = copy.deepcopy(net)
    for model, device in ((on_cpu, None), (net, 'fake')):
        with fake_device() as dev:
            if device:
                model, X, y = model.to(dev.device), X.to(dev.device), y.to(dev.device)
                dev.reset()
            trainer = optimizer(model.parameters())
            for _ in range(2):      # the second step also uses the optimizer's state (momentum, Adam's moments)
                F.cross_entropy(model(X), y).backward()
                trainer.step()
                trainer.zero_grad()
            assert dev.host_reads == 0, dev.reads
            state = {name: dev.value(v) for name, v in model.state_dict().items()}
    assert all(isinstance(p, torch.nn.Parameter) and type(p) is DeviceTensor for p in net.parameters())
    assert all(type(v) is DeviceTensor for s in trainer.state.values() for k, v in s.items() if k != 'step')
    for name, value in on_cpu.state_dict().items():
        assert torch.equal(state[name], value), name


def test_modules_channels_last_no_grad_inference_mode_state_dict_init():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True))
    X = torch.randn(2, 3, 8, 8)
    expected = copy.deepcopy(net)(X)
    with fake_device() as dev:
        net = net.to(dev.device).to(memory_format=torch.channels_last)
        Xd = X.to(dev.device).contiguous(memory_format=torch.channels_last)
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        out = net(Xd)
        out.sum().backward()
        assert torch.allclose(dev.value(out), expected, atol=1e-6)
        with torch.no_grad():
            assert not net(Xd).requires_grad
        with torch.inference_mode():
            assert net(Xd).is_inference()
        assert dev.host_reads == 0, dev.reads
        fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(dev.device)
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(dev.value(fresh[0].weight), dev.value(net[0].weight))
        w = torch.nn.init.orthogonal_(torch.zeros(3, 3, device=dev.device))    # skipped if it looked like meta
        assert torch.allclose(dev.value(w @ w.T), torch.eye(3), atol=1e-5)
        saved = io.BytesIO()
        dev.reset()
        torch.save(net.state_dict(), saved)                 # as CPU tensors: one host read each
        assert dev.host_reads == len(net.state_dict()), dev.reads
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    assert type(loaded['0.weight']) is torch.Tensor and torch.equal(loaded['0.weight'], dev.value(net[0].weight))


def test_what_it_refuses():
    """Documented limits: each raises, none computes a wrong value quietly."""
    with fake_device() as dev:
        x = torch.zeros(2, 3, device=dev.device)
        with pytest.raises(NotImplementedError, match='changed the shape or strides'):
            x.unsqueeze_(0)                                 # the wrapper's shape could not follow
        with pytest.raises(RuntimeError, match='autocast on the fake device'):
            torch.autocast(dev.device.type, dtype=torch.bfloat16)
        with torch.autocast(dev.device.type, enabled=False):    # what the code does without amp: runs
            x + 1
        with pytest.raises(RuntimeError):
            x.numpy()                                       # as on CUDA: .cpu() first
    with pytest.raises(RuntimeError, match='outside its fake_device'):
        x + 1
