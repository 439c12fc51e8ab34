"""--export-onnx: each model kind (FCN, ResNetUNet, DeepLabV3 with its aux head) exported by a predict script from a
checkpoint in our format, with no dataset anywhere; the file run by onnxruntime on batches and sizes the export never
saw, against PyTorch's prediction (within 1e-4 of the largest logit); one output, no aux weights, the book's layers;
the class table in its metadata; a read-only folder or a full disk leaving no partial file; the missing packages
named; and docs/onnx.md's program run with PyTorch unimportable.

The checkpoints hold untrained models with BatchNorm statistics drawn at random (so that folding them into the
convolutions is checked too), 5 classes that are not VOC's. Each model is exported once per module (the export
takes seconds); the write tests reuse the FCN's exported program. tests/mutations.py breaks each mechanism ('issue
26 item 3' there).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import some_define as sd
from test_faults import tmpfs  # noqa: F401 - the fixture
from test_reliability import MY_PREDICT, ORIGIN_PREDICT, one_error_line, run_inprocess

onnx = pytest.importorskip('onnx')      # tests/requirements.txt: pip install onnx onnxruntime onnxscript
onnxruntime = pytest.importorskip('onnxruntime')
ROOT = Path(__file__).resolve().parents[1]
CLASSES = sd.Classes(['background', 'road', 'tree', 'sky', 'car'],
                     [[0, 0, 0], [128, 64, 128], [107, 142, 35], [70, 130, 180], [0, 0, 142]])
# (model, the script that exports it): both scripts, every model kind
MODELS = {'fcn': ORIGIN_PREDICT, 'resnet_unet': MY_PREDICT, 'deeplabv3_resnet50': MY_PREDICT}
SHAPES = [(1, 3, 97, 131), (2, 3, 150, 75), (1, 3, 64, 96), (3, 3, 33, 47)]    # one of them multiples of 32
LINE = re.compile(r'max abs difference (\S+), relative (\S+)\)$')


def write_checkpoint(path, name):
    """A checkpoint as the training scripts write it, of an untrained model whose BatchNorms hold random statistics;
    DeepLabV3 with its aux head, as --aux-loss trains it."""
    torch.manual_seed(0)
    model_args = dict(name=name, num_classes=len(CLASSES.names), norm='batch', aux_loss=name.startswith('deeplab'))
    net = sd.build_model(**model_args)
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    config = dict(model=name, optimizer='adam', lr=1e-4, epochs=1, stage='train', demo=False, data_dir='no/data')
    sd.save_checkpoint(dict(epoch=1, history=[], model_args=model_args, num_classes=len(CLASSES.names),
                            model=net.state_dict(), config=config, classes=CLASSES._asdict()), path)
    return path


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    """export(model) -> the script's --export-onnx run in an empty folder, once per model: (work folder, checkpoint,
    .onnx file, the run, the program the exporter returned)."""
    done = {}

    def run(name):
        if name not in done:
            work = tmp_path_factory.mktemp(name)
            ckpt = write_checkpoint(work / 'model.pt', name)
            programs, real = [], torch.onnx.export
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.onnx, 'export', lambda *a, **k: programs.append(real(*a, **k)) or programs[-1])
                res = run_inprocess(MODELS[name], ['--checkpoint', ckpt, '--export-onnx', 'model.onnx'], work)
            assert res.code == 0, f'{res.err}\n{res.out[-3000:]}'
            done[name] = work, ckpt, work / 'model.onnx', res, programs[0]
        return done[name]
    return run


@pytest.fixture(params=MODELS)
def exported(request, export):
    return export(request.param)


@pytest.fixture
def cached_export(export, monkeypatch):
    """The FCN's checkpoint, and torch.onnx.export returning its program at once (the export is tested above)."""
    _, ckpt, _, _, program = export('fcn')
    monkeypatch.setattr(torch.onnx, 'export', lambda *a, **k: program)
    return ckpt


def test_onnxruntime_gives_pytorchs_logits_at_any_batch_and_size(exported):
    """Batches and sizes the export never saw (one a multiple of 32, which pads nothing) give PyTorch's scores as
    the predict scripts compute them: the image normalised, padded, run through the speed layers, cropped back."""
    _, ckpt, path, _, _ = exported
    net, _ = sd.load_model(ckpt, 'cpu')
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for k, shape in enumerate(SHAPES):
        image = torch.rand(shape, generator=torch.Generator().manual_seed(100 + k))
        with torch.no_grad():
            expected = sd.predict_scores(net, sd.normalize_image(image))
        got = torch.from_numpy(session.run(['logits'], {'image': image.numpy()})[0])
        assert got.shape == expected.shape == (shape[0], len(CLASSES.names)) + shape[2:]
        difference = float((got - expected).abs().max())
        assert difference <= 1e-4 * float(expected.abs().max()), (shape, difference)


def test_the_script_prints_the_difference_in_one_line_and_needs_no_dataset(exported):
    work, _, path, res, _ = exported
    assert res.err.strip() == '', res.err
    lines = [line for line in res.out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'wrote {Path("model.onnx")} '), res.out
    worst, relative = map(float, LINE.search(lines[0]).groups())
    assert 0 <= worst and 0 <= relative <= 1e-4
    assert sorted(p.name for p in work.iterdir()) == ['model.onnx', 'model.pt']       # nothing else read or written
    assert path.stat().st_size > 1e6


def test_one_input_one_output_all_dynamic_no_aux_head_and_the_books_layers(exported):
    """image (batch, 3, height, width) -> logits (batch, classes, H, W), all dynamic; DeepLabV3's aux head, in the
    checkpoint, is not in the file; the FCN upsamples with ONNX's ConvTranspose, not the speed layer's pixel shuffle."""
    _, ckpt, path, _, _ = exported
    model = onnx.load(str(path))
    dims = [[d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]
            for t in (*model.graph.input, *model.graph.output)]
    assert [t.name for t in model.graph.input] == ['image'] and [t.name for t in model.graph.output] == ['logits']
    # the output's sides come from the crop, which the exporter names by symbols of its own
    assert dims[0] == ['batch', 3, 'height', 'width'] and dims[1][:2] == ['batch', len(CLASSES.names)]
    assert all(isinstance(side, str) for side in dims[1][2:]), dims
    saved = sd.load_torch_file(ckpt)
    state = saved['model']
    assert not [i.name for i in model.graph.initializer if 'aux' in i.name]
    weights = sum(int(np.prod(i.dims)) for i in model.graph.initializer)     # BatchNorms folded: fewer
    assert weights <= sum(v.numel() for k, v in state.items() if not k.startswith('aux_classifier.'))
    ops = {node.op_type for node in model.graph.node}
    assert 'DepthToSpace' not in ops and 'MatMul' not in ops      # ShuffleConvTranspose2d's, Upsample2x's
    assert {'fcn': 'ConvTranspose', 'resnet_unet': 'Resize'}.get(saved['model_args']['name'], 'Conv') in ops


def test_the_class_table_is_in_the_metadata(exported):
    session = onnxruntime.InferenceSession(str(exported[2]), providers=['CPUExecutionProvider'])
    assert json.loads(session.get_modelmeta().custom_metadata_map['classes']) == CLASSES._asdict()


# --------------------------------------------------------------------------------- the write, and what is missing
def test_a_read_only_folder_leaves_nothing_and_says_so_in_one_line(cached_export, tmpfs, tmp_path):
    folder = tmpfs('1m', read_only=True)
    res = run_inprocess(MY_PREDICT, ['--checkpoint', cached_export, '--export-onnx', folder / 'm.onnx'], tmp_path)
    one_error_line(res, folder / 'm.onnx', 'Read-only file system', '--export-onnx')
    assert list(folder.iterdir()) == []


def test_a_full_disk_leaves_no_partial_file_and_the_old_one_whole(cached_export, tmpfs, tmp_path):
    """A disk with room for part of the file: one line, the file of that name from before whole, no temporary file."""
    folder = tmpfs('8m')
    old = folder / 'm.onnx'
    old.write_bytes(b'the earlier export')
    res = run_inprocess(ORIGIN_PREDICT, ['--checkpoint', cached_export, '--export-onnx', old], tmp_path)
    one_error_line(res, old, 'No space left on device')
    assert [p.name for p in folder.iterdir()] == ['m.onnx'] and old.read_bytes() == b'the earlier export'


def test_a_file_that_differs_from_pytorch_is_not_written(cached_export, tmp_path, monkeypatch):
    """Above 1e-4 of the largest logit (here: onnxruntime's logits taken as 1e-3 off), one line and no file."""
    monkeypatch.setattr(sd, 'onnx_difference', lambda session, model: (1e-3, 1.0))
    res = run_inprocess(MY_PREDICT, ['--checkpoint', cached_export, '--export-onnx', 'm.onnx'], tmp_path)
    one_error_line(res, 'differs from PyTorch', 'relative 1.00e-03', 'nothing written')
    assert not (tmp_path / 'm.onnx').exists()


@pytest.mark.parametrize('package', ['onnx', 'onnxruntime', 'onnxscript'])
def test_a_missing_package_is_named_with_the_pip_line(tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)       # what a failed import finds: ImportError
    res = run_inprocess(MY_PREDICT, ['--checkpoint', tmp_path / 'none.pt', '--export-onnx', 'm.onnx'], tmp_path)
    one_error_line(res, 'pip install onnx onnxruntime onnxscript')
    assert not (tmp_path / 'm.onnx').exists()


# ---------------------------------------------------------------------------------------------- the docs' program
def docs_program():
    """The python block of docs/onnx.md's "Without PyTorch" section."""
    text = (ROOT / 'docs' / 'onnx.md').read_text(encoding='utf-8')
    section = text.split('## Without PyTorch', 1)[1].split('\n## ', 1)[0]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_docs_program_segments_a_photo_without_pytorch(export, tmp_path):
    """docs/onnx.md's program, run by a Python where `import torch` fails, on a JPEG of an odd size: a palette PNG
    in the classes' colours whose indices are PyTorch's prediction."""
    _, ckpt, path, _, _ = export('fcn')
    (tmp_path / 'segment.py').write_text(docs_program())
    (tmp_path / 'no_torch').mkdir()
    (tmp_path / 'no_torch' / 'torch.py').write_text('raise ImportError("PyTorch is not installed here")\n')
    rng = np.random.default_rng(0)
    photo = tmp_path / 'photo.jpg'
    Image.fromarray(rng.integers(0, 256, (75, 101, 3), dtype=np.uint8)).save(photo, quality=90)
    out = tmp_path / 'photo_labels.png'
    proc = subprocess.run([sys.executable, 'segment.py', str(path), str(photo), str(out)], cwd=tmp_path,
                          env={'PYTHONPATH': str(tmp_path / 'no_torch'), 'PATH': '/usr/bin:/bin'},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(out))
    labels = Image.open(out)
    assert labels.mode == 'P' and labels.size == (101, 75)
    assert labels.getpalette()[:3 * len(CLASSES.colors)] == [v for c in CLASSES.colors for v in c]
    net, _ = sd.load_model(ckpt, 'cpu')
    expected = sd.predict(net, sd.read_image(photo)).numpy()
    assert (np.asarray(labels) == expected).mean() > 0.999      # ties at float rounding aside


def test_the_readmes_snippet_segments_a_photo_without_pytorch(export, tmp_path):
    """The README's python block (its "Big photos, and ONNX" section), run as written where `import torch` fails,
    beside my.onnx and photo.jpg: photo_labels.png holds PyTorch's prediction."""
    _, ckpt, path, _, _ = export('fcn')
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    section = text.split('## Big photos, and ONNX', 1)[1].split('\n## ', 1)[0]
    (tmp_path / 'snippet.py').write_text(re.search(r'```python\n(.*?)```', section, re.S).group(1))
    (tmp_path / 'my.onnx').write_bytes(path.read_bytes())
    (tmp_path / 'no_torch').mkdir()
    (tmp_path / 'no_torch' / 'torch.py').write_text('raise ImportError("PyTorch is not installed here")\n')
    photo = tmp_path / 'photo.jpg'
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 99, 3), dtype=np.uint8)).save(photo, quality=90)
    proc = subprocess.run([sys.executable, 'snippet.py'], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={'PYTHONPATH': str(tmp_path / 'no_torch'), 'PATH': '/usr/bin:/bin'})
    assert proc.returncode == 0, proc.stderr
    labels = np.asarray(Image.open(tmp_path / 'photo_labels.png'))
    net, _ = sd.load_model(ckpt, 'cpu')
    assert (labels == sd.predict(net, sd.read_image(photo)).numpy()).mean() > 0.999
