"""A fake accelerator for the tests: GPU-only code paths proven on the CPU.

    with fake_device() as dev:
        net = net.to(dev.device)                   # torch.device('meta'): not the CPU, as far as the code can tell
        X = torch.randn(2, 3, 32, 32).to(dev.device)
        net(X).sum().backward()
        assert dev.host_reads == 0, dev.reads      # device -> host transfers, each with op and caller
        dev.value(t)                               # t's values on the CPU, for assertions (not counted)

Each device tensor is a wrapper subclass whose device is `meta` and which holds a CPU tensor `elem` with the real
values. Inside the context a TorchDispatchMode sees every aten op: it runs the op on the elems, wraps the results,
and behaves like CUDA where CUDA differs from the CPU:
- a device tensor meeting a CPU tensor of ndim > 0 in one op raises (0-dim CPU tensors are scalars, as on CUDA;
  CPU index tensors in indexing are allowed, as on CUDA);
- host reads are counted: item/bool/int/float (_local_scalar_dense), .cpu()/.to('cpu')/tolist, copy_ into a CPU
  tensor, equal/allclose, and ops whose output shape depends on the values (nonzero, boolean-mask indexing and
  assignment, masked_select, unique, bincount, repeat_interleave without output_size): CUDA waits for the device;
- uploads (CPU -> device copies) are counted;
- a CPU generator drawing device tensors raises (CUDA: "Expected a 'cuda' device type for generator").

Why meta: a real device type the code cannot confuse with the CPU; the autograd engine runs it on the calling thread
(so the thread-local mode also sees backward); no backend has to be registered. Its traps, worked around here:
torch.tensor/as_tensor/new_tensor(data, device='meta') build an empty meta tensor with every mode disabled (a
TorchFunctionMode builds them on the CPU and uploads them); torch.autocast('meta', enabled=False) raises (a disabled
CPU autocast stands in); nn.init and load_state_dict skip or warn on `x.is_meta` (False here: it has values).
Not handled: in-place ops that change shape or strides (unsqueeze_, t_, resize_, out= of another size) raise
NotImplementedError; enabled autocast raises; no device generator exists (device draws use the global CPU RNG,
where CUDA has its own); .numpy() refuses, as on CUDA; torch.save writes CPU tensors (counted host reads);
x.is_cuda is False.
"""
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE, CPU = torch.device('meta'), torch.device('cpu')
aten = torch.ops.aten
# Ops that hand the host something computed from the values, so CUDA waits for the device: a Python number (item,
# bool, int, float; equal, allclose), or an output whose size depends on the values (CUDA copies a count or a maximum
# to the host before it can allocate the output).
HOST_READS = {aten._local_scalar_dense, aten.equal, aten.allclose, aten.nonzero, aten.masked_select, aten._unique,
              aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.bincount}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}     # args[1]: CPU indices allowed
CONSTRUCTORS = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class DeviceTensor(torch.Tensor):
    """A tensor on the fake device: metadata of its own (shape, strides, dtype, device meta), values in self.elem."""

    @staticmethod
    def __new__(cls, elem):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                storage_offset=elem.storage_offset(), device=DEVICE)
        t.elem = elem
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl     # no subclass-preserving Python layer
    # It has values: nn.init (trunc_normal_, orthogonal_, dirac_, eye_) would skip a meta tensor, load_state_dict warn.
    is_meta = property(lambda self: False)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f'{func}: a fake-device tensor used outside its fake_device() context')

    def __repr__(self):
        return f'DeviceTensor({self.elem!r})'

    def __reduce_ex__(self, proto):     # torch.save, pickle: a CPU tensor (meta would pickle the wrapper, no values)
        return self.detach().cpu().__reduce_ex__(proto)


class FakeDevice(TorchDispatchMode):
    """The context fake_device() returns: .device, .host_reads, .uploads, .reads [(op, caller)], reset(), value(t)."""

    def __init__(self):
        super().__init__()
        self.device = DEVICE
        self.reset()

    def reset(self):
        self.host_reads, self.uploads, self.reads = 0, 0, []

    @staticmethod
    def value(t):
        """The values of a device tensor (a CPU tensor itself passes through), not counted as a host read."""
        return t.elem.detach() if isinstance(t, DeviceTensor) else t

    def _read(self, op):
        self.host_reads += 1
        frame = sys._getframe(2)    # the first caller outside torch and this file: where the sync is in the code
        while frame and ('/torch/' in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        self.reads.append((op, f'{frame.f_code.co_filename}:{frame.f_lineno}' if frame else '?'))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ours = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, DeviceTensor)]
        to_device = kwargs.get('device') == DEVICE          # a factory, *_like or _to_copy aimed at the device
        if not ours and not to_device:
            return func(*args, **kwargs)                    # plain CPU work
        op, unwrap = func.overloadpacket, (lambda t: t.elem if isinstance(t, DeviceTensor) else t)
        if op is aten._to_copy:
            if kwargs.get('device') == CPU:                 # .cpu(), .to('cpu'), tolist: a plain CPU copy
                self._read(str(func))
                return func(unwrap(args[0]), **kwargs)
            if not ours:
                self.uploads += 1
            return DeviceTensor(func(unwrap(args[0]), **{**kwargs, 'device': CPU}))
        if op is aten.copy_:
            dst, src = args[:2]
            if isinstance(src, DeviceTensor) != isinstance(dst, DeviceTensor):
                if isinstance(dst, DeviceTensor):
                    self.uploads += 1
                else:
                    self._read(str(func))
            func(unwrap(dst), unwrap(src), *args[2:], **kwargs)
            return dst
        if ours:    # (zeros_like(cpu_tensor, device=meta) and its kind only read the CPU tensor's shape)
            self._check_devices(func, args[:1] + args[2:] if op in INDEXING else args, kwargs)
        generator = kwargs.get('generator')
        if generator is not None and generator.device.type == 'cpu':
            raise RuntimeError(f"Expected a 'meta' device type for generator but found 'cpu' ({func})")
        if op in HOST_READS or (op in INDEXING and any(  # a boolean mask: CUDA runs nonzero on it
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])) or (
                op is aten.repeat_interleave and kwargs.get('output_size') is None):
            self._read(str(func))
        if to_device:
            kwargs = {**kwargs, 'device': CPU}
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        mine = {id(t.elem): t for t in ours}
        return tree_map(lambda o: self._wrap(o, mine.get(id(o)), func), out)

    @staticmethod
    def _wrap(out, existing, func):
        """A tensor output, on the device. An input returned (in place, out=) keeps its wrapper, whose shape and
        strides were fixed at creation: an op that changed the elem's must raise, or later ops would see two shapes."""
        if not isinstance(out, torch.Tensor):
            return out
        if existing is None:
            return DeviceTensor(out)
        if existing.shape != out.shape or existing.stride() != out.stride():
            raise NotImplementedError(f'{func} changed the shape or strides of a fake-device tensor in place')
        return existing

    @staticmethod
    def _check_devices(func, args, kwargs):
        """CUDA refuses a CPU tensor with dimensions next to a device tensor; a 0-dim one it takes as a scalar."""
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor) and t.dim() > 0:
                raise RuntimeError('Expected all tensors to be on the same device, but found at least two devices, '
                                   f'meta and {t.device}! ({func}: a {t.device} tensor of shape {tuple(t.shape)})')


class _PythonLevel(TorchFunctionMode):
    """What never reaches the dispatcher: torch.tensor(data, device='meta') and its kind, built on the CPU, then
    uploaded (see the module's docstring); tolist, which refuses subclasses, on a CPU copy (a counted host read)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], DeviceTensor):
            return args[0].cpu().tolist()
        if func is torch.Tensor.__format__ and isinstance(args[0], DeviceTensor) and args[0].dim() == 0:
            return format(args[0].item(), args[1])     # f'{loss:.3f}': meta tensors refuse format specs
        if func in CONSTRUCTORS:
            default = args[0].device if func is torch.Tensor.new_tensor else None    # new_tensor: self's device
            device = kwargs.get('device', default)
            if device is not None and torch.device(device) == DEVICE:
                return func(*args, **{**kwargs, 'device': CPU}).to(DEVICE)
        return func(*args, **kwargs)


class _Autocast(torch.autocast):
    """torch.autocast('meta', enabled=False), which torch refuses (no autocast dtype for meta), as a disabled CPU one:
    the code's `torch.autocast(x.device.type, enabled=amp is not None)` runs; an enabled one still raises."""

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type == DEVICE.type and enabled:
            raise RuntimeError('autocast on the fake device is not supported')
        super().__init__('cpu' if device_type == DEVICE.type else device_type, dtype, enabled, cache_enabled)


class fake_device:
    """with fake_device() as dev: ... (see the module's docstring)."""

    def __enter__(self):
        self.dev, self.python_level = FakeDevice(), _PythonLevel()
        self.autocast, torch.autocast = torch.autocast, _Autocast
        self.python_level.__enter__()
        return self.dev.__enter__()

    def __exit__(self, *exc):
        self.dev.__exit__(*exc)
        self.python_level.__exit__(*exc)
        torch.autocast = self.autocast
