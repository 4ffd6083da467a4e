"""configurator.py: config files and --key=value overrides of a script's globals."""

import os

import pytest

from configurator import check_ranges, configure, read_config

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


@pytest.mark.parametrize('argv, message', [
    (['--batch_sise=3'], r"unknown setting 'batch_sise' in override --batch_sise=3 \(did you mean batch_size\?\)"),
    (['--batch_size=0.5'], r"setting 'batch_size' from override --batch_size=0.5 is float 0.5, expected int"),
    (['--compile=1'], r"setting 'compile' .* is int 1, expected bool"),
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
