"""configurator.py: config files and --key=value overrides of a script's globals."""

import os

import pytest

from configurator import check_device, check_ranges, configure, read_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings():
    return {'batch_size': 16, 'learning_rate': 1e-3, 'compile': True, 'device': 'cpu', 'out_dir': 'out', 'np': object()}


def test_overrides_parse_literals_and_bare_words(tmp_path):
    g = settings()
    cfg = tmp_path / 'c.py'
    cfg.write_text("import math\nbatch_size = 64\nlearning_rate = 2 * math.pi\n")
    out = configure(g, [str(cfg), '--learning_rate=1', '--compile=False', '--device=cuda', '--out_dir=123'])
    assert g['batch_size'] == 64 and g['learning_rate'] == 1.0 and isinstance(g['learning_rate'], float)
    assert g['compile'] is False and g['device'] == 'cuda' and g['out_dir'] == '123'
    assert out == {k: g[k] for k in ['batch_size', 'learning_rate', 'compile', 'device', 'out_dir']}


def test_a_path_in_the_home_folder_is_expanded(tmp_path, monkeypatch):
    # bash leaves the ~ of --out_dir=~/runs as it is: train.py made a folder named ~ in the working directory
    monkeypatch.setenv('HOME', str(tmp_path))
    cfg = tmp_path / 'c.py'
    cfg.write_text("out_dir = '~/from_config'\n")
    g = settings()
    configure(g, [str(cfg)])
    assert g['out_dir'] == f"{tmp_path}/from_config"
    configure(g, ['--out_dir=~/runs/a b', '--device=~cuda'])
    assert g['out_dir'] == f"{tmp_path}/runs/a b" and g['device'] == '~cuda'  # only a leading ~/ (or ~ alone)
    configure(g, ['--out_dir=~'])
    assert g['out_dir'] == str(tmp_path)


@pytest.mark.parametrize('argv, message', [
    (['--batch_sise=3'], r"unknown setting 'batch_sise' in override --batch_sise=3 \(did you mean batch_size\?\)"),
    (['--batch_size=0.5'], r"setting 'batch_size' from override --batch_size=0.5 is float 0.5, expected int"),
    (['--compile=1'], r"setting 'compile' .* is int 1, expected bool"),
    (['--learning_rate=True'], r"setting 'learning_rate' .* is bool True, expected float"),  # int -> float only
    (['--batch_size=True'], r"setting 'batch_size' .* is bool True, expected int"),  # a bool is an int to isinstance
    (['--batch_size'], r"must look like --key=value"),
    (['no_such_config.py'], r"cannot read config file no_such_config.py"),
])
def test_bad_settings_are_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        configure(settings(), argv)


def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("batch_size = 8\nlearnin_rate = 0.1\n")
    with pytest.raises(SystemExit, match=r"unknown setting 'learnin_rate' in config file .*c\.py"):
        configure(settings(), [str(cfg)])


@pytest.mark.parametrize('text, message', [
    ("batch_size = 8\nlearning_rate = 1e-3 +\n", r"c\.py does not run: SyntaxError: invalid syntax \(line 2\)"),
    ("batch_size = 8\nout_dir = base + '-x'\n", r"c\.py does not run: NameError: name 'base' is not defined"),
])
def test_config_file_that_does_not_run(tmp_path, text, message):
    cfg = tmp_path / 'c.py'
    cfg.write_text(text)
    with pytest.raises(SystemExit, match=message):
        configure(settings(), [str(cfg)])


def test_ranges_are_checked_after_configure():
    g = {**settings(), 'mode': 'a'}
    check_ranges('x', g, at_least={'batch_size': 1}, choices={'mode': ('a', 'b')})  # in range: nothing
    g.update(batch_size=0, mode='c')
    with pytest.raises(SystemExit, match=r"^x: error: setting out of range: batch_size=0 \(at least 1\); mode='c' \(one of 'a', 'b'\)$"):
        check_ranges('x', g, at_least={'batch_size': 1}, choices={'mode': ('a', 'b')})
    g.update(lr=float('nan'))  # a config file can set float('nan'), which no comparison finds too small
    with pytest.raises(SystemExit, match=r"lr=nan \(at least 0.0\)"):
        check_ranges('x', g, at_least={'lr': 0.0})
    with pytest.raises(SystemExit, match=r"beta1=1.0 \(below 1\)$"):  # the bound itself is out: Adam's beta1 = 1 never moves
        check_ranges('x', {'beta1': 1.0}, below={'beta1': 1})
    with pytest.raises(SystemExit, match=r"E_MIN=0.0 \(above 0\)$"):  # nor for above (simulate.py: E_MIN over 0)
        check_ranges('x', {'E_MIN': 0.0}, above={'E_MIN': 0})


def test_config_builds_on_the_one_beside_it(tmp_path):
    """config/toy_long.py is config/toy_cpu.py with a longer budget: a config file knows its own path (__file__), so
    it can run another beside it, from any working directory, and then change some settings."""
    (tmp_path / 'base.py').write_text("batch_size = 64\nout_dir = 'out-base'\n")
    (tmp_path / 'long.py').write_text("import os\nexec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\n"
                                      "out_dir = 'out-long'\n")
    g = settings()
    configure(g, [str(tmp_path / 'long.py')])
    assert g['batch_size'] == 64 and g['out_dir'] == 'out-long'


def test_toy_long_is_toy_cpu_for_longer():
    cpu, long = (read_config(os.path.join(ROOT, 'config', f)) for f in ('toy_cpu.py', 'toy_long.py'))
    changed = {k for k in cpu if cpu[k] != long[k]}
    assert changed == {'out_dir', 'max_iters', 'max_minutes', 'eval_interval'} and long['max_minutes'] > cpu['max_minutes']


@pytest.mark.parametrize('line, message', [
    ("import pathlib\nout_dir = pathlib.Path('out-x')\n", r"setting 'out_dir' from config file .* is PosixPath .*expected str"),
    ("batch_size = None\n", r"setting 'batch_size' from config file .* is NoneType None, expected int"),
    ("batch_size = [64]\n", r"setting 'batch_size' from config file .* is list \[64\], expected int"),
])
def test_a_setting_of_another_type_in_a_config_file_is_an_error(tmp_path, line, message):
    """A config file that assigns a setting a value of no plain type is an error naming it, not a setting silently
    left at its default (helpers of other types under other names stay fine)."""
    cfg = tmp_path / 'c.py'
    cfg.write_text("helpers = [1, 2]\n" + line)
    with pytest.raises(SystemExit, match=message):
        configure(settings(), [str(cfg)])


def test_a_helper_variable_in_a_config_file_is_told_to_be_private(tmp_path):
    """width = 64; batch_size = width // 4: width is no setting, and the error says how to keep such a helper."""
    cfg = tmp_path / 'c.py'
    cfg.write_text("width = 64\nbatch_size = width // 4\n")
    with pytest.raises(SystemExit, match=r"unknown setting 'width' in config file .*\(a helper variable of the file: name it _width\)"):
        configure(settings(), [str(cfg)])
    cfg.write_text("_width = 64\nbatch_size = _width // 4\n")
    g = settings()
    configure(g, [str(cfg)])
    assert g['batch_size'] == 16


def test_help_lists_each_setting_with_its_value_and_comment(tmp_path, capsys):
    """--help prints the docstring, then every setting with its value after the config files before it, its comment
    (the indented comment lines under it too) and the heading above it; nothing after --help is applied or checked."""
    script = tmp_path / 'script.py'
    script.write_text('"""Do a thing."""\n'
                      'import os\n'
                      '# data: budgets per micro-batch\n'
                      "batch_size = 16    # events per batch, '#' inside a comment\n"
                      "device = 'cpu#0'  # a '#' inside a string is no comment\n"
                      '                  # and this line goes on the comment above\n'
                      'learning_rate = 1e-3\n'
                      '# a comment at the margin ends the one above\n'
                      'def f():\n'
                      '    batch_size = 3  # not the setting\n')
    g = {'__file__': str(script), '__doc__': 'Do a thing.', 'batch_size': 16, 'device': 'cpu#0',
         'learning_rate': 1e-3, 'os': os}
    cfg = tmp_path / 'c.py'
    cfg.write_text("batch_size = 64\n")
    with pytest.raises(SystemExit) as stop:
        configure(g, [str(cfg), '--help', '--no_such=1'])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert 'Do a thing.' in out and '# data: budgets per micro-batch' in out
    line = {x.split()[0]: x for x in out.splitlines() if x.startswith('  --')}
    assert line['--batch_size=64'].endswith("events per batch, '#' inside a comment")
    assert line["--device='cpu#0'"].endswith("a '#' inside a string is no comment and this line goes on the comment above")
    assert line['--learning_rate=0.001'].strip() == '--learning_rate=0.001'
    assert 'not the setting' not in out and 'ends the one above' not in out


def test_devices_named_that_this_code_or_machine_lacks(monkeypatch):
    """A device other than the CPU and CUDA (a Mac's 'mps' went on to a traceback from the first tensor moved there,
    or from train.py's float64 reductions), or a CUDA index past the machine's devices, is one line naming it."""
    import torch
    check_device('train', 'cpu')
    for device, why in (('mps', "device='mps': this code runs on 'cpu' and 'cuda' only; use --device=cpu"),
                        ('meta', "device='meta': this code runs on 'cpu' and 'cuda' only"),
                        ('gpu', "device='gpu' is not a torch device")):
        with pytest.raises(SystemExit, match=f"^train: error: {why}"):
            check_device('train', device)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match="this torch finds no CUDA device; use --device=cpu"):
        check_device('sample', 'cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    check_device('sample', 'cuda'), check_device('sample', 'cuda:1')
    with pytest.raises(SystemExit, match=r"device='cuda:2', but this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        check_device('sample', 'cuda:2')


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'prepare.py', 'simulate.py', 'bench.py'])
def test_every_script_answers_help(script):
    """python <script> -h exits 0 and lists the script's settings with their comments (it was read as a config file)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, script, '-h'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'settings (their values' in r.stdout and r.stdout.count('\n  --') >= 5
    assert {'train.py': 'whichever comes first', 'sample.py': "'' = the data_dir the model was trained on",
            'prepare.py': 'worker processes, one batch file each', 'simulate.py': 'largest pulse charge',
            'bench.py': 'the rows to run'}[script] in ' '.join(r.stdout.split())


def test_a_folder_that_cannot_be_written_is_named_by_lock_folder(tmp_path, monkeypatch):
    """lock_folder on a folder the user may only read (a read-only mount; emulated: the tests run as root) exits in
    one line naming the lock file, the folder and what to do; it was os.open's traceback (train.py and prepare.py)."""
    import errno
    from configurator import lock_folder

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(os, 'open', read_only)
    with pytest.raises(SystemExit, match=f"^train: error: {tmp_path}/lock: cannot write into {tmp_path} "
                                         f"\\(Read-only file system\\); train.py writes there: give an out_dir you can write$"):
        lock_folder('train', str(tmp_path))
