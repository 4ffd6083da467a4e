"""Tests for train.py and sample.py on a tiny simulated data set: the loss goes down, checkpoints are
written and resumed at the same iteration, a NaN loss stops the run, DDP (gloo, 2 CPU processes) keeps
the ranks' parameters identical and evaluates as one process does, sample.py writes its results and refuses a bad
checkpoint in one line; SIGTERM stops a run that resumes to the weights of an uninterrupted one, a damaged checkpoint
falls back to an earlier one."""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import classical
import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--compile=False', '--t1_dim=16', '--t1_layers=1', '--t1_heads=2', '--t2_dim=32', '--t2_layers=2',
        '--t2_heads=2', '--max_pulses=8192', '--max_doms=4096', '--max_events=64', '--max_pulses_per_dom=16',
        '--eval_events=100', '--log_interval=1', '--warmup_iters=2', '--learning_rate=3e-3', '--min_lr=3e-4']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    import simulate
    d = tmp_path_factory.mktemp('tiny')
    simulate.simulate(out_dir=str(d / 'raw'), n_train_batches=2, n_test_batches=1, events_per_batch=40, seed=7)
    prepare.run(str(d / 'raw'), str(d / 'packed'), val_batches=1, num_proc=1, log=lambda *a: None)
    return str(d / 'packed')


# train.py and sample.py run by run() in this process (run_here), as a fresh `python train.py ...` would run them: a
# new process spent about 3 s importing torch (with the dynamo that torch.optim imports), and the suite starts some
# ninety. ICEAGGR_TESTS_IN_PROCESS=0 gives every run a process of its own.
IN_PROCESS = os.environ.get('ICEAGGR_TESTS_IN_PROCESS', '1') != '0'


def run(args, cwd=ROOT, check=True, torchrun=False, threads=1):
    """`python <args>` from cwd (under torchrun with 2 ranks) -> its stdout, stderr and exit status; with check, a
    failure raises with the output's tail."""
    if IN_PROCESS and not torchrun and cwd == ROOT and args[0] in ('train.py', 'sample.py'):
        p = run_here(args, threads)
    else:
        p = run_process(args, cwd, torchrun, threads)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(p.args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def run_process(args, cwd, torchrun, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    # torchrun without --log_dir makes a /tmp/torchelastic_* folder for its ranks' error files and never removes it:
    # one more in /tmp for each torchrun test, every suite. A temporary one here goes with the run
    with tempfile.TemporaryDirectory(prefix='torchrun_logs_') as logs:
        cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', f'--log_dir={logs}']
               if torchrun else [sys.executable]) + args
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # torchrun's workers too, should they hang
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_here(args, threads=1):
    """`python <args>` (train.py or sample.py) in this process: its stdout, stderr and exit status (1 and the traceback
    for an uncaught exception, as Python gives them), with what the process's end would release released (the folder
    locks it holds, its loaders' threads and workers) and the process-wide settings it made put back (signal handlers,
    torch threads, the switch interval, warning filters)."""
    import contextlib
    import gc
    import io
    import runpy
    import traceback
    import warnings
    import configurator
    out, err, locks, loaders = io.StringIO(), io.StringIO(), [], []
    lock_folder, loader_init = configurator.lock_folder, prepare.BatchLoader.__init__

    def locked(*a):
        fd = lock_folder(*a)
        locks.append((fd, os.fstat(fd).st_ino))
        return fd

    def loader_made(self, *a, **k):
        loader_init(self, *a, **k)  # (one that refuses its arguments started nothing)
        loaders.append(self)
    argv, torch_threads, switch = sys.argv, torch.get_num_threads(), sys.getswitchinterval()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    configurator.lock_folder, prepare.BatchLoader.__init__ = locked, loader_made
    sys.argv, code = list(args), 0
    torch.set_num_threads(threads)
    try:
        # the warnings a new process shows, on its stderr (pytest would otherwise record them for itself): Python's
        # default filters, under which a DeprecationWarning shows only from __main__ (on Python 3.12+ the suite's
        # threads made each fork of a loader worker warn from multiprocessing, which a new process does not show)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.filterwarnings('default', category=DeprecationWarning, module='__main__')
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter('ignore', category, append=True)
            warnings.showwarning = lambda *w: sys.stderr.write(warnings.formatwarning(*w[:4]))
            try:
                runpy.run_path(os.path.join(ROOT, args[0]), run_name='__main__')
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:  # sys.exit(message): Python prints the message and exits with 1
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:  # (a KeyboardInterrupt goes on up: the suite's Ctrl-C)
                traceback.print_exc()
                code = 1
    finally:
        for loader in loaders:
            loader.close()
        for fd, inode in locks:  # unless the script closed it (train.py does at its end) and the number was reused
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == inode:
                    os.close(fd)
        configurator.lock_folder, prepare.BatchLoader.__init__ = lock_folder, loader_init
        sys.argv = argv
        torch.set_num_threads(torch_threads)
        sys.setswitchinterval(switch)
        for s, h in handlers.items():
            signal.signal(s, h)
        gc.collect()  # the splits' open shard files sit in reference cycles: closed here, as at a process's end
    if code == 128 + signal.SIGINT:  # a Ctrl-C of the suite, which the script's handler took: the suite stops
        raise KeyboardInterrupt
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def losses(out):
    return [float(x) for x in re.findall(r'^iter \d+: loss ([-\d.]+)', out, re.M)]


def test_train_checkpoint_resume_and_sample(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=40', '--eval_interval=20']
            + TINY)
    assert 'parameters' in p.stdout and 'attention sdpa' in p.stdout
    # the shape trained, named: an edited default of train.py that a config file sets too does nothing
    assert 'T1 16 wide x 1 deep' in p.stdout and 'T2+head 32 wide x 2 deep' in p.stdout
    ls = losses(p.stdout)
    assert len(ls) == 40
    # 40 training events, all in every micro-batch: starts near log(4 pi) = 2.53 and goes down
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.1, ls
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ck['iter_num'] == 40 and ck['model_args']['t2_dim'] == 32 and 'optimizer' in ck
    assert ck['model_sha1'] == hashlib.sha1(open(os.path.join(ROOT, 'model.py'), 'rb').read()).hexdigest()
    assert os.path.exists(os.path.join(out, 'best.pt'))
    assert not any(f.endswith('.tmp') for f in os.listdir(out))

    # the checkpoint holds the averaged weights to use and the training weights to resume from; a resumed run
    # that has nothing left to do writes both back unchanged
    assert any(not torch.equal(ck['model'][k], ck['train_model'][k]) for k in ck['model'])
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=40', '--init_from=resume'] + TINY)
    same = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    for w in ('model', 'train_model'):
        assert all(torch.equal(ck[w][k], same[w][k]) for k in ck[w]), w

    # a checkpoint of a model.py edited since (the weights fit its shapes, whatever its inputs mean now) is named
    torch.save({**same, 'model_sha1': '0' * 40}, os.path.join(out, 'ckpt.pt'))
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=45', '--eval_interval=20',
             '--init_from=resume'] + TINY + ['--t2_layers=3', '--loader_workers=2'])  # as config/baseline_1m.py packs
    assert 'resuming at iter 40' in p.stdout and 'the checkpoint was written by another model.py' in p.stdout
    assert re.findall(r'^iter (\d+):', p.stdout, re.M)[0] == '41'
    ck2 = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ck2['iter_num'] == 45 and ck2['best_val'] <= ck['best_val']
    # a model setting that differs from the checkpoint's is named, and the checkpoint records the model it holds
    assert "a resumed run keeps its checkpoint's model and max_pulses_per_dom: t2_layers=2 (not 3)" in p.stdout
    assert ck2['config']['t2_layers'] == ck2['model_args']['t2_layers'] == 2

    p = run(['sample.py', f'--out_dir={out}', '--split=val', '--max_events=30'])
    ev = json.load(open(os.path.join(out, 'eval_val.json')))
    assert ev['n_events'] == 30
    assert ev['budgets'] == {'max_pulses': 4 * 8192, 'max_doms': 4 * 4096, 'max_events': 4 * 64, 'max_pulses_per_dom': 16}
    # too few events to fit the error circles' maps: no calibration.json that a later split would trust
    assert '30 val events are too few' in p.stdout and not os.path.exists(os.path.join(out, 'calibration.json'))
    for k in ('mean_angular_error', 'median_angular_error'):
        assert 0 <= ev[k] <= 3.15 and 0 <= ev['linefit'][k] <= 3.15
    assert 'LineFit' in p.stdout and 'another model.py' not in p.stdout
    torch.save({**torch.load(os.path.join(out, 'best.pt'), weights_only=False), 'model_sha1': '0' * 40},
               os.path.join(out, 'edited.pt'))
    p = run(['sample.py', f'--out_dir={out}', '--ckpt=edited.pt', '--split=val', '--max_events=30', '--plots=False'])
    assert f"sample: warning: {os.path.join(out, 'edited.pt')} was trained with another model.py" in p.stdout
    # the model's second seed, beside it as prepare.py stored it for each event (in the toy's own ice)
    s = prepare.open_split(os.path.join(data_dir, 'val'))
    assert s.manifest['made_by']['fit'] == {'steps': 80, 'ice': 'toy'}
    fit = prepare.angles_to_dir(s._column('fit_azimuth')[:30], s._column('fit_zenith')[:30])
    fit_err = classical.angular_error(fit, prepare.angles_to_dir(s.azimuth[:30], s.zenith[:30]))
    assert abs(ev['time_fit']['mean_angular_error'] - float(fit_err.mean())) < 1e-5
    # a submission holds every test event: one of part of them is not written, since it would look complete
    p = run(['sample.py', f'--out_dir={out}', '--split=test', '--max_events=39'])  # one event short
    assert 'submission.csv is not written: 39 of the 40 test events' in p.stdout
    assert not os.path.exists(os.path.join(out, 'submission.csv'))
    run(['sample.py', f'--out_dir={out}', '--split=test'])
    sub = open(os.path.join(out, 'submission.csv')).read().splitlines()
    assert sub[0] == 'event_id,azimuth,zenith' and len(sub) == 41
    # each test event once, in the split's order, with the direction predictions_test.csv gives it; azimuth in
    # [0, 2 pi), zenith in [0, pi] (the csv rounds to 6 decimals)
    sub = np.loadtxt(os.path.join(out, 'submission.csv'), delimiter=',', skiprows=1)
    assert sub[:, 0].astype(np.int64).tolist() == prepare.open_split(os.path.join(data_dir, 'test')).event_id.tolist()
    pt = np.genfromtxt(os.path.join(out, 'predictions_test.csv'), delimiter=',', names=True)
    assert (pt['event_id'] == sub[:, 0]).all() and (pt['azimuth'] == sub[:, 1]).all() and (pt['zenith'] == sub[:, 2]).all()
    assert (sub[:, 1] >= 0).all() and (sub[:, 1] < 2 * np.pi).all() and (sub[:, 2] >= 0).all() and (sub[:, 2] <= np.pi + 1e-6).all()

    # resumed on other data (fine-tuning): named, and best.pt starts over, since val errors of two sets do not compare
    other = str(tmp_path / 'other_packed')
    shutil.copytree(data_dir, other)
    p = run(['train.py', f'--data_dir={other}', f'--out_dir={out}', '--max_iters=46', '--eval_interval=20',
             '--init_from=resume'] + TINY)
    assert f"resuming on data_dir={other!r}, not the checkpoint's {data_dir!r}: best.pt starts over" in p.stdout
    assert torch.load(os.path.join(out, 'best.pt'), weights_only=False)['iter_num'] == 46


def test_micro_threads_train_as_one_thread_does(data_dir, tmp_path):
    """Two micro-batches per iteration computed in two threads (micro_threads=2) give the weights, bit for bit, of
    the same two computed one after the other: each weight's gradient is the sum of the two (in either order the
    same float). A race in the gradient sums or a micro-batch left out would change them. Settings that cannot
    work together stop with a message."""
    args = [f'--data_dir={data_dir}', '--max_iters=6', '--eval_interval=6', '--gradient_accumulation_steps=2',
            '--max_events=16'] + [a for a in TINY if not a.startswith('--max_events')]
    run(['train.py', f'--out_dir={tmp_path / "seq"}'] + args)
    run(['train.py', f'--out_dir={tmp_path / "thr"}', '--micro_threads=2'] + args, threads=2)
    seq, thr = (torch.load(str(tmp_path / d / 'ckpt.pt'), weights_only=False)['train_model'] for d in ('seq', 'thr'))
    assert all(torch.equal(seq[k], thr[k]) for k in seq)
    p = run(['train.py', f'--out_dir={tmp_path / "bad"}'] + args + ['--micro_threads=2', '--gradient_accumulation_steps=1'],
            check=False)
    assert p.returncode == 1 and 'micro_threads=2 needs' in p.stderr, p.stderr[-1000:]


def test_nan_loss_stops_and_keeps_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    before = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['model']
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=50', '--eval_interval=50',
             '--init_from=resume', '--grad_clip=0.0', '--learning_rate=1e30', '--warmup_iters=0'] + TINY[:-3],
            check=False)
    err = p.stderr.lower()
    assert p.returncode != 0 and ('loss is nan' in err or 'loss is inf' in err), p.stderr[-2000:]
    assert f"the last good checkpoint is {out}/ckpt.pt (iteration 2)" in p.stderr
    after = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['model']
    assert all(torch.equal(before[k], after[k]) for k in before)
    # weights gone bad between two log points: the evaluation finds it, and nothing is saved as the last good. A fresh
    # run: the earlier run's files move aside, sample.py's results with them (else they pass for this run's)
    for f in ('submission.csv', 'eval_test.json'):
        open(os.path.join(out, f), 'w').write('of the run at iteration 2\n')
    bad = ['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=50', '--eval_interval=1',
           '--ema_decay=0.0', '--grad_clip=0.0', '--learning_rate=1e30', '--warmup_iters=0'] + TINY[:-3] + ['--log_interval=50']
    p = run(bad, check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("train: error: val error is nan at iteration 1: the averaged weights went "
                                                 "bad; nothing was saved yet. Try a lower learning_rate or grad_clip.")
    assert not os.path.exists(os.path.join(out, 'ckpt.pt'))  # the earlier run's moved aside, none of this run's
    assert sorted(os.listdir(out)) == ['lock', 'log.jsonl', 'previous']
    assert sorted(os.listdir(os.path.join(out, 'previous'))) == ['best.pt', 'ckpt.pt', 'eval_test.json', 'log.jsonl', 'submission.csv']
    # the next fresh run: the failed one saved nothing, so previous/ still holds the run that did
    p = run(bad, check=False)
    assert p.returncode == 1 and "removed the log.jsonl of a run that saved no checkpoint" in p.stdout
    assert torch.load(os.path.join(out, 'previous', 'ckpt.pt'), weights_only=False)['iter_num'] == 2
    assert len(open(os.path.join(out, 'previous', 'log.jsonl')).readlines()) > 1  # the run of iteration 2's


def test_an_out_dir_that_cannot_be_written_is_named_in_one_line(data_dir, tmp_path):
    """An out_dir train.py cannot make (under a read-only folder; here under a file, since the tests run as root) or
    cannot write (a read-only mount: its lock file cannot be made) stops in one line naming it; both were tracebacks."""
    blocker = tmp_path / 'file'
    blocker.write_text('')
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={blocker}/out', '--max_iters=2'] + TINY, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"train: error: {blocker}/out: cannot make it (Not a directory); give an out_dir you can write"], p.stderr[-2000:]


# runs train.py with a disk that fills at the n-th write of one file (by its name's end), half of that write landed
FULL_DISK = """
import builtins, errno, os, runpy, shutil, sys
name, nth = os.environ['FULL_AT'].split(':')
count, real_open, real_copy = [0], builtins.open, shutil.copyfile

class Full:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): self.f.close()
    def write(self, b):
        self.f.write(b[:len(b) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def full(path):
    if str(path).endswith(name):
        count[0] += 1
        return count[0] == int(nth)

def open_(path, mode='r', *a, **k):
    f = real_open(path, mode, *a, **k)
    return Full(f) if ('w' in mode or 'a' in mode) and full(path) else f

def copyfile(src, dst, **k):
    if full(dst):
        real_open(dst, 'wb').write(real_open(src, 'rb').read(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
    return real_copy(src, dst, **k)

builtins.open, shutil.copyfile = open_, copyfile
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.mark.parametrize('full_at', ['ckpt.pt.tmp:2', 'log.jsonl:3', 'best.pt.tmp:1'])
def test_a_full_disk_stops_the_run_in_one_line_with_the_checkpoints_intact(data_dir, tmp_path, full_at, monkeypatch):
    """A disk that fills mid-run stops train.py in one line naming the file, 'No space left on device' and what to do,
    leaves no temporary file and keeps the checkpoints written before. Before: torch.save into a full disk raised a
    RuntimeError ('unexpected pos ...', as on a 5 MB tmpfs) and left the cut ckpt.pt.tmp, and log.jsonl's append and
    best.pt's copy were tracebacks (the copy left best.pt.tmp)."""
    import torch
    out = str(tmp_path / 'out')
    (tmp_path / 'full.py').write_text(FULL_DISK)
    monkeypatch.setenv('FULL_AT', full_at)
    p = run([str(tmp_path / 'full.py'), 'train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4',
             '--eval_interval=2'] + TINY, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"train: error: {out}/"), p.stderr[-2000:]
    assert "(No space left on device)" in lines[0] and "free some space" in lines[0], lines[0]
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')], os.listdir(out)
    if full_at.startswith('ckpt'):  # the second save failed: the first is whole
        assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 2
    if full_at.startswith('best'):
        assert 'best.pt' not in os.listdir(out) and 'cp ' in lines[0]


def test_a_second_run_on_one_out_dir_stops_in_one_line(data_dir, tmp_path):
    """A train.py on an out_dir where another still runs (a job resubmitted beside the first), fresh or resumed, stops
    at once naming the folder and the holder, and leaves the first run's files where they are: before, it moved them
    into previous/ (or resumed from them) and both wrote ckpt.pt and log.jsonl in turn. The lock file of a process
    that ended holds nothing back."""
    import socket
    from configurator import lock_folder
    out = str(tmp_path / 'out')
    os.makedirs(out)
    for f in ('ckpt.pt', 'log.jsonl'):
        open(os.path.join(out, f), 'w').write('of the run still going\n')
    fd = lock_folder('train', out)  # this process stands for that run
    try:
        for mode in ('scratch', 'resume'):
            p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', f'--init_from={mode}'] + TINY,
                    check=False)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 1 and len(lines) == 1, p.stderr[-2000:]
            assert lines[0].startswith(f"train: error: {out} is in use by train.py, pid {os.getpid()} on "
                                       f"{socket.gethostname()} since ") and f"(it holds {out}/lock)" in lines[0], lines[0]
            assert sorted(os.listdir(out)) == ['ckpt.pt', 'lock', 'log.jsonl']
            assert open(os.path.join(out, 'ckpt.pt')).read() == 'of the run still going\n'
        # under torchrun rank 0 holds the lock: every rank stops with its line, none in a traceback (rank 1 died at its
        # first reduce: 'Connection closed by peer')
        p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--device=cpu'] + TINY,
                torchrun=True, check=False)
        assert p.returncode != 0 and f"train: error: {out} is in use by train.py, pid {os.getpid()}" in p.stderr
        # torchrun's own traceback (ChildFailedError) is left out: its first frame is runpy's, "<frozen runpy>" from
        # Python 3.11 on, the path of runpy.py on 3.10
        launcher = r'Traceback \(most recent call last\):\n  File "(<frozen runpy>|[^"]*/runpy\.py)"'
        assert 'Traceback' not in re.sub(launcher, '', p.stderr), p.stderr[-3000:]
        assert sorted(os.listdir(out)) == ['ckpt.pt', 'lock', 'log.jsonl']
    finally:
        os.close(fd)
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2'] + TINY)
    assert 'moved to' in p.stdout and os.path.exists(os.path.join(out, 'ckpt.pt'))
    assert open(os.path.join(out, 'lock')).read().startswith('train.py, pid ')


def test_damaged_data_stops_the_run_in_one_line(data_dir, tmp_path):
    """Prepared data whose sizes are right but whose contents are not (opening it passes) stops train.py in one line
    naming the file, the event and the command that rebuilds the shard, not in a numpy traceback from the loader's
    thread (here with loader workers); sample.py's loop over its loader likewise."""
    import sample
    shutil.copytree(data_dir, tmp_path / 'packed')
    shard = f"{tmp_path}/packed/train/{sorted(os.listdir(tmp_path / 'packed' / 'train'))[0]}"
    events = np.load(f"{shard}/events.npy", mmap_mode='r+')
    events['n_doms'][3] += 1  # every batch holds all 40 train events
    events.flush()
    p = run(['train.py', f'--data_dir={tmp_path}/packed', f'--out_dir={tmp_path}/out', '--max_iters=2',
             '--loader_workers=2'] + TINY, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(f"train: error: {shard}/events.npy: event_id {events['event_id'][3]}: ") and \
        lines[0].endswith(' --verify=True'), lines[0]
    loader = prepare.BatchLoader(prepare.open_split(f"{tmp_path}/packed/train"), 8192, 4096, 64, 16, shuffle=False, epochs=1)
    with pytest.raises(SystemExit, match=f"^sample: error: {shard}/events.npy: event_id {events['event_id'][3]}: "):
        list(sample.batches(loader))
    loader.close()


def test_a_model_setting_left_out_of_model_args_is_named(data_dir, tmp_path):
    """A fork that adds an argument to IceModel (an MLP ratio of T2's own) and a setting of that name to train.py, but
    not to model_args, is stopped in one line: the setting reached no model, which trained with the default."""
    for f in os.listdir(ROOT):
        if f.endswith('.py'):
            shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    for name, old, new in (('model.py', "mlp_ratio=4, attn='auto'):", "mlp_ratio=4, attn='auto', t2_mlp_ratio=4):"),
                           ('train.py', "\nmlp_ratio = 4\n", "\nmlp_ratio = 4\nt2_mlp_ratio = 4\n")):
        source = (tmp_path / name).read_text()
        assert source.count(old) == 1, old
        (tmp_path / name).write_text(source.replace(old, new))
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "out"}', '--t2_mlp_ratio=3',
             '--max_iters=1'] + TINY, cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "train: error: t2_mlp_ratio: a setting and an argument of model.IceModel, but not in train.py's model_args, "
        "which passes the settings to the model: add it there"]


def test_settings_out_of_range_are_named(tmp_path):
    p = run(['train.py', f'--out_dir={tmp_path}', '--eval_interval=0', '--train_events=-1', '--attn=foo',
             '--dtype=float16'], check=False)  # float16 would need loss scaling, which train.py has not
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "train: error: setting out of range: eval_interval=0 (at least 1); train_events=-1 (at least 0); attn='foo' "
        "(one of 'auto', 'flex', 'sdpa'); dtype='float16' (one of 'float32', 'bfloat16')"]
    p = run(['train.py', f'--out_dir={tmp_path}', '--t2_heads=3', '--t1_layers=-1', '--t2_layers=0', '--beta1=1.5',
             '--min_lr=0.1'], check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "train: error: setting out of range: t1_layers=-1 (at least 0); t2_layers=0 (at least 1); beta1=1.5 (below 1); "
        "t2_dim=128 (a multiple of t2_heads=3); min_lr=0.1 (at most learning_rate=0.001: the decay would raise it)"]
    p = run(['sample.py', f'--out_dir={tmp_path}', '--max_events=-1', '--device=gpu'], check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == ["sample: error: setting out of range: max_events=-1 (at least 0)"]
    p = run(['sample.py', f'--out_dir={tmp_path}', '--device=gpu'], check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("sample: error: device='gpu' is not a torch device (")


def test_ddp_gloo_two_ranks_identical(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    wrapper = tmp_path / 'ddp_train.py'
    wrapper.write_text(
        "import os, runpy, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r}); os.chdir({ROOT!r})\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "g = runpy.run_path('train.py', run_name='__main__')\n"
        "torch.save(g['raw_model'].state_dict(), os.path.join(g['out_dir'], f\"rank{os.environ['RANK']}.pt\"))\n")
    first = run([str(wrapper), f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4', '--eval_interval=4',
                 '--gradient_accumulation_steps=2', '--device=cpu'] + TINY, torchrun=True)
    assert 'x2' in first.stdout
    r0 = torch.load(os.path.join(out, 'rank0.pt'))
    r1 = torch.load(os.path.join(out, 'rank1.pt'))
    init = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert init['iter_num'] == 4
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # resumed alone, with nothing left to train: the evaluation that each rank did on half of val and summed over the
    # ranks gives what one process gives on all of it, same weights; the two ranks' data order no longer applies
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4', '--init_from=resume'] + TINY)
    assert "resuming at iter 4" in p.stdout and "the data are shuffled afresh" in p.stdout
    assert all(', 40 events, ' in q.stdout for q in (first, p)), 'each of the 40 val events once'
    (two, one), = [[r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'val_error' in r]]
    assert abs(two['val_error'] - one['val_error']) < 1e-6 and abs(two['val_loss'] - one['val_loss']) < 1e-5, (two, one)
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['data_order']['world_size'] == 1


def test_ddp_ranks_train_as_one_process_with_their_micro_batches(data_dir, tmp_path):
    """Two ranks of one micro-batch each (12 and 5 events) give the gradient of one process that takes both
    micro-batches: the mean over all 17 events. DDP averages the ranks' gradients, so a rank's mean over its own
    events weighed each of the 5 events 2.4 times each of the 12."""
    wrapper = tmp_path / 'fixed_batches.py'
    wrapper.write_text(
        "import os, runpy, sys, numpy as np, torch\n"
        f"sys.path.insert(0, {ROOT!r}); os.chdir({ROOT!r})\n"
        "import prepare\n"
        "rank, ws, Real = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), prepare.BatchLoader\n"
        "GROUPS = [np.arange(12), np.arange(12, 17)]  # the iteration's micro-batches: one process takes both\n"
        "GRADS = sys.argv[sys.argv.index('--grads') + 1]\n"
        "class Fixed:\n"
        "    position = (0, 0)\n"
        "    def __init__(self, split, budgets, transform):\n"
        "        groups = GROUPS if ws == 1 else GROUPS[rank:rank + 1]\n"
        "        self.batches = [transform(prepare.pack_batch(split, g, *budgets)[0]) for g in groups]\n"
        "        assert [b['n_events'] for b in self.batches] == [len(g) for g in groups]\n"
        "        self.i = -1\n"
        "    def __next__(self):\n"
        "        self.i += 1\n"
        "        return self.batches[self.i % len(self.batches)]\n"
        "    def close(self): pass\n"
        "def loader(split, *budgets, shuffle=True, transform=None, **k):\n"
        "    return Fixed(split, budgets, transform) if shuffle else Real(split, *budgets, shuffle=shuffle, transform=transform, **k)\n"
        "prepare.BatchLoader = loader\n"
        "def save_grads(opt, args, kwargs):  # the first step's gradients, as the optimizer sees them\n"
        "    path = os.path.join(GRADS, f'rank{rank}.pt')\n"
        "    if not os.path.exists(path):\n"
        "        torch.save([p.grad.clone() for g in opt.param_groups for p in g['params']], path)\n"
        "from torch.optim.optimizer import register_optimizer_step_pre_hook\n"
        "register_optimizer_step_pre_hook(save_grads)\n"
        "argv = sys.argv[1:sys.argv.index('--grads')]\n"
        "sys.argv = ['train.py'] + argv\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    args = [f'--data_dir={data_dir}', '--max_iters=1', '--eval_interval=1', '--eval_events=10', '--grad_clip=0.0',
            '--device=cpu'] + TINY
    one, two = tmp_path / 'one', tmp_path / 'two'
    run([str(wrapper), f'--out_dir={one}', '--gradient_accumulation_steps=2'] + args + ['--grads', str(one)])
    run([str(wrapper), f'--out_dir={two}'] + args + ['--grads', str(two)], torchrun=True)
    g1, g2 = torch.load(one / 'rank0.pt'), torch.load(two / 'rank0.pt')
    assert len(g1) == len(g2) > 10
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max()), f"{((a - b).abs().max() / a.abs().max()):.2e}"


# -- preemption and damaged checkpoints ----------------------------------------------------------------

def _truncate(path):
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 3])


class _RunsCode:
    """An object whose unpickling makes a folder: what a checkpoint from elsewhere could carry in place of it."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (self.folder,)


def _poison(src, dst, folder):
    ck = torch.load(src, weights_only=False)
    ck['config']['note'] = _RunsCode(str(folder))
    torch.save(ck, dst)


def _same_state(a, b):
    for w in ('model', 'train_model'):
        assert a[w].keys() == b[w].keys() and all(torch.equal(a[w][k], b[w][k]) for k in a[w]), w
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert a['iter_num'] == b['iter_num']


def wrapped_train(tmp_path, name, served):
    """A wrapper script tmp_path/name that runs train.py (alone or as each torchrun rank) with the loader's __next__
    replaced by served, the source of a function served(self) that may call nxt(self), the loader's own: something
    done at a known batch, whatever the machine's speed."""
    wrapper = tmp_path / name
    wrapper.write_text(
        "import os, runpy, signal, sys, time\n"
        f"sys.path.insert(0, {ROOT!r}); os.chdir({ROOT!r})\n"
        "import prepare\n"
        "nxt = prepare.BatchLoader.__next__\n"
        + served +
        "prepare.BatchLoader.__next__ = served\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    return str(wrapper)


def signalled_train(tmp_path, rank, at, times=1):
    """A wrapper script that runs train.py and sends its own process SIGTERM (times times) while the given torchrun
    rank (0 alone without torchrun) takes its at-th batch: a preemption at a known point, whatever the machine's
    speed."""
    return wrapped_train(tmp_path, 'signalled_train.py',
                         "taken = [0]\n"
                         "def served(self):\n"
                         "    taken[0] += 1\n"
                         f"    if os.environ.get('RANK', '0') == '{rank}' and taken[0] == {at}:\n"
                         f"        for _ in range({times}):  # handled one by one\n"
                         "            os.kill(os.getpid(), signal.SIGTERM); time.sleep(1.5)\n"
                         "    return nxt(self)\n")


@pytest.fixture(scope='module')
def preempted(data_dir, tmp_path_factory):
    """An uninterrupted run of 12 iterations, and the same run stopped by SIGTERM during iteration 4 and resumed.
    8 of the 40 train events per batch, so the data order shows in the weights; max_minutes=0 keeps the lr off
    the clock. The run signals itself (signalled_train): a signal sent from here on reading its log raced the run,
    which on a fast machine could finish its 12 iterations first."""
    root = tmp_path_factory.mktemp('preempt')
    args = ([f'--data_dir={data_dir}', '--max_iters=12', '--eval_interval=1000', '--max_minutes=0', '--max_events=8']
            + [a for a in TINY if not a.startswith('--log_interval')] + ['--log_interval=5'])  # stopped before a log point
    run(['train.py'] + args + [f'--out_dir={root}/whole'])
    t = time.time()
    p = run([signalled_train(root, rank=0, at=4)] + args + [f'--out_dir={root}/stopped'], check=False)
    wall = time.time() - t
    stopped = torch.load(f'{root}/stopped/ckpt.pt', weights_only=False)
    resumed = run(['train.py'] + args + [f'--out_dir={root}/stopped', '--init_from=resume'])
    return root, ['train.py'] + args, p.returncode, p.stdout + p.stderr, stopped, resumed.stdout, wall


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(preempted):
    root, args, rc, log, stopped, resumed, wall = preempted
    k = stopped['iter_num']
    assert rc == 143 and f"train: SIGTERM: stopped at iteration {k}; {root}/stopped/ckpt.pt holds it" in log, log
    assert k == 4 and stopped['data_order']['positions'] != [[0, 0]]
    # the training time so far, read at the stop: the time budget and the cosine go on from it after a resume
    assert 0 < stopped['train_seconds'] < wall, (stopped['train_seconds'], wall)
    assert f'resuming at iter {k}' in resumed
    whole = torch.load(f'{root}/whole/ckpt.pt', weights_only=False)
    _same_state(whole, torch.load(f'{root}/stopped/ckpt.pt', weights_only=False))  # weights, average, optimizer
    assert torch.load(f'{root}/stopped/ckpt.prev.pt', weights_only=False)['iter_num'] == k  # the one before is kept


def test_second_sigterm_stops_at_once(data_dir, tmp_path):
    """The first signal lets the iteration finish and saves it; a second one (a user's second Ctrl-C, during a first
    iteration that compiles for minutes) ends the process at once and saves nothing. (Under torchrun a second one
    is ignored: test_ddp_ranks_stop_together_when_one_gets_sigterm.)"""
    args = [f'--data_dir={data_dir}', '--max_iters=12', '--eval_interval=1000', '--out_dir=' + str(tmp_path / 'out')]
    p = run([signalled_train(tmp_path, rank=0, at=2, times=2)] + args + TINY, check=False)
    assert p.returncode == -signal.SIGTERM, (p.returncode, p.stderr[-2000:])
    assert "train: SIGTERM: stopping after this iteration; a second one stops at once, unsaved" in p.stderr
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


def test_ctrl_c_during_the_start_up_is_one_line(data_dir, tmp_path):
    """A Ctrl-C before the training loop's handler (while the data opens) ends train.py in one line with exit 130,
    not a KeyboardInterrupt traceback; nothing was trained, so no checkpoint."""
    wrapper = tmp_path / 'interrupted_train.py'
    wrapper.write_text(
        "import os, runpy, signal, sys\n"
        f"sys.path.insert(0, {ROOT!r}); os.chdir({ROOT!r})\n"
        "import prepare\n"
        "opened = prepare.open_split\n"
        "def interrupted(*a, **kw):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return opened(*a, **kw)\n"
        "prepare.open_split = interrupted\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    p = run([str(wrapper), f'--data_dir={data_dir}', '--max_iters=4', '--out_dir=' + str(tmp_path / 'out')] + TINY,
            check=False)
    assert p.returncode == 130 and 'Traceback' not in p.stderr, (p.returncode, p.stderr[-2000:])
    assert p.stderr.strip() == "train: SIGINT: stopped during the start-up; nothing was trained"
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


def test_damaged_checkpoint_falls_back_to_the_newest_readable(preempted, tmp_path):
    root, args, _, _, stopped, _, _ = preempted
    out = str(tmp_path / 'out')
    shutil.copytree(f'{root}/stopped', out)  # ckpt.pt and best.pt at 12, ckpt.prev.pt at the stop
    whole = torch.load(f'{root}/whole/ckpt.pt', weights_only=False)
    # ckpt.pt cut short: best.pt is a copy of it from the same (last, best) evaluation, newer than ckpt.prev.pt
    _truncate(f'{out}/ckpt.pt')
    p = run(args + [f'--out_dir={out}', '--init_from=resume'])
    assert re.search(rf"{out}/ckpt.pt is unreadable \(.*\); resuming from {out}/best.pt \(iteration 12\)", p.stdout), p.stdout
    assert os.path.exists(f'{out}/ckpt.damaged.pt')
    assert torch.load(f'{out}/ckpt.prev.pt', weights_only=False)['iter_num'] == stopped['iter_num'], "not the damaged one"
    # ckpt.pt and best.pt both damaged: back to ckpt.prev.pt, and the iterations since come out the same again
    _truncate(f'{out}/ckpt.pt')
    _truncate(f'{out}/best.pt')
    p = run(args + [f'--out_dir={out}', '--init_from=resume'])
    assert f"resuming from {out}/ckpt.prev.pt (iteration {stopped['iter_num']})" in p.stdout
    _same_state(whole, torch.load(f'{out}/ckpt.pt', weights_only=False))
    for f in ('ckpt.pt', 'ckpt.prev.pt', 'best.pt'):
        _truncate(f'{out}/{f}')
    p = run(args + [f'--out_dir={out}', '--init_from=resume'], check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr
    assert p.stderr.startswith(f"train: error: init_from='resume' but there is no readable checkpoint in {out}: ")
    # a ckpt.pt carrying an object whose unpickling runs code is not unpickled: named, and the next one taken
    shutil.rmtree(out)
    shutil.copytree(f'{root}/stopped', out)
    _poison(f'{out}/ckpt.pt', f'{out}/ckpt.pt', tmp_path / 'ran')
    p = run(args + [f'--out_dir={out}', '--init_from=resume'])
    assert re.search(rf"{out}/ckpt.pt is unreadable \(it holds objects other than tensors and plain values, .* "
                     rf"\(.*GLOBAL posix.mkdir.*\); not read\); resuming from {out}/best.pt", p.stdout), p.stdout
    assert not os.path.exists(tmp_path / 'ran')


KILLED_AT_BEST_COPY = """
import os, runpy, shutil, signal, sys
copy = shutil.copyfile
def killed(src, dst, **k):  # the moment best.pt is written: the process dies (the OOM killer, a grace period run out)
    if str(dst).endswith('best.pt.tmp'):
        os.kill(os.getpid(), signal.SIGKILL)
    return copy(src, dst, **k)
shutil.copyfile = killed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_a_kill_while_best_pt_is_written_leaves_no_best_that_best_pt_lacks(data_dir, tmp_path):
    """A run killed as it writes best.pt leaves no ckpt.pt whose best_val no best.pt holds: ckpt.pt was renamed into
    place first, so the resume took its best_val and, the evaluation not being better than itself, never wrote best.pt
    (sample.py's default checkpoint): missing, or an older, worse one, for the rest of the run."""
    out = str(tmp_path / 'out')
    (tmp_path / 'killed.py').write_text(KILLED_AT_BEST_COPY)
    args = ['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY
    p = run([str(tmp_path / 'killed.py')] + args, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    if os.path.exists(f'{out}/ckpt.pt'):
        ck = torch.load(f'{out}/ckpt.pt', weights_only=True)
        assert os.path.exists(f'{out}/best.pt'), f"ckpt.pt (iteration {ck['iter_num']}) claims a best that no best.pt holds"
        assert torch.load(f'{out}/best.pt', weights_only=True)['best_val'] == ck['best_val']
    # and the run goes on (or starts again) to a best.pt of the lowest val error it logged
    run(args + ['--max_iters=4'] + (['--init_from=resume'] if os.path.exists(f'{out}/ckpt.pt') else []))
    logged = min(json.loads(line)['val_error'] for line in open(f'{out}/log.jsonl') if 'val_error' in line)
    assert torch.load(f'{out}/best.pt', weights_only=True)['best_val'] == logged


def test_paths_typed_from_another_folder(data_dir, tmp_path):
    """train.py run from another folder with relative paths: an out_dir named like a glob pattern (run[1]) matched
    run1, another run's folder, and the move of its files into previous/ stopped in a traceback; the checkpoint
    recorded data_dir as given, so sample.py run from elsewhere read another folder and said to run prepare.py."""
    os.makedirs(tmp_path / 'run1')
    (tmp_path / 'run1' / 'ckpt.pt').write_bytes(b'another run')
    run([f'{ROOT}/train.py', f'--data_dir={os.path.relpath(data_dir, tmp_path)}', '--out_dir=run[1]', '--max_iters=1',
         '--eval_interval=1'] + TINY, cwd=tmp_path)
    assert os.listdir(tmp_path / 'run1') == ['ckpt.pt'] and (tmp_path / 'run1' / 'ckpt.pt').read_bytes() == b'another run'
    assert torch.load(tmp_path / 'run[1]' / 'ckpt.pt', weights_only=True)['data_dir'] == data_dir


def test_sample_on_a_missing_or_damaged_checkpoint(preempted, tmp_path):
    root = preempted[0]
    runs = tmp_path / 'runs'
    for folder in ('new', 'toy'):
        os.makedirs(runs / folder)
    p = run(['sample.py', f'--out_dir={runs}/new'], check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"sample: error: {runs}/new/best.pt: no checkpoint there; train.py writes best.pt and ckpt.pt into its out_dir: "
        "choose them with --out_dir and --ckpt"]
    # the checkpoints it could have meant are named: the folder's own, and those of that name beside it
    for name in ('toy/best.pt', 'toy/ckpt.pt', 'new/ckpt.pt'):
        shutil.copy(f'{root}/whole/best.pt', runs / name)
    p = run(['sample.py', f'--out_dir={runs}/new'], check=False)
    assert p.returncode == 1 and p.stderr.strip().endswith(f"(found: {runs}/new/ckpt.pt, {runs}/toy/best.pt)")
    shutil.copy(f'{root}/whole/best.pt', tmp_path / 'best.pt')
    _truncate(tmp_path / 'best.pt')
    p = run(['sample.py', f'--out_dir={tmp_path}'], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"sample: error: {tmp_path}/best.pt: unreadable checkpoint (")
    assert 'ckpt.prev.pt' in lines[0]
    # a checkpoint from elsewhere carrying an object whose unpickling runs code: refused, and nothing run
    _poison(f'{root}/whole/best.pt', tmp_path / 'best.pt', tmp_path / 'ran')
    p = run(['sample.py', f'--out_dir={tmp_path}'], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"sample: error: {tmp_path}/best.pt: unreadable checkpoint (it holds objects other than "
                               "tensors and plain values, which train.py never writes, and reading them could run code ("), lines[0]
    assert not os.path.exists(tmp_path / 'ran')
    # written by another version of model.py (here: a head of another width): named, not a load_state_dict traceback
    ck = torch.load(f'{root}/whole/best.pt', weights_only=False)
    ck['model']['head.bias'] = torch.zeros(7)
    torch.save(ck, tmp_path / 'best.pt')
    p = run(['sample.py', f'--out_dir={tmp_path}'], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"sample: error: {tmp_path}/best.pt: its weights do not fit this model.py (size mismatch for head.bias")
    # weights gone bad (NaN): named, and no csv of made-up directions
    ck = torch.load(f'{root}/whole/best.pt', weights_only=False)
    ck['model'] = {k: v * float('nan') if v.is_floating_point() else v for k, v in ck['model'].items()}
    torch.save(ck, tmp_path / 'best.pt')
    p = run(['sample.py', f'--out_dir={tmp_path}', '--max_events=1', '--baselines='], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"sample: error: {tmp_path}/best.pt predicts non-finite directions for 1 of 1 events (the first event_id ")
    assert not os.path.exists(tmp_path / 'predictions_val.csv')
    # a relative data_dir (an older train.py's record) that names nothing from here: said so, not only 'run prepare.py'
    ck = torch.load(f'{root}/whole/best.pt', weights_only=False)
    ck['data_dir'] = 'packed'
    torch.save(ck, tmp_path / 'best.pt')
    p = run(['sample.py', f'--out_dir={tmp_path}'], check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].endswith(
        "(data_dir 'packed' is the one the checkpoint records, relative to the folder train.py ran in; "
        "give --data_dir=<prepare.py's output> if the data is elsewhere)"), p.stderr
    # one event: figures of empty bins are null in the json (JSON has no NaN)
    shutil.copy(f'{root}/whole/best.pt', tmp_path / 'best.pt')
    p = run(['sample.py', f'--out_dir={tmp_path}', '--max_events=1', '--baselines=', '--plots=False'])
    assert 'Warning' not in p.stderr, p.stderr  # numpy's "Mean of empty slice" for each empty bin, before
    json.loads(open(tmp_path / 'eval_val.json').read(), parse_constant=lambda c: pytest.fail(f"{c} in eval_val.json"))


def test_ddp_ranks_stop_together_when_one_gets_sigterm(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    # rank 1 alone gets SIGTERM, while taking its 3rd batch; twice, as when torchrun forwards a signal (a scheduler's
    # to the job's processes, a terminal's Ctrl-C) that the rank got itself: the second must not cut the save short
    wrapper = signalled_train(tmp_path, rank=1, at=3, times=2)
    p = run([wrapper, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=40', '--eval_interval=1000',
             '--device=cpu', '--max_minutes=0'] + TINY + ['--log_interval=4', '--max_events=8'], torchrun=True, check=False)
    # the flags are compared every log_interval iterations: both ranks stop at iteration 4 and rank 0 saves it
    assert p.returncode != 0 and 'train: SIGTERM: stopped at iteration 4;' in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ck['iter_num'] == 4 and ck['data_order']['world_size'] == 2 and len(ck['data_order']['positions']) == 2
    assert 'exitcode  : 143' in p.stderr


def test_torchrun_restart_resumes(data_dir, tmp_path, monkeypatch):
    """torchrun --max-restarts starts the ranks again, with the same arguments, after one fails: the restarted run
    goes on from the failed one's checkpoint instead of moving it into previous/ and training from iteration 0. The
    restart is told by TORCHELASTIC_RESTART_COUNT, set here: torchrun's own restart of gloo ranks on this machine
    mostly failed to form the new group (gloo connectFullMesh refused in 3 of 4 tries, and a hang), before train.py's
    first collective."""
    out = str(tmp_path / 'out')
    args = ['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_interval=4'] + TINY
    run(args + ['--max_iters=4'])
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    p = run(args + ['--max_iters=6'])
    assert f"train: torchrun restart 1: resuming from the checkpoints in {out}" in p.stdout and 'resuming at iter 4' in p.stdout
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['iter_num'] == 6
    assert not os.path.exists(os.path.join(out, 'previous'))
    # a restart before the first checkpoint has nothing to go on from: from scratch, as before
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "none"}', '--max_iters=1'] + TINY)
    assert 'from scratch' in p.stdout


def test_ddp_ranks_that_would_resume_from_different_states_stop(data_dir, tmp_path):
    """On several nodes whose out_dir is not one shared folder, a rank resumed another run's checkpoint (or none) and
    its iteration count parted from the others'. Every rank must start from the same iteration, or all stop, named."""
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    for out, iters in ((a, 2), (b, 4)):
        run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', f'--max_iters={iters}', '--eval_interval=2'] + TINY)
    wrapper = tmp_path / 'own_out_dir.py'  # rank 1 sees another out_dir, as a node of its own would
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"sys.path.insert(0, {ROOT!r}); os.chdir({ROOT!r})\n"
        f"sys.argv = ['train.py'] + [x.replace({a!r}, {b!r}) if os.environ['RANK'] == '1' else x for x in sys.argv[1:]]\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    p = run([str(wrapper), f'--data_dir={data_dir}', f'--out_dir={a}', '--max_iters=6', '--init_from=resume',
             '--device=cpu'] + TINY, torchrun=True, check=False)
    assert p.returncode != 0
    assert 'the ranks start from different states (iterations 2 to 4); this rank, 1, from iteration 4 in ' + b in p.stderr
    assert torch.load(os.path.join(a, 'ckpt.pt'), weights_only=False)['iter_num'] == 2  # nothing trained on


def train_here(args):
    """train.py in this process on one torch thread, whatever IN_PROCESS says: for a test that patches torch, print or
    the loader."""
    p = run_here(['train.py'] + args)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_no_host_sync_between_log_points(data_dir, tmp_path, monkeypatch):
    """Between two log points a training iteration never reads a tensor on the host (on a GPU each read would
    wait for the device): the calls that do (item, tolist, float(), int(), bool(), ...) are counted while train.py
    runs in this process, and between consecutive log lines there is only the log point's own read."""
    import builtins
    count = [0]
    for name in ('item', 'tolist', '__float__', '__int__', '__bool__', '__index__', '__array__'):
        def counted(self, *a, _orig=getattr(torch.Tensor, name), **k):
            count[0] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    printed = []
    monkeypatch.setattr(builtins, 'print', lambda *a, **k: printed.append((count[0], ' '.join(map(str, a)))))
    train_here([f'--data_dir={data_dir}', f'--out_dir={tmp_path / "out"}', '--max_iters=30',
                '--eval_interval=1000', '--eval_events=20']
               + [a for a in TINY if not a.startswith('--log_interval')] + ['--log_interval=10'])
    at = [c for c, msg in printed if msg.startswith('iter ')]
    assert len(at) == 3, printed
    assert [b - a for a, b in zip(at, at[1:])] == [1, 1], printed  # 10 iterations, one read: the log point's reduce


def test_wandb_logs_against_the_iteration(data_dir, tmp_path, monkeypatch):
    """With wandb_log, the run's settings go to wandb.init, every chart's x axis is the iteration (wandb counts log
    calls otherwise, and the train and val lines part), the train loss at each log point and the val error at each
    evaluation, then finish; a resumed run logs into the same wandb run. A stand-in module records the calls: no
    network, no wandb process."""
    import types
    calls = []
    fake = types.SimpleNamespace(**{f: (lambda f: lambda *a, **k: calls.append((f, a, k)))(f)
                                    for f in ('define_metric', 'log', 'finish')})
    fake.init = lambda *a, **k: (calls.append(('init', a, k)), types.SimpleNamespace(id=k['id'] or 'new1run2'))[1]
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    out = tmp_path / 'out'
    train_here([f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=6', '--eval_interval=3',
                '--wandb_log=True', '--wandb_mode=disabled'] + TINY + ['--log_interval=2'])
    assert calls[0][0] == 'init' and calls[0][2]['dir'] == str(out) and calls[0][2]['config']['max_iters'] == 6
    assert ('define_metric', ('*',), {'step_metric': 'iter'}) in calls
    logged = [a[0] for f, a, k in calls if f == 'log']
    assert [r['iter'] for r in logged if 'train/loss' in r] == [2, 3, 4, 6]  # 3: the evaluation flushes the window
    assert [r['iter'] for r in logged if 'val/angular_error' in r] == [3, 6]
    assert calls[-1][0] == 'finish'
    assert calls[0][2]['id'] is None and calls[0][2]['resume'] is None  # a fresh run: a new wandb run
    calls.clear()
    train_here([f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=8', '--eval_interval=3',
                '--init_from=resume', '--wandb_log=True', '--wandb_mode=disabled'] + TINY + ['--log_interval=2'])
    assert calls[0][0] == 'init' and calls[0][2]['id'] == 'new1run2' and calls[0][2]['resume'] == 'allow'
    assert [a[0]['iter'] for f, a, k in calls if f == 'log' and 'train/loss' in a[0]] == [8]


@pytest.mark.parametrize('stale_link', [False, True])
def test_ckpt_pt_is_never_missing_while_a_checkpoint_is_saved(data_dir, tmp_path, monkeypatch, stale_link):
    """A sample.py --ckpt=ckpt.pt may start at any moment of a training: after the first save, ckpt.pt is there after
    every rename a save makes (the old one was renamed to ckpt.prev.pt before the new one took its name, and for that
    instant there was none), and ckpt.prev.pt is still the checkpoint before. Also when a run killed mid-save left
    its link name (ckpt.pt.tmp.old) behind: the link then failed and every later save renamed, as before."""
    out = str(tmp_path / 'out')
    if stale_link:
        os.makedirs(out)
        open(os.path.join(out, 'ckpt.pt.tmp.old'), 'w').close()
    replace, missing = os.replace, []

    def watched(src, dst):
        replace(src, dst)
        if os.path.basename(str(src)).startswith('ckpt') and not os.path.exists(os.path.join(out, 'ckpt.pt')):
            missing.append((os.path.basename(str(src)), os.path.basename(str(dst))))
    monkeypatch.setattr(os, 'replace', watched)
    train_here([f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=6'] + TINY + ['--eval_interval=2'])
    assert missing == []
    iters = [torch.load(os.path.join(out, f), weights_only=False)['iter_num'] for f in ('ckpt.prev.pt', 'ckpt.pt')]
    assert iters == [4, 6]


def test_time_budget_holds_after_a_slow_first_iteration(data_dir, tmp_path, monkeypatch):
    """max_minutes is real training time even when the first iteration takes long (torch.compile: tens of seconds on
    a GPU). The clock extrapolates between log points at the last window's rate; with the compile counted in that
    rate the run stopped at about twice the compile time, here 9 s of a 15 s budget. The log says what the first
    iteration took (a compiled run's start-up cost, which the rates leave out)."""
    import time

    def compile_slowly(m, **kw):  # torch.compile's cost without its work: the first call waits 8 s
        forward, calls = m.forward, [0]

        def first_call_waits(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                time.sleep(8)
            return forward(*a, **k)
        m.forward = first_call_waits
        return m
    monkeypatch.setattr(torch, 'compile', compile_slowly)
    out = tmp_path / 'out'
    printed = []
    monkeypatch.setattr('builtins.print', lambda *a, **k: printed.append(' '.join(map(str, a))))
    # (train_here's one torch thread: the budget is read at log points, and on a busy machine two threads that lose
    # their cores made the first 20 iterations take 45 s, each parallel op waiting for both, past any budget)
    train_here([f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=100000', '--max_minutes=0.25',
                '--eval_interval=100000', '--eval_events=20']
               + [a for a in TINY if not a.startswith(('--log_interval', '--compile'))] + ['--log_interval=20', '--compile=True'])
    rows = [json.loads(line) for line in open(out / 'log.jsonl')]
    trained = [r for r in rows if 'val_error' in r][-1]['seconds']
    assert 0.9 * 15 <= trained < 15 + 5, rows[-3:]
    first = [line for line in printed if line.startswith('train: the first iteration took')]
    assert len(first) == 1 and 8 <= float(first[0].split()[5]) < 15, first


def test_the_log_says_how_long_the_step_waited_for_the_loader(data_dir, tmp_path, monkeypatch):
    """Each log line gives the share of its window that the loop spent waiting for the loader's batches, which says
    whether the loader keeps ahead of the step (on a GPU it must: issue 14), where events/s alone cannot tell a slow
    loader from a slow step. Here the first 6 batches come 0.2 s late and the next 6 on time."""
    import time
    served, next_batch = [0], prepare.BatchLoader.__next__

    def late_at_first(self):
        served[0] += 1
        if served[0] <= 6:
            time.sleep(0.2)
        return next_batch(self)
    monkeypatch.setattr(prepare.BatchLoader, '__next__', late_at_first)
    printed = []
    monkeypatch.setattr('builtins.print', lambda *a, **k: printed.append(' '.join(map(str, a))))
    train_here([f'--data_dir={data_dir}', f'--out_dir={tmp_path / "out"}', '--max_iters=12',
                '--eval_interval=12'] + [a for a in TINY if a != '--log_interval=1'] + ['--log_interval=6'])
    waits = [int(re.search(r'loader wait (\d+)%', line).group(1)) for line in printed if line.startswith('iter ')]
    assert len(waits) == 2 and waits[0] >= 50 and waits[1] < 30, printed


def test_a_run_that_max_iters_ends_follows_its_iterations_not_the_clock(data_dir, tmp_path):
    """With a time budget far from binding (config/toy_cpu.py's 13 minutes and a short --max_iters), the cosine follows
    the iterations alone, as max_iters ends the run: the clock, which counts the warmup, led it just after the warmup,
    so the learning rate there and the weights after it differed from run to run. log.jsonl records each log point's
    learning rate, that of the iteration before it."""
    out = tmp_path / 'out'
    lr0, lr_min, warm, n = 3e-3, 3e-4, 2, 6  # TINY's learning rates
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', f'--max_iters={n}', f'--eval_interval={n}',
         '--max_minutes=10', f'--warmup_iters={warm}'] + [a for a in TINY if not a.startswith('--warmup_iters')])
    lrs = {r['iter'] - 1: r['lr'] for r in map(json.loads, open(out / 'log.jsonl')) if 'lr' in r}
    expected = {it: lr0 * (it + 1) / (warm + 1) if it < warm else
                lr_min + 0.5 * (1.0 + math.cos(math.pi * (it - warm) / (n - warm))) * (lr0 - lr_min) for it in range(n)}
    assert lrs == expected


def test_resume_applies_the_optimizer_settings_given(data_dir, tmp_path):
    """A resumed run takes this run's weight_decay, beta1 and beta2, not those stored in the checkpoint's optimizer
    state (torch's load_state_dict restores them), which its config would otherwise misreport."""
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=2',
             '--init_from=resume', '--weight_decay=0.3', '--beta1=0.8', '--beta2=0.99'] + TINY)
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    groups = ck['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [0.3, 0.0] and ck['config']['weight_decay'] == 0.3
    assert all(tuple(g['betas']) == (0.8, 0.99) for g in groups)
    # and every setting that differs from the run it continues is named (a changed loss weight too)
    assert ("train: resumed with settings other than the checkpoint's: max_iters=3 (was 2), weight_decay=0.3 (was 0.05), "
            "beta1=0.8 (was 0.9), beta2=0.99 (was 0.95)") in p.stdout


def test_done_line_counts_this_runs_iterations(data_dir, tmp_path):
    """The final line's iterations are those its minutes timed: a resumed run's, not its checkpoint's ones too (a run
    resumed at 60 to 90 said '90 iterations in' the minutes of its 30)."""
    out = str(tmp_path / 'out')
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    assert 'train: done, 2 iterations in ' in p.stdout
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=5', '--eval_interval=5',
             '--init_from=resume'] + TINY)
    assert 'train: done, 3 iterations (from iteration 2 to 5) in ' in p.stdout, p.stdout


def test_resume_takes_this_runs_attention_layout(data_dir, tmp_path):
    """attn is how attention is computed, not what the weights are: a run trained with attn='flex' (a GPU) resumes on
    the CPU with this run's attn instead of ending in FlexAttention's 'no backward on CPU'."""
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    path = os.path.join(out, 'ckpt.pt')
    ck = torch.load(path, weights_only=False)
    ck['model_args']['attn'] = 'flex'  # as a GPU run with --attn=flex writes it
    torch.save(ck, path)
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=2',
             '--init_from=resume', '--attn=sdpa'] + TINY)
    assert 'attention sdpa' in p.stdout and "keeps its checkpoint's model" not in p.stdout
    assert torch.load(path, weights_only=False)['model_args']['attn'] == 'sdpa'
    # sample.py too evaluates a checkpoint trained with attn='flex' by its own attn (auto: sdpa on the CPU), not by
    # FlexAttention on the CPU, compiled for each shape
    ck['model_args']['attn'] = 'flex'
    torch.save(ck, path)
    p = run(['sample.py', f'--out_dir={out}', '--ckpt=ckpt.pt', '--max_events=20', '--plots=False', '--baselines='])
    assert 'device cpu, attention sdpa' in p.stdout


def test_an_optimizer_state_of_other_parameters_is_named(data_dir, tmp_path):
    """torch gives a checkpoint's AdamW moments to the parameters by position: a model.py whose parameters come in
    another order (the same names and shapes, so load_weights passes) resumed with each moment on another parameter,
    or, where their shapes differ, the fused CPU step aborted the process ('double free or corruption': found by
    permuting a checkpoint's moments, as such a model.py would read them). One line instead, for a checkpoint without
    the names (written before they were recorded) as for one with them."""
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    path = os.path.join(out, 'ckpt.pt')
    ck = torch.load(path, weights_only=False)
    names, state = ck.pop('optimizer_params', None), ck['optimizer']['state']
    j = next(j for j in state if state[j]['exp_avg'].shape != state[0]['exp_avg'].shape)
    state[0], state[j] = state[j], state[0]  # an older checkpoint, its moments in another order
    torch.save(ck, path)
    resume = ['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=3', '--init_from=resume'] + TINY
    p = run(resume, check=False)
    assert p.returncode == 1 and p.stderr.strip() == (
        f"train: error: the checkpoint in {out}: its optimizer state does not fit this model.py's parameters (first "
        f"{names and names[0]}): it was written by another version; train a new model, or use the commit that wrote it"), \
        (p.returncode, p.stderr[-2000:])
    # the same shapes, in another order: only the names recorded tell
    state[0], state[j] = state[j], state[0]
    i, k = next((i, k) for i in range(len(names)) for k in range(i + 1, len(names))
                if state[i]['exp_avg'].shape == state[k]['exp_avg'].shape)
    names[i], names[k] = names[k], names[i]
    torch.save({**ck, 'optimizer_params': names}, path)
    p = run(resume, check=False)
    assert p.returncode == 1 and f"parameters (first {names[k]}): it was written" in p.stderr, p.stderr
    # as written: resumed
    names[i], names[k] = names[k], names[i]
    torch.save({**ck, 'optimizer_params': names}, path)
    assert 'resuming at iter 2' in run(resume).stdout


# -- what the loop computes: the logged loss, the averaged weights, the clipping, the clock ----------------------

def test_a_log_point_gives_the_mean_loss_per_event_of_its_window(data_dir, tmp_path):
    """log.jsonl's train_loss is the mean loss per event over the iterations since the last log point, as val_loss is
    over val's events, whatever the log_interval. The first iteration's, of the initial weights on all 40 train events,
    is the val_loss that the same initial weights get at iteration 0 on a val split that holds those same events; and
    a window of 3 iterations logs the mean of the 3 losses that log_interval=1 logs one by one (8 events in each
    micro-batch, so they weigh the same). A loss divided by the iterations, or a window's sums not started anew at each
    log point, gives curves that change with the batch size or log_interval and do not compare with val_loss."""
    same = tmp_path / 'same'  # a val split of the train split's events
    shutil.copytree(data_dir, same)
    shutil.rmtree(same / 'val')
    shutil.copytree(same / 'train', same / 'val')
    first = [f'--data_dir={same}', '--eval_events=0', '--max_minutes=0'] + [a for a in TINY if not a.startswith('--eval_events')]
    run(['train.py', f'--out_dir={tmp_path / "at0"}', '--max_iters=0'] + first)
    run(['train.py', f'--out_dir={tmp_path / "at1"}', '--max_iters=1', '--eval_interval=1000'] + first)
    (val,), (train,) = ([r for r in map(json.loads, open(tmp_path / d / 'log.jsonl')) if key in r]
                        for d, key in (('at0', 'val_loss'), ('at1', 'train_loss')))
    assert train['iter'] == 1 and train['train_loss'] == pytest.approx(val['val_loss'], rel=1e-4), (train, val)

    args = [f'--data_dir={data_dir}', '--max_iters=6', '--eval_interval=1000', '--max_events=8', '--max_minutes=0'] + [
        a for a in TINY if not a.startswith(('--max_events', '--log_interval'))]
    for interval in (1, 3):
        run(['train.py', f'--out_dir={tmp_path / str(interval)}', f'--log_interval={interval}'] + args)
    one, three = ({r['iter']: r['train_loss'] for r in map(json.loads, open(tmp_path / d / 'log.jsonl')) if 'train_loss' in r}
                  for d in ('1', '3'))
    assert sorted(one) == list(range(1, 7)) and sorted(three) == [3, 6]
    for end in (3, 6):
        assert three[end] == pytest.approx(sum(one[i] for i in range(end - 2, end + 1)) / 3, rel=1e-5), (one, three)


@pytest.mark.parametrize('ema_decay', [0.999, 0.1])
def test_the_averaged_weights_move_by_the_warmed_up_decay(data_dir, tmp_path, ema_decay):
    """The averaged weights (ckpt 'model', which sample.py evaluates) move towards the training weights after each
    iteration k (from 0) by 1 - decay, the decay min(ema_decay, (1 + k) / (10 + k)): 0.1 at first, so the random
    initial weights fade fast, then ema_decay. Checked at iteration 1 from the checkpoints of iterations 1 and 2
    (ckpt.prev.pt, ckpt.pt): decay 2/11 under the default ema_decay, 0.1 where ema_decay is below the warm-up's.
    An inverted warm-up (or none) leaves the average at the training weights, or at the initial ones."""
    out = tmp_path / 'out'
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=1',
         f'--ema_decay={ema_decay}'] + TINY)
    before, after = (torch.load(out / f, weights_only=False) for f in ('ckpt.prev.pt', 'ckpt.pt'))
    assert (before['iter_num'], after['iter_num']) == (1, 2)
    decay = min(ema_decay, 2 / 11)
    for k, w in after['train_model'].items():
        if k in after['optimizer_params']:  # the parameters (buffers are not averaged)
            expected = before['model'][k] + (1 - decay) * (w - before['model'][k])
            assert torch.allclose(after['model'][k], expected, rtol=1e-5, atol=1e-6), k


def fake_clock(monkeypatch, seconds_per_batch, train, batches=None):
    """time.time() runs seconds_per_batch ahead for each batch the training loader (train) or the evaluation's loader
    (not train) serves (the first batches only, if given): a slow step or evaluation without the wait, so that the
    test asserts no real timing."""
    ahead, real, nxt, served_n = [0.0], time.time, prepare.BatchLoader.__next__, [0]

    def served(self):
        if self.shuffle == train:
            served_n[0] += 1
            ahead[0] += seconds_per_batch if batches is None or served_n[0] <= batches else 0.0
        return nxt(self)
    monkeypatch.setattr(prepare.BatchLoader, '__next__', served)
    monkeypatch.setattr(time, 'time', lambda: real() + ahead[0])


def test_a_resume_goes_on_with_the_training_time_of_its_checkpoint(data_dir, tmp_path):
    """max_minutes counts the training time of a run and its resumptions together: a preempted job resumed with its
    budget spent stops at once, not after max_minutes more (and the cosine that follows the clock goes on from where it
    was, not from its start)."""
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=3'] + TINY)
    trained = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['train_seconds']
    assert trained > 0
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=100000', '--eval_interval=3',
             f'--max_minutes={trained / 2 / 60!r}', '--init_from=resume'] + TINY)
    assert 'train: done, 0 iterations' in p.stdout, p.stdout[-2000:]
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['iter_num'] == 3


def test_evaluations_are_not_training_time(data_dir, tmp_path, monkeypatch):
    """The clock that max_minutes and the learning rate follow counts training alone: evaluations (here each takes
    100 s on a clock made to run ahead while the val batches are read) are left out, so that eval_interval and
    eval_events do not shorten the training a budget buys."""
    fake_clock(monkeypatch, 100.0, train=False)
    out = tmp_path / 'out'
    train_here([f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=1'] + TINY)
    assert [r['iter'] for r in map(json.loads, open(out / 'log.jsonl')) if 'val_error' in r] == [1, 2, 3]
    assert torch.load(out / 'ckpt.pt', weights_only=False)['train_seconds'] < 100


def test_a_run_that_the_clock_ends_follows_the_clock_to_min_lr(data_dir, tmp_path, monkeypatch):
    """Where max_minutes ends the run (the main job: max_iters far away), the cosine follows the training clock and
    reaches min_lr as the budget runs out: the learning rate falls all along, not only with the iterations' ratio. Each
    training batch takes 10 s on a clock made to run ahead, so the 300 s budget is about 30 iterations."""
    fake_clock(monkeypatch, 10.0, train=True)
    out = tmp_path / 'out'
    train_here([f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=100000', '--eval_interval=100000',
                '--max_minutes=5', '--eval_events=20'] + TINY)
    lrs = [r['lr'] for r in map(json.loads, open(out / 'log.jsonl')) if 'lr' in r]
    lr0, lr_min = 3e-3, 3e-4  # TINY's
    assert 20 <= len(lrs) <= 40, lrs
    after_warmup = lrs[2:]
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:])), lrs
    assert lrs[len(lrs) // 2] < 0.75 * lr0 and lrs[-1] < lr_min + 0.05 * (lr0 - lr_min), lrs


def test_once_the_clock_leads_the_cosine_it_never_turns_back(data_dir, tmp_path, monkeypatch):
    """Once the time budget is to end the run before max_iters, the cosine follows the clock from then on, even if
    the iterations then speed up so that max_iters would come first: the learning rate never rises again after the
    warmup. Here the first 6 steps take 10 s on a clock made to run ahead (at that rate 20 iterations overrun the
    120 s budget) and the rest no time; falling back to the iterations' ratio raised the learning rate mid-run."""
    fake_clock(monkeypatch, 10.0, train=True, batches=6)
    out = tmp_path / 'out'
    train_here([f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=20', '--eval_interval=100000',
                '--max_minutes=2', '--eval_events=20'] + TINY)
    lrs = [r['lr'] for r in map(json.loads, open(out / 'log.jsonl')) if 'lr' in r]
    assert len(lrs) == 20, lrs
    assert all(b <= a for a, b in zip(lrs[2:], lrs[3:])), lrs


def test_each_weight_set_is_clipped_on_its_own(data_dir, tmp_path, monkeypatch):
    """grad_clip applies to the network's gradient and to the seed weights' (IceModel.with_seed: model.combine) each
    on its own, as the first step's gradients show against the same step unclipped: each set scaled by
    min(1, grad_clip / its norm). Clipped together, a large seed gradient (a bright track's seed weight wrong)
    shrank the network's step."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    grads = {}

    def first_step(opt, args, kwargs):
        grads.setdefault(run_id[0], [p.grad.clone() for g in opt.param_groups for p in g['params']])
    run_id = [None]
    handle = register_optimizer_step_pre_hook(first_step)
    clip = 1e-3
    try:
        for c in (0.0, clip):
            run_id[0] = c
            train_here([f'--data_dir={data_dir}', f'--out_dir={tmp_path / str(c)}', '--max_iters=1', '--eval_interval=1',
                        f'--grad_clip={c}', '--eval_events=20'] + TINY)
    finally:
        handle.remove()
    names = torch.load(tmp_path / str(clip) / 'ckpt.pt', weights_only=False)['optimizer_params']
    for seed_set in (True, False):
        i = [k for k, n in enumerate(names) if n.startswith('combine.') == seed_set]
        raw, clipped = ([grads[c][k] for k in i] for c in (0.0, clip))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw])).item()
        assert norm > clip  # the test's point: both sets clipped
        for a, b in zip(raw, clipped):
            assert torch.allclose(b, a * (clip / norm), rtol=1e-3, atol=1e-12), seed_set


def test_best_pt_holds_the_evaluation_with_the_lowest_val_error(data_dir, tmp_path, monkeypatch):
    """best.pt (sample.py's default checkpoint) is the evaluation of the lowest val error, also across a resume: the
    val errors are made to be 1, 0.5, 2 and 3 times the real ones at the four evaluations (two before the resume, two
    after it), so best.pt must stay at the second. A resume that forgot its checkpoint's best_val, or a best.pt written
    at the last evaluation, handed sample.py worse weights than the run had."""
    import model
    factors, direction_error = iter([1.0, 0.5, 2.0, 3.0]), model.direction_error
    monkeypatch.setattr(model, 'direction_error', lambda *a, **k: direction_error(*a, **k) * next(factors))
    out = tmp_path / 'out'
    args = [f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_interval=1'] + TINY + ['--eval_events=10']  # one batch
    train_here(args + ['--max_iters=2'])
    train_here(args + ['--max_iters=4', '--init_from=resume'])
    val = {r['iter']: r['val_error'] for r in map(json.loads, open(out / 'log.jsonl')) if 'val_error' in r}
    assert sorted(val) == [1, 2, 3, 4] and min(val, key=val.get) == 2, val
    best = torch.load(out / 'best.pt', weights_only=False)
    assert best['iter_num'] == 2 and best['best_val'] == val[2]
    assert torch.load(out / 'ckpt.pt', weights_only=False)['best_val'] == val[2]


def test_ddp_ranks_count_the_training_time_once(data_dir, tmp_path):
    """Under torchrun the agreed clock is the ranks' mean training time, not their sum: each rank's step takes 10 s on a
    clock made to run ahead, so a 150 s budget is about 15 iterations, where the sum of two ranks' seconds stopped the
    job at half its budget (an 8-GPU main job at an eighth)."""
    wrapper = wrapped_train(tmp_path, 'slow_steps.py',
                            "ahead, real = [0.0], time.time\n"
                            "time.time = lambda: real() + ahead[0]\n"
                            "def served(self):\n"
                            "    ahead[0] += 10 * self.shuffle  # a training batch: 10 s\n"
                            "    return nxt(self)\n")
    out = tmp_path / 'out'
    run([wrapper, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=100000', '--eval_interval=100000',
         '--max_minutes=2.5', '--device=cpu'] + TINY + ['--eval_events=10'], torchrun=True)
    ck = torch.load(out / 'ckpt.pt', weights_only=False)
    assert 11 <= ck['iter_num'] <= 17 and 140 <= ck['train_seconds'] < 180, (ck['iter_num'], ck['train_seconds'])


def test_a_resume_keeps_the_pulses_per_dom_its_model_learned_from(data_dir, tmp_path, monkeypatch):
    """A resumed run keeps its checkpoint's max_pulses_per_dom, as it keeps its model: the weights learned from DOMs
    cut to that many pulses, and a resume with another value (a config edited since) trained and evaluated them on
    other inputs. Its loaders (training and evaluation) read 16 pulses per DOM, and the next checkpoint, which
    sample.py follows, records 16."""
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    per_dom, init = [], prepare.BatchLoader.__init__

    def recorded(self, split, max_pulses, max_doms, max_events, max_pulses_per_dom, *a, **k):
        per_dom.append(max_pulses_per_dom)
        init(self, split, max_pulses, max_doms, max_events, max_pulses_per_dom, *a, **k)
    monkeypatch.setattr(prepare.BatchLoader, '__init__', recorded)
    p = train_here([f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=3',
                    '--init_from=resume'] + TINY + ['--max_pulses_per_dom=8'])
    assert "keeps its checkpoint's model and max_pulses_per_dom: max_pulses_per_dom=16 (not 8)" in p.stdout
    assert per_dom == [16, 16], per_dom  # the training loader and the evaluation's
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ck['iter_num'] == 3 and ck['max_pulses_per_dom'] == ck['config']['max_pulses_per_dom'] == 16


def test_previous_keeps_the_last_run_that_trained_something(data_dir, tmp_path):
    """A fresh run moves what an out_dir holds into previous/, replacing the run kept there only when it moves a
    trained one (a checkpoint): results without a checkpoint (sample.py's eval json, written into a new out_dir beside a
    checkpoint given by its full path) join previous/ and leave the trained run kept there as it was."""
    out = tmp_path / 'out'
    os.makedirs(out / 'previous')
    (out / 'previous' / 'ckpt.pt').write_bytes(b'the run that trained')
    (out / 'eval_val.json').write_text('{}\n')
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=1', '--eval_interval=1'] + TINY)
    assert "the previous run's eval_val.json moved to" in p.stdout
    assert sorted(os.listdir(out / 'previous')) == ['ckpt.pt', 'eval_val.json']
    assert (out / 'previous' / 'ckpt.pt').read_bytes() == b'the run that trained'
