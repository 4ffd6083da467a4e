"""
Settings for every script, the nanoGPT way: a script's settings are its module globals, and

    python train.py config/toy_cpu.py --max_events=32 --device=cpu

first runs the config file(s) (plain Python that assigns some of those globals), then applies the
--key=value overrides. Values are parsed as Python literals (32, 3e-4, False, 'x'), falling back to a
plain string, so --device=cuda works without quotes; a string that begins with ~/ is in the home folder (bash leaves
a ~ after --key= as it is). Each script calls

    from configurator import configure
    config = configure(globals())

after its defaults. An unknown key or a value of the wrong type is an error that names the key,
the source and what was expected, never a silently ignored setting. --help (or -h) prints the script's docstring
and every setting with its value at that point (after the config files before it) and its comment in the script.
"""

import ast
import difflib
import os
import sys
import textwrap
import tokenize

SETTING_TYPES = (bool, int, float, str)


def setting_names(g):
    # a setting is any public global of a plain type; modules, functions and classes are not
    return [k for k, v in g.items() if not k.startswith('_') and isinstance(v, SETTING_TYPES)]


def _fail(msg):
    raise SystemExit(f"configurator: {msg}")


def _unknown(key, names, source):
    close = difflib.get_close_matches(key, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    if source.startswith('config file'):  # width = 64; t2_dim = 2 * width: a helper is private, or an unknown setting
        hint += f" (a helper variable of the file: name it _{key})"
    _fail(f"unknown setting '{key}' in {source}{hint}; settings are: {', '.join(sorted(names))}")


def _checked(key, value, default, source):
    # int -> float is the one promotion allowed (--learning_rate=1 means 1.0); bool is not an int here
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        _fail(f"setting '{key}' from {source} is {type(value).__name__} {value!r}, "
              f"expected {type(default).__name__} like the default {default!r}")
    return value


def _home(value):
    # bash expands a ~ that begins a word, not one after --out_dir= (nor does Python in a config file): such a path
    # made a folder named ~ in the working directory, and said it wrote to ~/out; a leading ~/ is the home folder
    if isinstance(value, str) and (value == '~' or value.startswith('~/')):
        return os.path.expanduser(value)
    return value


def setting_comments(path, names):
    """{setting: its comment in the script at path}: the comment on the line that assigns it at the top level and the
    indented comment lines right under it (how the scripts continue one), and {setting: the heading comment at the
    margin right above it} (# model, # optimizer: ...)."""
    comments, headings, key, heading = {}, {}, None, ''
    with open(path) as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                continue
            text = tok.string.lstrip('#').strip() if tok.type == tokenize.COMMENT else ''
            if tok.start[1] == 0:  # a new top-level statement or a heading ends the setting before it
                key, line = (tok.string, tok.start[0]) if tok.type == tokenize.NAME and tok.string in names else (None, 0)
                if key and heading:
                    headings[key] = heading
                heading = (heading + ' ' + text).strip() if tok.type == tokenize.COMMENT and text.strip('-') else ''
            elif tok.type == tokenize.COMMENT and key and (tok.start[0] == line or tok.line.lstrip().startswith('#')):
                comments[key] = (comments.get(key, '') + ' ' + text).strip()
    return comments, headings


def _help(g, names):
    script = os.path.basename(sys.argv[0] or g.get('__file__', 'script'))
    print(f"usage: python {script} [config.py ...] [--key=value ...]")
    print((g.get('__doc__') or '').strip('\n'))
    try:
        comments, headings = setting_comments(g['__file__'], names)
    except (KeyError, OSError, SyntaxError, tokenize.TokenError):
        comments, headings = {}, {}
    print("\nsettings (their values here include the config files before --help):")
    width = max(len(f"--{k}={g[k]!r}") for k in names)
    for k in names:
        if k in headings and not headings[k].startswith('settings'):  # the scripts' own '# settings' says nothing here
            print('\n'.join(textwrap.wrap(headings[k], 116, initial_indent='  # ', subsequent_indent='    ')))
        lines = textwrap.wrap(comments.get(k, ''), max(40, 116 - width)) or ['']
        print(f"  {f'--{k}={g[k]!r}':<{width}}  {lines[0]}".rstrip())
        for more in lines[1:]:
            print(f"  {'':<{width}}  {more}")
    raise SystemExit(0)


def read_config(path, names=()):
    """The settings a config file assigns: its public globals of a plain type (imports, functions and private
    helper variables, _width = 64, inside a config file are fine and left out), and any global named in names whatever its type (a setting assigned a
    pathlib.Path, None or a list is then named as the wrong type, not silently left out)."""
    try:
        with open(path) as f:
            code = f.read()
    except OSError as e:
        _fail(f"cannot read config file {path}: {e.strerror}")
    scope = {'__file__': path}  # so that a config can build on another beside it (config/toy_long.py)
    try:
        exec(compile(code, path, 'exec'), scope)
    except Exception as e:  # a typo in the file: its line, not a traceback through this module
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        _fail(f"config file {path} does not run: {type(e).__name__}: {getattr(e, 'msg', None) or e}{where}")
    return {k: v for k, v in scope.items() if not k.startswith('_') and (isinstance(v, SETTING_TYPES) or k in names)}


def configure(g, argv=None, names=None):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to globals g.
    names: the settings, where not every public global of a plain type is one (default setting_names(g)).
    Returns the dict of all settings after the overrides, for logging and checkpoints."""
    argv = sys.argv[1:] if argv is None else argv
    names = setting_names(g) if names is None else list(names)
    for arg in argv:
        if arg in ('--help', '-h'):
            _help(g, names)
        if not arg.startswith('--'):
            for key, value in read_config(arg, names).items():
                if key not in names:
                    _unknown(key, names, f"config file {arg}")
                g[key] = _home(_checked(key, value, g[key], f"config file {arg}"))
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                _fail(f"override '{arg}' must look like --key=value")
            if key not in names:
                _unknown(key, names, f"override {arg}")
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a bare word such as cuda or data/toy is a string
            if isinstance(g[key], str) and not isinstance(value, str):
                value = text  # --out_dir=123 is the folder '123'
            g[key] = _home(_checked(key, value, g[key], f"override {arg}"))
    return {k: g[k] for k in names}


def check_ranges(script, g, at_least=None, choices=None, below=None, more=(), above=None):
    """After configure: the script exits with one line naming each setting out of range (under its least value in
    at_least, not under its bound in below, not over its bound in above, not among its values in choices) and each
    problem in more (the script's own checks). A negative count or an unknown mode would otherwise end deep inside
    the run, or worse, run on and mean nothing."""
    problems = [f"{k}={g[k]!r} (at least {lo})" for k, lo in (at_least or {}).items() if not g[k] >= lo]  # NaN too
    problems += [f"{k}={g[k]!r} (below {hi})" for k, hi in (below or {}).items() if not g[k] < hi]
    problems += [f"{k}={g[k]!r} (above {lo})" for k, lo in (above or {}).items() if not g[k] > lo]
    problems += [f"{k}={g[k]!r} (one of {', '.join(map(repr, allowed))})" for k, allowed in (choices or {}).items()
                 if g[k] not in allowed]
    problems += list(more)
    if problems:
        raise SystemExit(f"{script}: error: setting out of range: {'; '.join(problems)}")


def check_device(script, device):
    """The device setting names a device this code runs on and this machine has, or the script exits with one line."""
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"{script}: error: device={device!r} is not a torch device ({(str(e).splitlines() or [''])[0]})") from None
    if dev.type not in ('cpu', 'cuda'):  # e.g. 'mps': its float64 reductions, autocast and attention paths are untried
        raise SystemExit(f"{script}: error: device={device!r}: this code runs on 'cpu' and 'cuda' only; use --device=cpu")
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"{script}: error: device={device!r}, but this torch finds no CUDA device; use --device=cpu")
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"{script}: error: device={device!r}, but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def lock_folder(script, path):
    """Claim folder path for this process alone, or exit with one line naming the process that holds it: an exclusive
    flock on path/lock, a file that records the holder (script, pid, host, start). Two processes writing one folder
    (a cluster job resubmitted while the first still runs, two people sharing an out_dir) moved each other's files
    into previous/, interleaved their checkpoints and logs, and deleted each other's half-built shards, without a
    word. The kernel drops the lock when its holder ends however it ends (SIGKILL too), so a lock file a dead process
    left is taken over. Returns the file descriptor: the lock lasts while it is open (close it to release; forked
    workers share it). A file system without locks (Lustre mounted without flock) gets a warning and no lock."""
    import fcntl
    import socket
    import time
    lock_path = os.path.join(path, 'lock')
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only folder (a shared data set, a read-only mount): was a traceback
        raise SystemExit(f"{script}: error: {lock_path}: cannot write into {path} ({e.strerror}); {script}.py writes "
                         f"there: give an out_dir you can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 500).decode(errors='replace').strip() or 'another process'
        os.close(fd)
        raise SystemExit(f"{script}: error: {path} is in use by {holder} (it holds {lock_path}); wait for it to end, "
                         f"or give another out_dir") from None
    except OSError as e:
        print(f"{script}: warning: cannot lock {lock_path} ({e.strerror}): nothing stops a second process from writing "
              f"into {path} at the same time", file=sys.stderr)
        return fd
    os.ftruncate(fd, 0)
    os.write(fd, f"{script}.py, pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd
