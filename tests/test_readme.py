"""The README and docs/ hold to their word: every command they show for a script parses with that script's own
parser, every script's --help exits 0, the README's own-data demo runs (the first command runs in
test_scripts.py::test_the_readmes_first_command, which takes it from here), README.md stays short, and every
relative link points to a file (and heading) that exists."""
import contextlib
import functools
import io
import json
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

import some_define as sd

ROOT = Path(__file__).resolve().parents[1]
README, README_ZH = ROOT / 'README.md', ROOT / 'README.zh-CN.md'
DOCS = [README, README_ZH] + sorted((ROOT / 'docs').glob('*.md'))
SCRIPTS = ['origin_train.py', 'origin_predict.py', 'my_train.py', 'my_predict.py']
TOOLS = ['tests/benchmark.py', 'tests/mutations.py']
MAX_LINES = 250

FENCE = re.compile(r'^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$', re.M | re.S)
SCRIPT = re.compile(r'(?:^|/)(origin_train|origin_predict|my_train|my_predict|benchmark)\.py$')
SHELL_OPERATORS = {'&&', '||', ';', '|', '&', '>', '>>', '2>', '2>&1'}


def line_of(text, offset):
    return text.count('\n', 0, offset) + 1


def without_fences(text):
    """The text with every fenced block blanked (its newlines kept, so that line numbers still hold)."""
    return FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)


def shell_snippets(text):
    """(line number, shell text) of every fenced block's lines (backslash continuations joined) and every inline
    code span: where a reader copies a command from."""
    for block in FENCE.finditer(text):
        start = line_of(text, block.start(1))
        lines = block.group(1).split('\n')
        i = 0
        while i < len(lines):
            first, joined = i, lines[i]
            while joined.endswith('\\') and i + 1 < len(lines):
                i += 1
                joined = joined[:-1] + ' ' + lines[i]
            yield start + first, joined
            i += 1
    masked = without_fences(text)
    for span in re.finditer(r'`([^`\n]+)`', masked):
        yield line_of(masked, span.start()), span.group(1)


def script_commands(path):
    """[(line, script, args)]: every run of one of the scripts (or tests/benchmark.py) that the file shows, after
    `python`, `torchrun ...` or alone, cut at the shell's operators."""
    text = path.read_text(encoding='utf-8')
    found = []
    for line, snippet in shell_snippets(text):
        if not re.search(r'(?:^|[\s/])(?:origin_train|origin_predict|my_train|my_predict|benchmark)\.py\b', snippet):
            continue
        try:
            tokens = shlex.split(snippet, comments=True)
        except ValueError as err:
            found.append((line, snippet, err))      # a command that does not even split is reported as such
            continue
        segments, current = [], []
        for token in tokens + ['&&']:
            if token in SHELL_OPERATORS:
                segments.append(current)
                current = []
            else:
                current.append(token)
        for seg in segments:
            at = next((i for i, t in enumerate(seg) if SCRIPT.search(t)), None)
            if at is not None:
                name = SCRIPT.search(seg[at]).group(1) + '.py'
                found.append((line, 'tests/benchmark.py' if name == 'benchmark.py' else name, seg[at + 1:]))
    return found


@functools.lru_cache(maxsize=None)
def script_namespace(name):
    """The script's module globals, run under another name than __main__ (nothing but its definitions run)."""
    return runpy.run_path(str(ROOT / name), run_name='readme_' + Path(name).stem)


def parse_error(name, args):
    """None when the script's own parser accepts args, else its error line. The training scripts parse as they do
    when run (get_args: the --demo recipe and the flag checks included)."""
    if isinstance(args, Exception):
        return f'does not split into words: {args}'
    g = script_namespace(name)
    err, argv = io.StringIO(), sys.argv
    sys.argv = [name] + list(args)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if 'get_args' in g:
                g['get_args']()
            elif 'build_parser' in g:
                g['build_parser']().parse_args(args)
            else:
                g['parse_args'](args)
    except SystemExit as exit_:
        if exit_.code:
            return (err.getvalue().strip().splitlines() or [f'exit {exit_.code}'])[-1]
    except sd.UserError as error:
        return str(error)
    finally:
        sys.argv = argv
    return None


def first_command():
    """The README's first command, `pip install ... && python X.py ... && ...`: [(script, args)] of its runs."""
    block = FENCE.search(README.read_text(encoding='utf-8')).group(1).strip()
    assert block.startswith('pip install -r requirements.txt && '), block
    steps = block.split(' && ')[1:]
    runs = [shlex.split(step) for step in steps]
    assert runs and all(run[0] == 'python' and run[1] in SCRIPTS for run in runs), steps
    return [(run[1], run[2:]) for run in runs]


# ------------------------------------------------------------------------------------------------ (a) commands
@pytest.mark.parametrize('doc', DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_readme_commands_parse_with_each_scripts_parser(doc):
    bad = [f'{doc.name}:{line}: {name} {args if isinstance(args, Exception) else shlex.join(args)}: {error}'
           for line, name, args in script_commands(doc) if (error := parse_error(name, args))]
    assert not bad, '\n'.join(bad)


def test_readme_commands_are_found():
    """The check above is not vacuous: the README shows every script, several times, and the Chinese one too."""
    names = [name for _, name, _ in script_commands(README)]
    assert set(SCRIPTS) <= set(names) and len(names) >= 20, names
    assert set(SCRIPTS) <= {name for _, name, _ in script_commands(README_ZH)}
    assert 'tests/benchmark.py' in {name for _, name, _ in script_commands(ROOT / 'docs' / 'speed.md')}


def test_readme_parse_error_is_caught():
    """A flag no script has, a bad choice and a missing value are errors; the parsers are the scripts' own."""
    assert parse_error('my_train.py', ['--demo', 'folder', '--crop-size', '320', '480']) is None
    assert 'unrecognized arguments: --bogus' in parse_error('origin_predict.py', ['--eval', '--bogus'])
    assert 'invalid choice' in parse_error('my_train.py', ['--norm', 'layer'])
    assert 'expected one argument' in parse_error('tests/benchmark.py', ['--script-args', '--no-cudnn-benchmark'])


# --------------------------------------------------------------------------------------------------- (b) --help
@pytest.mark.parametrize('script', SCRIPTS + TOOLS)
def test_readme_every_script_help_exits_0(script, monkeypatch):
    """`python SCRIPT --help`, as __main__ in this process: exit status 0 and a usage line."""
    out = io.StringIO()
    monkeypatch.setattr(sys, 'argv', [str(ROOT / script), '--help'])
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name='__main__')
    assert exit_info.value.code in (0, None)
    assert out.getvalue().startswith('usage:'), out.getvalue()[:200]


# ------------------------------------------------------------------------------------------------ (c) the demos
def test_readme_first_command_is_the_demo_and_the_same_in_chinese():
    """Install, then the four scripts, the training ones with --demo; test_scripts.py runs exactly these flags
    (shortened by --epochs). The Chinese quick start gives the same line."""
    runs = first_command()
    assert [name for name, _ in runs] == SCRIPTS
    assert all('--demo' in args for name, args in runs if name.endswith('_train.py'))
    line = FENCE.search(README.read_text(encoding='utf-8')).group(1).strip()
    assert line in README_ZH.read_text(encoding='utf-8')


def test_readme_own_data_demo_runs(tmp_path, monkeypatch):
    """The README's `python my_train.py --demo folder` then `python my_predict.py --eval`, its flags as written plus
    one epoch of each stage, in a copy of the scripts (a 12 + 6 image demo written beforehand where --demo looks):
    it writes data/demo/folder with its classes.txt, trains on the folder's classes, and the evaluation names them."""
    from test_reliability import run_inprocess
    runs = [(name, args) for _, name, args in script_commands(README)]
    at = runs.index(('my_train.py', ['--demo', 'folder']))
    assert runs[at + 1] == ('my_predict.py', ['--eval']), runs[at:at + 2]
    app = tmp_path / 'clone'
    app.mkdir()
    for name in ['some_define.py'] + SCRIPTS:
        shutil.copy(ROOT / name, app / name)
    import importlib.util
    spec = importlib.util.spec_from_file_location('some_define', app / 'some_define.py')
    clone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clone)
    monkeypatch.setitem(sys.modules, 'some_define', clone)          # what the copied scripts import
    clone.make_demo_voc(clone.DEMO_DIR, num_train=12, num_val=6)
    train = run_inprocess(app / 'my_train.py', runs[at][1] + ['--epochs', '1', '--finetune-epochs', '1'], app)
    assert train.code == 0, train.err + train.out[-3000:]
    folder = app / 'data' / 'demo' / 'folder'
    assert (folder / 'classes.txt').read_text().split('\n')[0].split()[0] == 'background'
    ckpt = torch.load(app / 'checkpoints' / 'my_finetune.pt', weights_only=True)
    assert ckpt['config']['demo'] == 'folder' and Path(ckpt['config']['data_dir']) == folder
    names = list(clone.DEMO_FOLDER_CLASSES.names)
    assert ckpt['classes']['names'] == names
    predict = run_inprocess(app / 'my_predict.py', runs[at + 1][1], app)
    assert predict.code == 0, predict.err + predict.out[-3000:]
    table = predict.out[predict.out.index('my_finetune.pt on'):]
    assert all(re.search(rf'^{name}\s', table, re.M) for name in names), table
    results = json.loads((app / 'checkpoints' / 'my_finetune_results.json').read_text())
    assert results['class_names'] == names and results['images'] == 6


# ------------------------------------------------------------------------------------------------- (d) length
def test_readme_is_at_most_250_lines():
    lines = README.read_text(encoding='utf-8').count('\n')
    assert lines <= MAX_LINES, f'README.md has {lines} lines: move reference material to docs/'


# -------------------------------------------------------------------------------------------------- (e) links
def slugs(path):
    """The anchors GitHub makes of a markdown file's headings (outside code blocks)."""
    seen, out = {}, set()
    for heading in re.findall(r'^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$', without_fences(path.read_text(encoding='utf-8')),
                              re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f'{slug}-{n}')
    return out


def relative_links(path):
    """(line, target) of every markdown link and image outside code that has no scheme (http:, mailto:)."""
    text = without_fences(path.read_text(encoding='utf-8'))
    text = re.sub(r'`[^`\n]*`', lambda m: ' ' * len(m.group(0)), text)      # code spans hold no links
    for link in re.finditer(r'!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)', text):
        target = link.group(1)
        if not re.match(r'[a-zA-Z][a-zA-Z0-9+.-]*:', target):
            yield line_of(text, link.start()), target


@pytest.mark.parametrize('doc', DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_readme_relative_links_point_to_files(doc):
    bad = []
    for line, target in relative_links(doc):
        file, _, anchor = target.partition('#')
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f'{doc.name}:{line}: {target}: no such file')
        elif anchor and dest.suffix == '.md' and anchor not in slugs(dest):
            bad.append(f'{doc.name}:{line}: {target}: no heading #{anchor} in {dest.name}')
    assert not bad, '\n'.join(bad)


def test_readme_links_are_found():
    """The check above is not vacuous: the README links its picture, the Chinese README and every docs/ file."""
    targets = {target.partition('#')[0] for _, target in relative_links(README)}
    assert {'pictures/compare.png', 'README.zh-CN.md'} <= targets
    assert {f'docs/{p.name}' for p in (ROOT / 'docs').glob('*.md')} <= targets
