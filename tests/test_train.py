"""Tests for train.py and sample.py on a tiny simulated data set: the loss goes down, checkpoints are
written and resumed at the same iteration, a NaN loss stops the run, DDP (gloo, 2 CPU processes) keeps
the ranks' parameters identical, and sample.py writes its figures."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--compile=False', '--t1_dim=16', '--t1_layers=1', '--t1_heads=2', '--t2_dim=32', '--t2_layers=2',
        '--t2_heads=2', '--max_pulses=8192', '--max_doms=4096', '--max_events=64', '--max_pulses_per_dom=16',
        '--eval_events=100', '--log_interval=1', '--warmup_iters=2', '--learning_rate=3e-3', '--min_lr=3e-4']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    import prepare
    import simulate
    d = tmp_path_factory.mktemp('tiny')
    simulate.simulate(out_dir=str(d / 'raw'), n_train_batches=2, n_test_batches=1, events_per_batch=40, seed=7)
    prepare.run(str(d / 'raw'), str(d / 'packed'), val_batches=1, num_proc=1, log=lambda *a: None)
    return str(d / 'packed')


def run(args, cwd=ROOT, check=True, torchrun=False, threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if torchrun
           else [sys.executable]) + args
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(out):
    return [float(x) for x in re.findall(r'^iter \d+: loss ([-\d.]+)', out, re.M)]


def test_train_checkpoint_resume_and_sample(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=40', '--eval_interval=20']
            + TINY)
    assert 'parameters' in p.stdout and 'attention sdpa' in p.stdout
    ls = losses(p.stdout)
    assert len(ls) == 40
    # 40 training events, all in every micro-batch: starts near log(4 pi) = 2.53 and goes down
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.1, ls
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ck['iter_num'] == 40 and ck['model_args']['t2_dim'] == 32 and 'optimizer' in ck
    assert os.path.exists(os.path.join(out, 'best.pt'))
    assert not any(f.endswith('.tmp') for f in os.listdir(out))

    # the checkpoint holds the averaged weights to use and the training weights to resume from; a resumed run
    # that has nothing left to do writes both back unchanged
    assert any(not torch.equal(ck['model'][k], ck['train_model'][k]) for k in ck['model'])
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=40', '--init_from=resume'] + TINY)
    same = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    for w in ('model', 'train_model'):
        assert all(torch.equal(ck[w][k], same[w][k]) for k in ck[w]), w

    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=45', '--eval_interval=20',
             '--init_from=resume'] + TINY)
    assert 'resuming at iter 40' in p.stdout
    assert re.findall(r'^iter (\d+):', p.stdout, re.M)[0] == '41'
    ck2 = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ck2['iter_num'] == 45 and ck2['best_val'] <= ck['best_val']

    p = run(['sample.py', f'--out_dir={out}', '--split=val', '--max_events=30'])
    ev = json.load(open(os.path.join(out, 'eval_val.json')))
    assert ev['n_events'] == 30
    for k in ('mean_angular_error', 'median_angular_error'):
        assert 0 <= ev[k] <= 3.15 and 0 <= ev['linefit'][k] <= 3.15
    assert 'LineFit' in p.stdout
    p = run(['sample.py', f'--out_dir={out}', '--split=test', '--max_events=25'])
    sub = open(os.path.join(out, 'submission.csv')).read().splitlines()
    assert sub[0] == 'event_id,azimuth,zenith' and len(sub) == 26


def test_nan_loss_stops_and_keeps_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    before = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['model']
    p = run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=50', '--eval_interval=50',
             '--init_from=resume', '--grad_clip=0.0', '--learning_rate=1e30', '--warmup_iters=0'] + TINY[:-3],
            check=False)
    err = p.stderr.lower()
    assert p.returncode != 0 and ('loss is nan' in err or 'loss is inf' in err), p.stderr[-2000:]
    after = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['model']
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ddp_gloo_two_ranks_identical(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    wrapper = tmp_path / 'ddp_train.py'
    wrapper.write_text(
        "import os, runpy, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r}); os.chdir({ROOT!r})\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "g = runpy.run_path('train.py', run_name='__main__')\n"
        "torch.save(g['raw_model'].state_dict(), os.path.join(g['out_dir'], f\"rank{os.environ['RANK']}.pt\"))\n")
    p = run([str(wrapper), f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4', '--eval_interval=4',
             '--gradient_accumulation_steps=2', '--device=cpu'] + TINY, torchrun=True)
    assert 'x2' in p.stdout
    r0 = torch.load(os.path.join(out, 'rank0.pt'))
    r1 = torch.load(os.path.join(out, 'rank1.pt'))
    init = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert init['iter_num'] == 4
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
