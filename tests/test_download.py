"""--download without the network: a local HTTP server (127.0.0.1, port 0, in a thread) serves a small VOC-shaped tar
made here, and each case passes its own checksums and a source list of 127.0.0.1 addresses. The server answers as
S3 and Apache do (206 for a Range, 416 for one at or past the end) and can be told to answer as the servers users
meet do (Handler's modes: a cut connection, a captive portal, a mirror that ignores Range, redirects, malformed
answers); it records the Range headers it saw. Every case checks what is left on disk afterwards, not only the
message."""
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
LOCK = f'{TAR}.lock'                # two --download runs take turns through it; it stays, empty
VAL_TXT = Path('VOCdevkit', 'VOC2012', 'ImageSets', 'Segmentation', 'val.txt')


def make_tar(extra=()):
    """A tar in VOC's layout (the real one's first member, the folder VOCdevkit/; split files; one 200 kB 'JPEG' of
    random bytes), then the `extra` members: (TarInfo, bytes or None) pairs."""
    files = {'VOCdevkit/': None, 'VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt': b'x\n',
             'VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt': b'x\n',
             'VOCdevkit/VOC2012/JPEGImages/x.jpg': random.Random(0).randbytes(200_000)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.type, info.size = (tarfile.DIRTYPE, 0) if data is None else (tarfile.REGTYPE, len(data))
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
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
    """GET /<mode>/<name>: the server's file `name`, served as `mode` says. As S3 and Apache do, a Range gets 206 with
    its Content-Range, one at or past the end 416. Modes: ok, 404, cutN (closes after byte N of the file), corrupt,
    norange (answers 200 and the whole file to a Range), stall (sends nothing for 3 s), hold (waits for
    server.release), 416 (answers every Range 416), badrange (206 with the whole file: Content-Range bytes 0-),
    redirectNNN (to /ok/ on another host name, localhost), portal (a captive portal: 200, text/html, no
    Content-Length), nolength, duplength (Content-Length: N, N as some proxies send), badlength (N, N+1), garbage (no
    HTTP status line), silent (closes without a word), chunkcut (HTTP/1.1 chunked, closed inside the chunk)."""

    def do_GET(self):
        mode, name = self.path.strip('/').split('/', 1)
        self.server.seen.append((self.path, self.headers.get('Range')))
        if mode.startswith('redirect'):
            self.answer(int(mode[8:]), Location=f'http://localhost:{self.server.server_address[1]}/ok/{name}')
            return
        if mode == 'portal':
            self.answer(200, PORTAL, **{'Content-Type': 'text/html; charset=utf-8', 'Content-Length': None})
            return
        if mode == '404' or name not in self.server.files:
            self.send_error(404)
            return
        if mode == 'stall':
            time.sleep(3)
        if mode == 'hold':
            self.server.release.wait(10)
        data = self.server.files[name]
        data = corrupt(data) if mode == 'corrupt' else data
        rng = self.headers.get('Range') if mode != 'norange' else None
        start = int(rng.removeprefix('bytes=').removesuffix('-')) if rng else 0
        if rng and (start >= len(data) or mode == '416'):
            self.answer(416, **{'Content-Range': f'bytes */{len(data)}'})
            return
        start = 0 if mode == 'badrange' else start
        end = int(mode[3:]) if mode.startswith('cut') else len(data)
        if mode in ('garbage', 'silent', 'chunkcut'):       # what no well-formed HTTP answer looks like
            self.wfile.write({'garbage': b'garbage\r\n', 'silent': b''}.get(
                mode, b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n' % len(data) + data[:1000]))
            return
        n = len(data) - start
        self.answer(206 if rng else 200, data[start:end], **{
            'Content-Range': f'bytes {start}-{len(data) - 1}/{len(data)}' if rng else None,
            'Content-Length': {'nolength': None, 'duplength': f'{n}, {n}', 'badlength': f'{n}, {n + 1}'}.get(mode, n)})

    def answer(self, status, body=b'', **headers):
        """Sends status, the headers that are not None (Content-Length: the body's unless given) and body."""
        self.send_response(status)
        for key, value in {'Content-Length': len(body), **headers}.items():
            if value is not None:
                self.send_header(key, str(value))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass        # the client gave up (a timeout): nothing to tell it

    def log_message(self, *args):
        pass


PORTAL = b'<!DOCTYPE html><html><head><title>Sign in</title></head><body>Accept the terms to go on.</body></html>\n'


@pytest.fixture
def server(monkeypatch):
    """The local server; server.url(mode) is the tar's address served that way."""
    for name in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.seen, srv.release = {TAR: GOOD}, [], threading.Event()
    srv.url = lambda mode='ok', name=TAR: f'http://127.0.0.1:{srv.server_address[1]}/{mode}/{name}'
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
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


def left(root):
    """What a download left in root, besides its empty lock file."""
    assert not (root / LOCK).exists() or (root / LOCK).stat().st_size == 0
    return sorted(p.name for p in root.iterdir() if p.name != LOCK)


def assert_unpacked(root):
    """The folder is in place, the tar stays with the right bytes, and nothing half-done is left."""
    assert (root / VAL_TXT).read_bytes() == b'x\n'
    assert (root / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / 'x.jpg').stat().st_size == 200_000
    assert (root / TAR).read_bytes() == GOOD
    assert left(root) == ['VOCdevkit', TAR]             # no .part, no scratch folder


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
    assert left(tmp_path) == []                         # no .part, no tar, no VOCdevkit

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
    assert left(tmp_path) == []


def test_a_stalled_source_times_out_and_the_next_is_used(tmp_path, server, monkeypatch):
    monkeypatch.setattr(sd, 'DOWNLOAD_TIMEOUT', 0.5)
    download(tmp_path, [server.url('stall'), server.url()])
    assert [path for path, _ in server.seen] == [f'/stall/{TAR}', f'/ok/{TAR}']
    assert_unpacked(tmp_path)


def test_a_server_that_ignores_range_restarts_the_download(tmp_path, server):
    part = tmp_path / f'{TAR}.part'
    part.write_bytes(GOOD[:1000])                   # an earlier run's start: appending the whole file would break it
    download(tmp_path, [server.url('norange')])
    assert server.seen == [(f'/norange/{TAR}', 'bytes=1000-')]
    assert_unpacked(tmp_path)


def test_a_half_folder_from_elsewhere_is_named_and_left_alone(tmp_path, server):
    (tmp_path / 'VOCdevkit' / 'VOC2012' / 'JPEGImages').mkdir(parents=True)
    line = fails(tmp_path, [server.url()])
    assert str(tmp_path / 'VOCdevkit' / 'VOC2012') in line and 'val.txt' in line
    assert server.seen == [] and left(tmp_path) == ['VOCdevkit']
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
    assert left(tmp_path) == [TAR]


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
    assert left(root) == [TAR]          # no VOCdevkit, no scratch folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data', 'outside']


def test_a_tar_without_voc2012_is_an_error_naming_it(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as tar:
        info = tarfile.TarInfo('something/else.txt')
        tar.addfile(info, io.BytesIO(b''))
    (tmp_path / TAR).write_bytes(buf.getvalue())
    line = fails(tmp_path, [], checksums_of(buf.getvalue()))
    assert str(tmp_path / TAR) in line and 'holds no VOCdevkit/VOC2012' in line
    assert left(tmp_path) == [TAR]


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
    assert left(tmp_path) == [TAR]      # no half VOCdevkit, no scratch folder
    download(tmp_path, [])                                          # space freed: the rerun unpacks it
    assert_unpacked(tmp_path)


@pytest.mark.parametrize('code', [errno.EACCES, errno.EROFS], ids=['EACCES', 'EROFS'])
def test_a_folder_that_refuses_writes_is_one_line_with_its_remedy(tmp_path, server, monkeypatch, code):
    def refuse(file, mode='r', *args, **kwargs):
        if mode in ('wb', 'ab'):
            raise OSError(code, os.strerror(code), str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(sd, 'open', refuse, raising=False)      # chmod does not stop root
    line = fails(tmp_path, [server.url()])
    assert line.startswith(f'cannot write {tmp_path / TAR}.part ({os.strerror(code)})')
    assert '--data-dir another folder' in line and 'kept' not in line
    assert not any(word in line for word in ('free', 'space', 'room'))    # no remedy for a full disk
    assert (f'make {tmp_path} writable' in line) == (code == errno.EACCES)
    assert len(server.seen) == 1 and left(tmp_path) == []


@pytest.mark.parametrize('below', [False, True], ids=['the-file', 'a-folder-in-it'])
def test_a_data_dir_that_is_a_file_is_named_as_one(tmp_path, server, below):
    file = tmp_path / 'VOC2012.zip'
    file.write_bytes(b'PK')
    line = fails(file / 'data' if below else file, [server.url()])
    assert line.startswith(f'cannot write {file}') and f'{file} is a file where a folder must be: move it' in line
    assert '--data-dir another folder' in line and not any(word in line for word in ('free', 'room', 'writable'))
    assert server.seen == [] and file.read_bytes() == b'PK' and list(tmp_path.iterdir()) == [file]


# ------------------------------------------------------------------------ the files and servers users really have
def voc_folder(path):
    """A VOC2012 folder a user already has (what find_voc_dir looks for)."""
    (path / 'ImageSets' / 'Segmentation').mkdir(parents=True)
    (path / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('x\n')
    return path


@pytest.mark.parametrize('where', ['data-dir-is-it', 'data-dir-holds-it', 'beside-the-scripts'])
def test_download_uses_the_dataset_already_there(tmp_path, server, monkeypatch, capsys, where):
    monkeypatch.setattr(sd.download_voc, '__defaults__', ([server.url()], checksums_of(GOOD)))
    monkeypatch.setattr(sd, 'HERE', tmp_path)
    monkeypatch.setattr(sd, 'DATA_DIR', tmp_path / 'data')
    voc = voc_folder(tmp_path / ('VOCdevkit' if where == 'beside-the-scripts' else '') / 'VOC2012')
    data_dir = {'data-dir-is-it': voc, 'data-dir-holds-it': tmp_path}.get(where)
    before = sorted(tmp_path.rglob('*'))
    data = sd.find_data('voc', data_dir=data_dir, download=True)
    assert data.root == voc and server.seen == []
    assert sorted(tmp_path.rglob('*')) == before                    # nothing fetched, unpacked or locked
    said = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(said) == 1 and str(voc) in said[0]


def test_a_web_page_answered_200_is_not_kept(tmp_path, server):
    line = fails(tmp_path, [server.url('portal')])                  # a captive portal: no Content-Length
    assert server.url('portal') in line and 'text/html' in line
    assert left(tmp_path) == []                         # no .part for a rerun to continue
    part = tmp_path / f'{TAR}.part'
    part.write_bytes(GOOD[:1000])
    fails(tmp_path, [server.url('portal')])                         # the page answers a Range: the .part stays whole
    assert server.seen[-1][1] == 'bytes=1000-' and part.read_bytes() == GOOD[:1000]

    part.unlink()
    download(tmp_path, [server.url('portal'), server.url()])
    assert server.seen[-1] == (f'/ok/{TAR}', None)
    assert_unpacked(tmp_path)


def test_a_part_that_is_a_web_page_is_not_continued(tmp_path, server):
    """A .part an earlier version kept from a captive portal: the rerun starts the tar from byte 0, not after it."""
    part = tmp_path / f'{TAR}.part'
    part.write_bytes(PORTAL)
    download(tmp_path, [server.url()])
    assert server.seen == [(f'/ok/{TAR}', None)]
    assert_unpacked(tmp_path)


@pytest.mark.parametrize('mode', ['nolength', 'duplength'])
def test_a_tar_without_or_with_a_duplicated_content_length_is_taken(tmp_path, server, mode):
    download(tmp_path, [server.url(mode)])
    assert_unpacked(tmp_path)


def test_http_errors_and_malformed_headers_move_on_to_the_next_source(tmp_path, server):
    bad = [server.url(mode) for mode in ('garbage', 'silent', 'chunkcut', 'badlength')]
    line = fails(tmp_path, bad)
    assert all(url in line for url in bad) and 'Content-Length' in line

    download(tmp_path, [*bad, server.url()])
    assert [path for path, _ in server.seen[-5:]] == [url.split(str(server.server_address[1]))[1] for url in
                                                      [*bad, server.url()]]
    assert_unpacked(tmp_path)


def test_a_body_of_another_length_than_the_tar_is_not_kept(tmp_path, server):
    server.files['other.tar'] = GOOD[:len(GOOD) // 2]              # another file, announced with its own length
    line = fails(tmp_path, [server.url('ok', 'other.tar')])
    assert f'serves {len(GOOD) // 2} bytes' in line and left(tmp_path) == []

    download(tmp_path, [server.url('ok', 'other.tar'), server.url()])
    assert server.seen[-2:] == [('/ok/other.tar', None), (f'/ok/{TAR}', None)]     # nothing of it to continue
    assert_unpacked(tmp_path)


@pytest.mark.parametrize('leftover', ['corrupt', 'longer'])
def test_a_complete_leftover_part_that_fails_is_deleted_and_the_first_source_used(tmp_path, server, capsys,
                                                                                   leftover):
    part = tmp_path / f'{TAR}.part'
    part.write_bytes(corrupt(GOOD) if leftover == 'corrupt' else GOOD + bytes(512))   # killed while checking it
    download(tmp_path, [server.url()])
    assert server.seen == [(f'/ok/{TAR}', None)]
    out = capsys.readouterr().out
    assert f'{part}' in out and 'deleted' in out and server.url() not in out    # the source is not blamed
    assert_unpacked(tmp_path)


def test_a_complete_good_part_is_not_asked_for_again(tmp_path, server):
    (tmp_path / f'{TAR}.part').write_bytes(GOOD)
    download(tmp_path, [server.url()])
    assert server.seen == []
    assert_unpacked(tmp_path)


@pytest.mark.parametrize('mode', ['416', 'badrange'])
def test_a_range_the_server_does_not_continue_starts_again_from_byte_0(tmp_path, server, mode):
    cut = len(GOOD) // 2
    (tmp_path / f'{TAR}.part').write_bytes(GOOD[:cut])
    download(tmp_path, [server.url(mode)])
    assert server.seen == [(f'/{mode}/{TAR}', f'bytes={cut}-'), (f'/{mode}/{TAR}', None)]
    assert_unpacked(tmp_path)


@pytest.mark.parametrize('code', [301, 302, 307])
def test_a_redirect_to_another_host_is_followed_and_resumed(tmp_path, server, code):
    cut = len(GOOD) // 2
    (tmp_path / f'{TAR}.part').write_bytes(GOOD[:cut])
    download(tmp_path, [server.url(f'redirect{code}')])
    assert server.seen == [(f'/redirect{code}/{TAR}', f'bytes={cut}-'), (f'/ok/{TAR}', f'bytes={cut}-')]
    assert_unpacked(tmp_path)


def test_two_downloads_of_one_folder_take_turns(tmp_path, server, monkeypatch):
    said, errors = [], []
    monkeypatch.setattr(sd, 'log', lambda *args, **kwargs: said.append(' '.join(map(str, args))))

    def run():
        try:
            download(tmp_path, [server.url('hold')])
        except Exception as err:        # noqa: BLE001 - reported by the test below
            errors.append(err)

    def wait_for(ready):
        deadline = time.monotonic() + 10
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)

    first, second = threading.Thread(target=run), threading.Thread(target=run)
    first.start()
    wait_for(lambda: server.seen)                   # the first is downloading
    second.start()
    wait_for(lambda: any('waiting' in line for line in said))
    server.release.set()
    first.join(20)
    second.join(20)
    assert errors == [] and len(server.seen) == 1   # the second found the first's work done
    assert sum('waiting' in line for line in said) == 1 and sum('unpacking' in line for line in said) == 1
    assert_unpacked(tmp_path)                       # one tar, no .part, the lock file empty


def test_the_checksums_cover_the_whole_file(tmp_path, server):
    big_member = tarfile.TarInfo('VOCdevkit/VOC2012/JPEGImages/big.jpg')
    big_member.size = 5 << 20
    big = make_tar([(big_member, random.Random(1).randbytes(big_member.size))])
    at = len(big) - (1 << 19)                       # in the last MiB, inside big.jpg
    server.files[TAR] = big[:at] + bytes([big[at] ^ 0xFF]) + big[at + 1:]
    line = fails(tmp_path, [server.url()], checksums_of(big))
    assert 'checksums' in line and 'md5' in line
    assert left(tmp_path) == []

    server.files[TAR] = big                         # several 1 MiB reads, resumed after a cut
    download(tmp_path, [server.url(f'cut{3 << 20}'), server.url()], checksums_of(big))
    assert server.seen[-1] == (f'/ok/{TAR}', f'bytes={3 << 20}-')
    assert (tmp_path / TAR).read_bytes() == big and (tmp_path / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / 'big.jpg'
                                                     ).stat().st_size == 5 << 20


def test_a_read_only_folder_is_one_line(tmp_path, server, monkeypatch):
    def read_only(file, mode='r', *args, **kwargs):
        if mode in ('wb', 'ab'):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(sd, 'open', read_only, raising=False)      # chmod does not stop root
    line = fails(tmp_path, [server.url()])
    assert line.startswith(f'cannot write {tmp_path / TAR}.part') and 'Permission denied' in line
    assert '--data-dir' in line and 'kept' not in line
    assert len(server.seen) == 1 and left(tmp_path) == []
