"""Shared by the test modules: the repository root on sys.path (so `import some_define` works from any cwd), the
tiny synthetic VOC dataset built once per session, the real-format samples in ../shared (skipped when absent,
as in a user's clone), and the GPU test mode: `python -m pytest tests --device cuda` runs the GPU tests
(test_gpu_path.py, test_device_audit.py) on the GPU with the defaults a user gets there; without the option they
run the GPU's path on the CPU."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import some_define  # noqa: E402


def pytest_addoption(parser):
    parser.addoption('--device', choices=('cpu', 'cuda'), default='cpu', help='cuda: run the GPU tests on the GPU, '
                     'with the defaults a user gets there (AMP, channels_last, data on the device, cudnn.benchmark); '
                     "cpu: run the GPU's path on the CPU (default: cpu)")


def pytest_configure(config):
    if config.getoption('--device') == 'cuda' and not torch.cuda.is_available():
        pytest.exit('--device cuda: PyTorch sees no CUDA GPU here, nothing was tested; without --device the tests '
                    "run on the CPU (the GPU's path included)", returncode=0)


@pytest.fixture(scope='session')
def device(request):
    """'cpu' or 'cuda' (--device): where the GPU tests run."""
    return request.config.getoption('--device')


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """Small CPU tensors gain nothing from several intra-op threads, and on a CPU shared with busy processes the
    threads wait for each other (test files ran 5x slower with 2 threads on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED = Path(__file__).resolve().parents[2] / 'shared'
VOC_SAMPLE = SHARED / 'voc_sample' / 'VOC2012'
CITYSCAPES_SAMPLE = SHARED / 'cityscapes_sample'


@pytest.fixture(scope='session')
def demo_voc(tmp_path_factory):
    """make_demo_voc with 12 train + 6 val images (a few of them smaller than a 64x96 crop): the VOC2012 folder."""
    root = tmp_path_factory.mktemp('demo') / 'VOC2012'
    return Path(some_define.make_demo_voc(root, num_train=12, num_val=6, seed=0))


@pytest.fixture(scope='session')
def voc_sample():
    """8 real VOC2012 pairs (split files: 5 train + 3 val) in ../shared, or a clean skip."""
    if not (VOC_SAMPLE / 'ImageSets' / 'Segmentation' / 'val.txt').exists():
        pytest.skip(f'no real VOC sample at {VOC_SAMPLE}')
    return VOC_SAMPLE


@pytest.fixture(scope='session')
def cityscapes_sample():
    """One real Cityscapes frame in the official layout in ../shared, or a clean skip."""
    if not (CITYSCAPES_SAMPLE / 'leftImg8bit').is_dir():
        pytest.skip(f'no Cityscapes sample at {CITYSCAPES_SAMPLE}')
    return CITYSCAPES_SAMPLE


def finish(proc, timeout=240):
    """Waits for a subprocess started with text pipes: (exit status, stdout, stderr); killed after timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err
