"""ImageNet weights files as users have them. torchvision's ResNet files (resnet18-f37072fd.pth, resnet50-0676ba61.pth,
resnet101-63fe2227.pth) are 2017 state dicts re-serialized in 2020 (pytorch/vision#2068): plain OrderedDicts of
tensors without any `*.num_batches_tracked` (resnet18: 102 entries, a fresh model's state_dict 122), which BatchNorm's
loading fills in. The stand-ins here are built from those facts (random values, the published keys and format, zip
and legacy serialization), never a fresh model's state_dict as it is.

A stand-in cannot hash to f37072fd: where a test needs the official name, it points torchvision's weights entry at a
name carrying the stand-in's own sha256 prefix (an address on a local 127.0.0.1 server), so the file is checked by
its name as the real one is. Every case runs offline, with the scripts' folder, the working folder and torch's cache
in tmp_path; the scripts run in this process with training replaced by a capture of the model it would train.
"""
import argparse
import contextlib
import hashlib
import http.server
import io
import runpy
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

import some_define as sd

MAIN = Path(__file__).resolve().parents[1]
PUBLISHED_ENTRIES = {'resnet18': 102, 'resnet50': 267, 'resnet101': 522}    # the fresh state_dict less its counters
URL18 = 'https://download.pytorch.org/models/resnet18-f37072fd.pth'
RESNET_CHILDREN = ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4')


# ----------------------------------------------------------------------------------------------------- stand-ins
def published(arch, seed=0):
    """A stand-in for torchvision's file: an OrderedDict of random tensors under the published names."""
    with torch.device('meta'):
        names = getattr(torchvision.models, arch)().state_dict()
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict((k, torch.randn(v.shape, generator=g)) for k, v in names.items()
                        if not k.endswith('.num_batches_tracked'))
    assert len(state) == PUBLISHED_ENTRIES[arch]
    return state


def save_named(obj, folder, stem, legacy=False):
    """obj saved as `<stem>-<first 8 hex digits of its sha256>.pth`, torchvision's naming: the path."""
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / 'staged.pth'
    torch.save(obj, staged, _use_new_zipfile_serialization=not legacy)
    path = folder / f'{stem}-{hashlib.sha256(staged.read_bytes()).hexdigest()[:8]}.pth'
    staged.rename(path)
    return path


def make_official(monkeypatch, arch, name, base='http://127.0.0.1:9/models'):
    """torchvision's entry for arch names `name` (the scripts look for and download that file)."""
    monkeypatch.setattr(sd.BACKBONE_WEIGHTS[arch].value, 'url', f'{base}/{name}')


def same_values(loaded, state):
    return loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


class RunsCode:
    """Unpickling it creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


@pytest.fixture
def places(tmp_path, monkeypatch):
    """The places the scripts look in, all under tmp_path and empty: here (the scripts' folder), cwd, cache (torch's
    hub checkpoints). Any download not pointed at the local server goes to a port where nothing listens."""
    here, cwd, home = tmp_path / 'here', tmp_path / 'work', tmp_path / 'torch_home'
    for folder in (here, cwd, home):
        folder.mkdir()
    monkeypatch.setattr(sd, 'HERE', here)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv('TORCH_HOME', str(home))
    for name in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.setenv(name, 'http://127.0.0.1:9')
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    monkeypatch.setenv('NO_PROXY', '127.0.0.1')
    cache = Path(torch.hub.get_dir()) / 'checkpoints'
    assert home in cache.parents, f'torch.hub.set_dir was called elsewhere: {cache}'
    return dict(here=here, cwd=cwd, cache=cache, tmp=tmp_path)


@pytest.fixture
def server():
    """A local HTTP server: GET /models/<name> answers server.files[name], else 404; server.seen lists the paths."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.seen.append(self.path)
            data = self.server.files.get(self.path.rsplit('/', 1)[1])
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.daemon_threads, srv.files, srv.seen = True, {}, []
    srv.base = f'http://127.0.0.1:{srv.server_address[1]}/models'
    threading.Thread(target=srv.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def refusal(arch='resnet18', weights_path=None):
    """The UserError line backbone_state_dict stops with."""
    with pytest.raises(sd.UserError) as info:
        sd.backbone_state_dict(arch, weights_path)
    line = str(info.value)
    assert '\n' not in line
    return line


# ------------------------------------------------------------------------------------ 1: the published files load
@pytest.mark.parametrize('place, legacy', [('flag', False), ('here', False), ('cwd', False), ('cache', False),
                                           ('flag', True), ('cache', True)])
def test_the_published_resnet18_loads_from_every_place(places, monkeypatch, place, legacy):
    state = published('resnet18')
    assert len(state) == 102 and not any(k.endswith('num_batches_tracked') for k in state)
    folder = places['tmp'] / 'elsewhere' if place == 'flag' else places[place]
    path = save_named(state, folder, 'resnet18', legacy)
    make_official(monkeypatch, 'resnet18', path.name)      # checked by the sha256 prefix in its name
    net = sd.resnet18_backbone(pretrained=True, weights_path=path if place == 'flag' else None)
    loaded = net.state_dict()
    assert same_values({k: v for k, v in loaded.items() if k in state}, state)
    assert all(loaded[k] == 0 for k in loaded if k.endswith('num_batches_tracked'))


@pytest.mark.parametrize('arch, place', [('resnet50', 'flag'), ('resnet101', 'here')])
def test_the_published_resnet50_and_101_load(places, monkeypatch, arch, place):
    """torchvision's own strict loading decides (on the meta device: no model to initialise)."""
    state = published(arch)
    path = save_named(state, places['tmp'] / 'elsewhere' if place == 'flag' else places[place], arch)
    make_official(monkeypatch, arch, path.name)
    loaded = sd.backbone_state_dict(arch, path if place == 'flag' else None)
    assert same_values(loaded, state)
    with torch.device('meta'):
        net = getattr(torchvision.models, arch)()
    net.load_state_dict(loaded, assign=True)        # strict: every name and shape


def backbone_of(net, model):
    """The resnet inside the model, by the resnet's own names."""
    if model == 'fcn':      # the book's nn.Sequential: the resnet's children minus avgpool and fc, then its own
        children = zip(RESNET_CHILDREN, net.children())
    else:
        children = (net.base_model if model == 'resnet_unet' else net.backbone).named_children()
    return {f'{name}.{k}': v for name, child in children for k, v in child.state_dict().items()}


def run_script(script, args, monkeypatch):
    """`python script args` in this process, the training replaced by a capture of the net it gets: (exit status,
    stderr, the net or None)."""
    captured = []
    monkeypatch.setattr(sd, 'train_ch13', lambda net, *rest, **kw: captured.append(net))
    monkeypatch.setattr('sys.argv', [str(script)] + [str(a) for a in args])
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(str(script), run_name='__main__')
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue(), (captured[0] if captured else None)


@pytest.mark.parametrize('script, model, place', [('origin_train.py', 'fcn', 'cwd'),
                                                  ('my_train.py', 'resnet_unet', 'flag'),
                                                  ('my_train.py', 'deeplabv3_resnet50', 'cache')])
def test_training_starts_from_the_files_values(places, monkeypatch, demo_voc, script, model, place):
    arch = 'resnet50' if model == 'deeplabv3_resnet50' else 'resnet18'
    state = published(arch, seed=1)
    path = save_named(state, places['tmp'] / 'elsewhere' if place == 'flag' else places[place], arch)
    make_official(monkeypatch, arch, path.name)
    args = ['--data-dir', demo_voc, '--batch-size', 2, '--crop-size', 32, 64, '--workers', 0]
    args += ['--model', model, '--finetune-epochs', 0] if script == 'my_train.py' else []
    code, err, net = run_script(MAIN / script, args + (['--backbone-weights', path] if place == 'flag' else []),
                                monkeypatch)
    assert code in (0, None) and net is not None, err
    loaded = backbone_of(net, model)
    used = {k: v for k, v in state.items() if k in loaded}
    assert set(state) - set(used) == (set() if model == 'resnet_unet' else {'fc.weight', 'fc.bias'})
    assert same_values({k: loaded[k] for k in used}, used)


def test_a_weights_file_named_with_demo_is_used(monkeypatch):
    """--demo trains from scratch by default; a --backbone-weights FILE on the same command line means that file."""
    parser = argparse.ArgumentParser()
    sd.add_data_args(parser)
    sd.add_recipe_args(parser, 1, 0.1, 0.0, 2, [32, 32], 'x.pt', {'pretrained': False})
    monkeypatch.setattr(sys, 'argv', ['x.py', '--demo', '--backbone-weights', 'resnet18-f37072fd.pth'])
    assert sd.parse_with_demo(parser, {'pretrained': False}).pretrained
    monkeypatch.setattr(sys, 'argv', ['x.py', '--demo'])
    assert not sd.parse_with_demo(parser, {'pretrained': False}).pretrained
    monkeypatch.setattr(sys, 'argv', ['x.py', '--backbone-weights', 'w.pth', '--no-pretrained'])
    with pytest.raises(sd.UserError, match='contradict'):
        sd.parse_with_demo(parser, {'pretrained': False})


# ---------------------------------------------------------------------------- 2: nothing runs code while loading
def test_the_download_is_the_published_file_read_safely(places, monkeypatch, server):
    state = published('resnet18')
    path = save_named(state, places['tmp'] / 'served', 'resnet18')
    server.files[path.name] = path.read_bytes()
    make_official(monkeypatch, 'resnet18', path.name, server.base)
    assert same_values(sd.backbone_state_dict('resnet18'), state)
    assert sorted(p.name for p in places['cache'].iterdir()) == [path.name]     # cached whole, nothing partial
    assert same_values(sd.backbone_state_dict('resnet18'), state) and len(server.seen) == 1     # from the cache


@pytest.mark.parametrize('case', ['runs_code', 'wrong_bytes'])
def test_a_download_that_is_not_weights_stops_in_one_line(places, monkeypatch, server, case):
    """A pickle under a name carrying its own sha256 prefix passes the download's hash check: it must still never
    run (torch.hub's loader unpickles with weights_only=False). Bytes that do not hash to the name's prefix are not
    kept."""
    marker = places['tmp'] / 'pwned'
    path = save_named({'conv1.weight': RunsCode(marker)}, places['tmp'] / 'served', 'resnet18')
    name = path.name if case == 'runs_code' else 'resnet18-00000000.pth'
    server.files[name] = path.read_bytes()
    make_official(monkeypatch, 'resnet18', name, server.base)
    line = refusal()
    assert not marker.exists(), 'the pickle ran its code'
    if case == 'runs_code':
        assert 'weights_only=True' in line and str(places['cache'] / name) in line and '--no-pretrained' in line
    else:
        assert server.base in line and '--no-pretrained' in line
        assert not places['cache'].exists() or not any(places['cache'].iterdir())


# -------------------------------------------------------------------- 3: the name check only on torchvision's names
@pytest.mark.parametrize('name', ['resnet18-20240115.pth', 'imagenet-ft-deadbeef01.pth'])
def test_a_users_file_name_is_no_hash(places, name):
    state = published('resnet18')
    path = places['tmp'] / name
    torch.save(state, path)
    assert same_values(sd.backbone_state_dict('resnet18', path), state)


@pytest.mark.parametrize('place', ['cwd', 'flag'])
def test_a_folder_under_the_official_name_is_one_line(places, monkeypatch, demo_voc, place):
    folder = places['cwd'] / 'resnet18-f37072fd.pth'
    folder.mkdir()
    args = ['--data-dir', demo_voc, '--batch-size', 2, '--crop-size', 32, 64, '--workers', 0]
    code, err, _ = run_script(MAIN / 'origin_train.py', args + (['--backbone-weights', folder] if place == 'flag'
                                                                 else []), monkeypatch)
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1, err
    assert 'is a folder' in lines[0] and 'resnet18-f37072fd.pth' in lines[0] and '--no-pretrained' in lines[0]


def test_a_random_resnet18_under_the_official_name_is_refused(places):
    torch.save(published('resnet18'), places['cwd'] / 'resnet18-f37072fd.pth')
    line = refusal()
    assert 'is not the file its name says' in line and 'f37072fd' in line


@pytest.mark.parametrize('case', ['python_objects', 'truncated'])
def test_a_bad_weights_file_is_spoken_of_as_weights(places, case):
    path = places['tmp'] / 'my_weights.pth'
    if case == 'python_objects':
        torch.save({'conv1.weight': RunsCode(places['tmp'] / 'pwned')}, path)
    else:
        torch.save(published('resnet18'), path)
        path.write_bytes(path.read_bytes()[:100_000])
    line = refusal(weights_path=path)
    assert line.startswith(str(path)) and line.endswith(f"pass torchvision's {URL18.rsplit('/', 1)[1]} ({URL18}), "
                                                        'or --no-pretrained')
    assert 'weights_only=True' in line if case == 'python_objects' else 'not a readable resnet18 weights file' in line
    assert not (places['tmp'] / 'pwned').exists()
