"""--download without the network: a local HTTP server (127.0.0.1, port 0, in a thread) serves a small VOC-shaped tar
made here, and each case passes its own checksums and a source list of 127.0.0.1 addresses. The server answers Range
requests and can be told to answer 404, cut the connection after N bytes, serve corrupt bytes, ignore Range or stall;
it records the Range headers it saw. Every case checks what is left on disk afterwards, not only the message."""
import errno
import hashlib
import http.server
import io
import os
import random
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest

import some_define as sd

TAR = sd.VOC_TAR
VAL_TXT = Path('VOCdevkit', 'VOC2012', 'ImageSets', 'Segmentation', 'val.txt')


def make_tar(extra=()):
    """A tar in VOC's layout (split files + one 200 kB 'JPEG' of random bytes), then the `extra` members:
    (TarInfo, bytes or None) pairs."""
    files = {'VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt': b'x\n',
             'VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt': b'x\n',
             'VOCdevkit/VOC2012/JPEGImages/x.jpg': random.Random(0).randbytes(200_000)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def checksums_of(data):
    return {'size': len(data), **{name: hashlib.new(name, data).hexdigest() for name in ('md5', 'sha256', 'sha1')}}


def corrupt(data):
    """The same bytes with one flipped in the middle (inside the random 'JPEG'): same size, other hashes."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


GOOD = make_tar()


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /<mode>/<name>: the server's file `name`, served as `mode` says: ok, 404, cutN (closes after byte N of
    the file), corrupt, norange (answers 200 to a Range request), stall (sends nothing for 3 s)."""

    def do_GET(self):
        mode, name = self.path.strip('/').split('/', 1)
        self.server.seen.append((self.path, self.headers.get('Range')))
        if mode == '404' or name not in self.server.files:
            self.send_error(404)
            return
        if mode == 'stall':
            time.sleep(3)
        data = self.server.files[name]
        data = corrupt(data) if mode == 'corrupt' else data
        rng = self.headers.get('Range')
        start = int(rng.removeprefix('bytes=').removesuffix('-')) if rng and mode != 'norange' else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.send_header('Content-Length', str(len(data) - start))
        self.end_headers()
        end = int(mode[3:]) if mode.startswith('cut') else len(data)
        try:
            self.wfile.write(data[start:end])
        except OSError:
            pass        # the client gave up (a timeout): nothing to tell it

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """The local server; server.url(mode) is the tar's address served that way."""
    for name in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.seen = {TAR: GOOD}, []
    srv.url = lambda mode='ok', name=TAR: f'http://127.0.0.1:{srv.server_address[1]}/{mode}/{name}'
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def closed_url():
    """An address where nothing listens: the connection is refused at once."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}/{TAR}'


def download(root, sources, checksums=None):
    sd.download_voc(root, sources=sources, checksums=checksums or checksums_of(GOOD))


def fails(root, sources, checksums=None):
    """The UserError line of a download that fails (one line, no traceback text)."""
    with pytest.raises(sd.UserError) as info:
        download(root, sources, checksums)
    line = str(info.value)
    assert '\n' not in line and 'Traceback' not in line
    return line


def assert_unpacked(root):
    """The folder is in place, the tar stays with the right bytes, and nothing half-done is left."""
    assert (root / VAL_TXT).read_bytes() == b'x\n'
    assert (root / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / 'x.jpg').stat().st_size == 200_000
    assert (root / TAR).read_bytes() == GOOD
    assert sorted(p.name for p in root.iterdir()) == ['VOCdevkit', TAR]     # no .part, no scratch folder


def test_first_sources_down_then_the_next_is_used(tmp_path, server):
    download(tmp_path, [closed_url(), server.url('404'), server.url()])
    assert_unpacked(tmp_path)
    assert [path for path, _ in server.seen] == [f'/404/{TAR}', f'/ok/{TAR}']
    download(tmp_path, [server.url()])                                  # done already: no request
    assert len(server.seen) == 2


def test_cut_half_way_keeps_the_part_and_the_rerun_resumes(tmp_path, server):
    cut = len(GOOD) // 2
    line = fails(tmp_path, [server.url(f'cut{cut}')])
    part = tmp_path / f'{TAR}.part'
    assert str(part) in line and 'kept' in line and f'{cut} of {len(GOOD)} bytes' in line
    assert part.read_bytes() == GOOD[:cut]
    assert not (tmp_path / 'VOCdevkit').exists() and not (tmp_path / TAR).exists()

    download(tmp_path, [server.url()])
    assert server.seen[-1] == (f'/ok/{TAR}', f'bytes={cut}-')
    assert_unpacked(tmp_path)


def test_a_cut_source_is_continued_by_the_next(tmp_path, server):
    cut = len(GOOD) // 3
    download(tmp_path, [server.url(f'cut{cut}'), server.url()])
    assert server.seen == [(f'/cut{cut}/{TAR}', None), (f'/ok/{TAR}', f'bytes={cut}-')]
    assert_unpacked(tmp_path)


def test_a_corrupt_file_is_deleted_and_the_next_source_tried(tmp_path, server):
    line = fails(tmp_path, [server.url('corrupt')])
    assert 'checksums' in line and 'md5' in line and 'sha256' in line and 'sha1' in line
    assert list(tmp_path.iterdir()) == []                           # no .part, no tar, no VOCdevkit

    download(tmp_path, [server.url('corrupt'), server.url()])
    assert [path for path, _ in server.seen] == [f'/corrupt/{TAR}', f'/corrupt/{TAR}', f'/ok/{TAR}']
    assert server.seen[-1][1] is None                               # the next source starts afresh
    assert_unpacked(tmp_path)


def test_every_source_down_lists_each_url_and_the_manual_step(tmp_path, server):
    sources = [closed_url(), server.url('404'), server.url('ok', 'other.tar')]
    line = fails(tmp_path, sources)
    for url in sources:
        assert url in line
    assert 'HTTP 404' in line and 'refused' in line.lower()
    assert checksums_of(GOOD)['md5'] in line and str(tmp_path / TAR) in line and '--data-dir' in line
    assert 'kept' not in line                                       # nothing arrived, so no .part to keep
    assert list(tmp_path.iterdir()) == []


def test_a_stalled_source_times_out_and_the_next_is_used(tmp_path, server, monkeypatch):
    monkeypatch.setattr(sd, 'DOWNLOAD_TIMEOUT', 0.5)
    download(tmp_path, [server.url('stall'), server.url()])
    assert [path for path, _ in server.seen] == [f'/stall/{TAR}', f'/ok/{TAR}']
    assert_unpacked(tmp_path)


def test_a_server_that_ignores_range_restarts_the_download(tmp_path, server):
    part = tmp_path / f'{TAR}.part'
    part.write_bytes(b'\0' * 1000)                  # bytes a continued download would wrongly keep
    download(tmp_path, [server.url('norange')])
    assert server.seen == [(f'/norange/{TAR}', 'bytes=1000-')]
    assert_unpacked(tmp_path)


def test_a_half_folder_from_elsewhere_is_named_and_left_alone(tmp_path, server):
    (tmp_path / 'VOCdevkit' / 'VOC2012' / 'JPEGImages').mkdir(parents=True)
    line = fails(tmp_path, [server.url()])
    assert str(tmp_path / 'VOCdevkit' / 'VOC2012') in line and 'val.txt' in line
    assert server.seen == [] and [p.name for p in tmp_path.iterdir()] == ['VOCdevkit']
    assert (tmp_path / 'VOCdevkit' / 'VOC2012' / 'JPEGImages').is_dir()


def test_a_user_placed_tar_is_used_without_any_request(tmp_path, server, monkeypatch):
    (tmp_path / TAR).write_bytes(GOOD)
    # through find_data, as the scripts call it (download_voc with its default sources and checksums)
    monkeypatch.setattr(sd.download_voc, '__defaults__', ([server.url()], checksums_of(GOOD)))
    data = sd.find_data('voc', data_dir=tmp_path, download=True)
    assert data.root == tmp_path / 'VOCdevkit' / 'VOC2012'
    assert server.seen == []
    assert_unpacked(tmp_path)


def test_a_user_placed_bad_tar_is_one_line_and_kept(tmp_path, server):
    bad = corrupt(GOOD)
    (tmp_path / TAR).write_bytes(bad)
    line = fails(tmp_path, [server.url()])
    assert str(tmp_path / TAR) in line and 'md5' in line and checksums_of(GOOD)['md5'] in line
    assert server.seen == []
    assert (tmp_path / TAR).read_bytes() == bad
    assert sorted(p.name for p in tmp_path.iterdir()) == [TAR]


def link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def regular(name):
    info = tarfile.TarInfo(name)
    info.size = 4
    return info, b'evil'


def device(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info, None


UNSAFE = {   # name: (the extra members, given the folder outside; the index of the one refused)
    'dotdot': (lambda outside: [regular('VOCdevkit/VOC2012/../../../outside/evil.txt')], 0),
    'absolute': (lambda outside: [regular(f'{outside}/evil.txt')], 0),
    'link-out': (lambda outside: [link('VOCdevkit/VOC2012/out', '../../../outside')], 0),
    'absolute-link': (lambda outside: [link('VOCdevkit/VOC2012/out', str(outside))], 0),
    'hard-link-out': (lambda outside: [link('VOCdevkit/VOC2012/h', '../outside/x', tarfile.LNKTYPE)], 0),
    'path-via-link': (lambda outside: [link('VOCdevkit/VOC2012/a', '..'), link('VOCdevkit/VOC2012/a/c', '../..'),
                                       regular('VOCdevkit/VOC2012/a/c/outside/evil.txt')], 1),
    'link-via-link': (lambda outside: [link('VOCdevkit/VOC2012/a', '..'),
                                       link('VOCdevkit/VOC2012/b', 'a/../..')], 1),
    'link-via-later-link': (lambda outside: [link('VOCdevkit/VOC2012/b', 'a/../..'),
                                             link('VOCdevkit/VOC2012/a', '..')], 0),
    'device': (lambda outside: [device('VOCdevkit/VOC2012/dev')], 0),
}


@pytest.mark.parametrize('filtered', [True, False], ids=['data-filter', 'own-check-only'])
@pytest.mark.parametrize('case', UNSAFE)
def test_a_tar_with_a_member_outside_is_refused_before_anything_is_written(tmp_path, server, monkeypatch, case,
                                                                          filtered):
    if not filtered:        # a Python without tarfile's data filter: our own member check alone
        monkeypatch.delattr(tarfile, 'data_filter', raising=False)
    root, outside = tmp_path / 'data', tmp_path / 'outside'
    outside.mkdir()
    members, refused = UNSAFE[case]
    members = members(outside)
    bad = make_tar(members)             # the bad member comes after the good ones
    server.files[TAR] = bad
    line = fails(root, [server.url()], checksums_of(bad))
    assert str(root / TAR) in line and repr(members[refused][0].name) in line
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in root.iterdir()) == [TAR]          # no VOCdevkit, no scratch folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data', 'outside']


def test_a_tar_without_voc2012_is_an_error_naming_it(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as tar:
        info = tarfile.TarInfo('something/else.txt')
        tar.addfile(info, io.BytesIO(b''))
    (tmp_path / TAR).write_bytes(buf.getvalue())
    line = fails(tmp_path, [], checksums_of(buf.getvalue()))
    assert str(tmp_path / TAR) in line and 'holds no VOCdevkit/VOC2012' in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [TAR]


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written (the bytes that fit land on disk)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.f.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_is_one_line_and_the_part_is_kept(tmp_path, server, monkeypatch):
    room = 70_000
    real_open = open
    with monkeypatch.context() as m:
        m.setattr(sd, 'open', lambda file, mode='r', *a, **k: (
            FullDisk(real_open(file, mode, *a, **k), room) if mode in ('wb', 'ab') else real_open(file, mode, *a, **k)),
            raising=False)
        line = fails(tmp_path, [server.url(), server.url()])
    part = tmp_path / f'{TAR}.part'
    assert line.startswith(f'cannot write {part}') and 'No space left' in line
    assert 'free some disk space' in line and '--data-dir' in line and 'kept' in line
    assert len(server.seen) == 1                                    # a full disk is no reason to try the next
    assert part.read_bytes() == GOOD[:room]

    # space freed: the rerun continues
    download(tmp_path, [server.url()])
    assert server.seen[-1][1] == f'bytes={room}-'
    assert_unpacked(tmp_path)


def test_a_disk_full_while_unpacking_leaves_no_half_folder(tmp_path, monkeypatch):
    (tmp_path / TAR).write_bytes(GOOD)
    real_makefile = tarfile.TarFile.makefile

    def full_after_one(self, tarinfo, targetpath):
        if any(tmp_path.rglob('*.txt')):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_makefile(self, tarinfo, targetpath)

    with monkeypatch.context() as m:
        m.setattr(tarfile.TarFile, 'makefile', full_after_one)
        line = fails(tmp_path, [])
    assert line.startswith('cannot write') and 'No space left' in line and f'{tmp_path / TAR} is kept' in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [TAR]      # no half VOCdevkit, no scratch folder
    download(tmp_path, [])                                          # space freed: the rerun unpacks it
    assert_unpacked(tmp_path)


def test_a_read_only_folder_is_one_line(tmp_path, server, monkeypatch):
    def read_only(file, mode='r', *args, **kwargs):
        if mode in ('wb', 'ab'):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(sd, 'open', read_only, raising=False)      # chmod does not stop root
    line = fails(tmp_path, [server.url()])
    assert line.startswith(f'cannot write {tmp_path / TAR}.part') and 'Permission denied' in line
    assert '--data-dir' in line and 'kept' not in line
    assert len(server.seen) == 1 and list(tmp_path.iterdir()) == []
