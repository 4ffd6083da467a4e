"""bench.py end to end on tiny sizes, so that it cannot rot: every row and ratio lands in bench.json.
(The figures themselves mean nothing at these sizes; `python bench.py` measures.)"""

import json
import math
import os
import subprocess
import sys

import pytest

from sample import INFER_BUDGET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_BFE73EE = subprocess.run(['git', 'cat-file', '-e', 'bfe73ee'], cwd=ROOT, capture_output=True).returncode == 0
HAS_HEAD = subprocess.run(['git', 'rev-parse', '--verify', 'HEAD'], cwd=ROOT, capture_output=True).returncode == 0
TINY = ['--events_per_batch=100', '--read_events=32', '--max_pulses=4096', '--max_doms=2048', '--max_events=32',
        '--t1_dim=16', '--t1_heads=2', '--t2_dim=32', '--t2_layers=1', '--t2_heads=2',
        '--step_batches=2', '--step_max_pulses=512', '--step_max_doms=512', '--step_max_events=16',
        '--step_max_pulses_per_dom=8', '--step_repeat=1', '--likelihood_events=4', '--threads=1',
        # flat_max_s=0: the flat model runs the first size only and must record the second as skipped
        "--scaling_sizes=100,1000", '--flat_max_s=0.0',
        # the efficiency rows: baseline_1m's budgets cut to 128 pulses, the step against bfe73ee's (A B)
        '--cpu_budget_divisor=512', '--loader_batches=2'] + (['--compare_commit=bfe73ee'] if HAS_BFE73EE else [])


def test_bench_runs_end_to_end(tmp_path):
    out = tmp_path / 'bench.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, 'bench.py', f'--work_dir={tmp_path / "work"}', f'--out={out}'] + TINY,
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    for row in ('prepare', 'reading', 'step', 'scaling', 'inference', 'ratios'):
        assert row in r, row
        assert row in p.stdout or row == 'ratios'
    for key in ('reading_vs_parquet', 'step_vs_flat_realistic', 'step_vs_flat_10k', 'prepare_over_pyarrow_read', 'packing_over_pyarrow_read',
                'step_vs_padded_t1_realistic', 'inference_vs_linefit'):
        v = r['ratios'][key]
        assert isinstance(v, float) and math.isfinite(v) and v > 0, (key, v)
    for m in ('hier', 'flat', 'padded_t1'):
        assert r['step'][m]['events_per_s'] > 0 and r['step'][m]['peak_mb'] >= 0
    assert r['step']['padded_t1_max_abs_diff'] < 1e-4  # the padded-T1 baseline computes the same function
    small, big = r['scaling']
    assert small['n_pulses'] == 100 and big['n_pulses'] == 1000 and big['kept_pulses'] == 1000
    assert small['hier']['s'] > 0 and small['flat']['s'] > 0 and big['hier']['s'] > 0
    assert 'skipped' in big['flat'] and big['flat']['skipped'] in p.stdout
    assert r['ratios']['step_vs_flat_10k_pulses'] == 100
    assert r['inference']['model_events_per_s'] > 0 and r['inference']['linefit_events_per_s'] > 0
    for name in ('toy_cpu', 'baseline_1m'):
        e = r['efficiency'][name]
        assert e['flops_per_event'] > 0 and 0 < e['share_of_matmul'] and e['loader_events_per_s'] > 0, e
        if HAS_BFE73EE:  # a clone without the history has nothing to compare with
            assert e['compare']['step_ratio'] > 0 and e['compare']['commit'] == 'bfe73ee'
            # sample.py's model too: bfe73ee's sample.py packed at training's budgets, the present one at INFER_BUDGET x
            assert e['compare']['inference_ratio'] > 0 and e['compare']['inference_events'] > 0
            assert e['compare']['inference_budget_factors'] == [1, INFER_BUDGET]
    assert r['efficiency']['baseline_1m']['budgets'][0] == 65536 // 512


def test_bench_rows_setting(tmp_path):
    """rows= runs only the rows named (the GPU check runs the efficiency rows alone, profiled); a misspelt row is an
    error."""
    out = tmp_path / 'bench.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    args = [sys.executable, 'bench.py', f'--work_dir={tmp_path / "work"}', f'--out={out}'] + [
        a for a in TINY if not a.startswith('--compare_commit')]
    # against the last commit, as a fork times its own change: a commit that builds its batches with model_inputs
    # (bfe73ee, in the test above, is older than the stream layout)
    compare = ['--compare_commit=HEAD'] if HAS_HEAD else []
    p = subprocess.run(args + ['--rows=efficiency', '--efficiency_configs=toy_cpu', '--profile=True'] + compare, cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert list(r['efficiency']) == ['toy_cpu'] and r['efficiency']['toy_cpu']['events_per_s'] > 0
    if HAS_HEAD:
        c = r['efficiency']['toy_cpu']['compare']
        assert c['step_ratio'] > 0 and c['inference_ratio'] > 0
        assert c['inference_budget_factors'][1] == INFER_BUDGET  # (the last commit's may be another: a fork's edit)
    # profile=True: the step's ops, each counted once (their shares of the busy time add up to at most 1), the
    # matmuls and the attention kernels among the largest, the busy time within the pass's wall time
    prof = r['efficiency']['toy_cpu']['profile']
    names = [op['name'] for op in prof['top']]
    assert 0 < prof['busy_s'] <= prof['wall_s'] and prof['what'] == 'CPU ops', prof
    assert sum(op['share'] for op in prof['top']) <= 1 + 1e-9 and all(op['calls'] > 0 for op in prof['top'])
    assert 'aten::mm' in names and any('scaled_dot_product' in n for n in names), names
    assert "toy_cpu's step profiled" in p.stdout and 'aten::mm' in p.stdout
    assert not {'prepare', 'reading', 'step', 'scaling', 'inference'} & set(r)
    lines = p.stdout.splitlines()
    assert any(line.startswith('efficiency toy_cpu:') for line in lines) and 'reading' not in p.stdout  # the table's row
    # and each figure as it was measured, in this order: the step's rates before the FLOP count (which takes long)
    said = [line for line in lines if line.startswith('bench: efficiency toy_cpu: ')]
    at = [next(i for i, line in enumerate(said) if key in line) for key in (' step ', 'matmul', 'loader', 'MFLOP', 'network')]
    assert at == sorted(at) and len(said) == 6 + 2 * HAS_HEAD, said  # (the comparison's two lines last)
    p = subprocess.run(args + ['--rows=efficiency,speed'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and 'not speed' in p.stderr
    p = subprocess.run(args + ['--rows=scaling'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and 'scaling and inference need step' in p.stderr
    p = subprocess.run(args + ['--step_batches=0', '--scaling_sizes=100,x'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)  # was a traceback from deep inside the step row
    assert p.returncode != 0 and "step_batches=0 (at least 1); scaling_sizes='100,x'" in p.stderr, p.stderr[-2000:]
    # a compare_commit git cannot give, or given without the row that compares: one line before any row (a typo
    # was a traceback after all the rows' minutes)
    p = subprocess.run(args + ['--rows=efficiency', '--compare_commit=bfe73eX'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("bench: error: compare_commit='bfe73eX': not a commit of this "
                                                    "repository's history"), p.stderr[-2000:]
    assert 'bench: efficiency' not in p.stdout and len(p.stderr.splitlines()) == 1  # (no row measured first)
    p = subprocess.run(args + ['--rows=step', '--compare_commit=HEAD'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "compares in the efficiency row, which rows='step' leaves out" in p.stderr
    # nor compiled: the older commit's step runs eager, so the ratio would be compiled against eager
    p = subprocess.run(args + ['--rows=efficiency', '--compare_commit=HEAD', '--compile=True'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "its ratio would compare a compiled step with an eager one" in p.stderr, p.stderr[-2000:]


@pytest.mark.skipif(subprocess.run(['git', 'cat-file', '-e', '482f1ab'], cwd=ROOT, capture_output=True).returncode,
                    reason='needs the git history (482f1ab, the first commit)')
def test_a_compare_commit_without_a_model_is_named():
    """The first commit has neither model.py nor sample.py: named as such, not git's exit status in a traceback."""
    import bench
    with pytest.raises(SystemExit, match=r"compare_commit='482f1ab': its tree has no model.py$"):
        bench.check_compare_commit('482f1ab')
    bench.check_compare_commit('HEAD')  # the present tree has both, and model_inputs


def test_padded_t1_baseline_reads_both_layouts(monkeypatch):
    """bench's padded-T1 baseline computes IceModel's function from either stream layout: the flex one (CUDA's)
    ends in padding tokens of DOM D, which it must leave out (it indexed past its DOMs there)."""
    import numpy as np
    import torch
    import bench
    import model as M
    from test_model import fake_events, pack, small_model
    monkeypatch.setattr(M, '_flex_compiled', M.flex_attention)  # the CPU's unfused flex forward, no compile
    b = pack(fake_events(np.random.default_rng(3), 6), P=600, D=160, E=8)
    hier = small_model()
    padded = bench.PaddedT1(**hier.args).eval()
    padded.load_state_dict(hier.state_dict())
    n = b['n_events']
    with torch.no_grad():
        want = hier(M.model_inputs(b, 'sdpa'))[:n]
        for path in ('sdpa', 'flex'):
            got = padded(M.model_inputs(b, path))[:n]
            assert (got - want).abs().max() < 1e-5, path


def test_flat_baseline_follows_the_pulse_features(monkeypatch):
    """A pulse feature added to model.pulse_features (and N_PULSE_FEATURES) reaches the flat baseline too, rather than
    ending the step row in a shape error."""
    import numpy as np
    import torch
    sys.path.insert(0, ROOT)
    import bench
    import model as M
    from test_model import fake_events, pack
    pulse_features = M.pulse_features

    def with_one_more(b):
        feats, summaries = pulse_features(b)
        return torch.cat([feats, feats[:, :1]], 1), summaries
    monkeypatch.setattr(M, 'pulse_features', with_one_more)
    monkeypatch.setattr(M, 'N_PULSE_FEATURES', M.N_PULSE_FEATURES + 1)
    flat = bench.FlatModel(16, 1, 2, 2)
    b = M.model_inputs(pack(fake_events(np.random.default_rng(0), 4, 6), 512, 64, 8), 'sdpa')
    assert flat(b).shape == (len(b['event_index']), 3)


def test_efficiency_config_falls_back_on_train_defaults(tmp_path):
    """--efficiency_configs takes a config that leaves settings at train.py's defaults (a forker's config/my.py, by
    path or by name) instead of ending in KeyError: 'max_pulses'."""
    sys.path.insert(0, ROOT)
    import bench
    cfg_path = tmp_path / 'my.py'
    cfg_path.write_text("out_dir = 'out-my'\nt2_layers = 2\ndevice = 'cpu'\n")
    cfg = bench.train_config(str(cfg_path))
    assert cfg['t2_layers'] == 2 and cfg['device'] == 'cpu'
    train = open(os.path.join(ROOT, 'train.py')).read()
    for key in ('max_pulses', 'max_doms', 'max_events', 'max_pulses_per_dom', 't1_dim', 'mlp_ratio'):
        assert f"\n{key} = {cfg[key]!r}" in train, key  # train.py's own default
    assert bench.train_config('toy_cpu')['mlp_ratio'] == 2


def test_measured_times_the_call_alone(monkeypatch):
    """measured's seconds are fn's own: peak_memory's gc.collect (~0.17 s in a bench run, more than a small step)
    was on the clock, so every time of the step and scaling rows carried it (the 100-pulse step took 184 ms)."""
    import time
    sys.path.insert(0, ROOT)
    import bench
    collect = bench.gc.collect
    monkeypatch.setattr(bench.gc, 'collect', lambda *a: (time.sleep(0.3), collect(*a))[1])
    t, peak, result = bench.measured(lambda: time.sleep(0.01) or 7, 2)
    assert result == 7 and 0.01 <= t < 0.2, t


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """bench's synthetic files at 200 events a batch file: (raw folder, the packed train split)."""
    sys.path.insert(0, ROOT)
    import bench
    import prepare
    saved = bench.work_dir, bench.events_per_batch
    bench.work_dir, bench.events_per_batch = str(tmp_path_factory.mktemp('bench')), 200
    try:
        raw, packed = bench.make_data()
    finally:
        bench.work_dir, bench.events_per_batch = saved
    return raw, prepare.open_split(f"{packed}/train")


def test_efficiency_flops_are_those_of_the_timed_batches(tiny_data, tmp_path, monkeypatch):
    """The efficiency row's FLOP/event is counted on the very batches whose events/s it multiplies, all of them: it
    was the mean of the first two batches' FLOP/event (toy_cpu: 61M, against 50M over the eight timed)."""
    import bench
    cfg = tmp_path / 'tiny.py'
    cfg.write_text("device = 'cpu'\nt1_dim = 16\nt1_heads = 2\nt1_layers = 1\nt2_dim = 32\nt2_heads = 2\nt2_layers = 1\n"
                   "max_pulses = 512\nmax_doms = 64\nmax_events = 16\nmax_pulses_per_dom = 8\n")
    monkeypatch.setattr(bench, 'step_batches', 4)
    monkeypatch.setattr(bench, 'step_repeat', 1)
    monkeypatch.setattr(bench, 'loader_batches', 1)
    monkeypatch.setattr(bench, 'step_flops', lambda model, b: float(b['n_pulses']))  # a FLOP count that varies by batch
    timed = []
    steps_per_s = bench.steps_per_s

    def recording(model, batches):
        timed.append([(int(b['n_pulses']), int(b['n_events'])) for b in batches])
        return steps_per_s(model, batches)
    monkeypatch.setattr(bench, 'steps_per_s', recording)
    e = bench.bench_efficiency(str(cfg), tiny_data[1])
    pulses, events = zip(*timed[0])
    assert len(pulses) == 4 and e['flops_per_event'] == pytest.approx(sum(pulses) / sum(events))


def test_the_timed_model_takes_every_argument_its_config_sets(tiny_data, tmp_path, monkeypatch):
    """An argument a fork adds to IceModel and sets in its config shapes the model that bench times, in the efficiency
    rows and the others: bench wrote the model's arguments out, and timed that argument's default, another model than
    the one train.py trains."""
    import inspect
    import bench
    import model as M
    made = []
    params = M.IceModel(t1_dim=16, t1_heads=2, t1_layers=1, t2_dim=32, t2_heads=2, t2_layers=1).num_params()

    class Forked(M.IceModel):  # the new argument shapes no weight: the config's shape has params parameters
        def __init__(self, t2_extra=0, **kw):
            super().__init__(**kw)
            made.append(t2_extra)
    # its signature IceModel's with one more argument, as a fork's edit of IceModel reads (whatever IceModel's are)
    sig = inspect.signature(M.IceModel)
    Forked.__signature__ = sig.replace(parameters=[*sig.parameters.values(), inspect.Parameter(
        't2_extra', inspect.Parameter.KEYWORD_ONLY, default=0)])
    monkeypatch.setattr(M, 'IceModel', Forked)
    cfg = tmp_path / 'my.py'
    cfg.write_text("device = 'cpu'\nt1_dim = 16\nt1_heads = 2\nt1_layers = 1\nt2_dim = 32\nt2_heads = 2\nt2_layers = 1\n"
                   "max_pulses = 512\nmax_doms = 64\nmax_events = 16\nmax_pulses_per_dom = 8\nt2_extra = 3\n")
    for name, value in (('step_batches', 1), ('step_repeat', 1), ('loader_batches', 1)):
        monkeypatch.setattr(bench, name, value)
    e = bench.bench_efficiency(str(cfg), tiny_data[1])
    assert made == [3] and e['params'] == params  # the config's shape and its value of the new argument
    monkeypatch.setitem(bench._toy, 't2_extra', 5)  # config/toy_cpu.py's, which the other rows time
    bench.new_model()
    assert made[-1] == 5


def test_reading_row_leaves_first_calls_out_on_both_sides(tiny_data, monkeypatch):
    """The reading row's parquet loader is timed as its packed one is, best of several passes: timed once, its first
    use of pyarrow's filtered reads (0.43 s in a fresh process) was on its clock alone."""
    import time
    import bench
    monkeypatch.setattr(bench, 'read_events', 32)
    monkeypatch.setattr(bench, 'max_events', 16)
    calls, parquet_events = [], bench.parquet_events

    def slow_first_call(*a):
        if not calls:
            time.sleep(0.5)
        calls.append(1)
        return parquet_events(*a)
    monkeypatch.setattr(bench, 'parquet_events', slow_first_call)
    r = bench.bench_reading(*tiny_data)
    assert r['events'] / r['parquet_events_per_s'] < 0.4, r


def test_inference_row_warms_the_classical_fits(tiny_data, monkeypatch):
    """The inference row's likelihood fits, timed once, are called before the clock starts: linefit_improved's first
    call ran 3x slower, so without the scaling row before it the row read a third of its rate."""
    import time
    import numpy as np
    import torch
    import bench
    import classical
    monkeypatch.setattr(bench, 'likelihood_events', 4)
    seen = set()

    def slow_first_call(method, ev, geometry):
        if method not in seen:
            time.sleep(0.5)
        seen.add(method)
    monkeypatch.setattr(classical, 'reconstruct', slow_first_call)
    inf = bench.bench_inference(tiny_data[1], [], np.arange(8), torch.nn.Identity())
    for method in ('linefit_improved', 'mpe'):
        assert inf[method]['events'] / inf[method]['events_per_s'] < 0.4, inf


def test_a_work_dir_or_out_that_cannot_be_written_is_named_first(tmp_path):
    """A work_dir or out bench.py cannot write (under a read-only folder; here under a file, since the tests run as
    root) stops it in one line before any row: out was a traceback after all the rows' minutes, work_dir at once."""
    blocker = tmp_path / 'file'
    blocker.write_text('')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    for where, path in (('work_dir', f'{blocker}/work'), ('out', f'{blocker}/bench.json')):
        args = [f'--work_dir={tmp_path / "work"}', f'--out={tmp_path / "bench.json"}', f'--{where}={path}']
        p = subprocess.run([sys.executable, 'bench.py', '--rows=prepare'] + args, cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [
            f"bench: error: {path}{'.tmp' if where == 'out' else ''}: cannot write it (Not a directory); give a "
            f"work_dir and an out you can write"], p.stderr[-2000:]
        assert not os.path.exists(tmp_path / 'work' / 'raw_20000')


@pytest.mark.skipif(not HAS_BFE73EE, reason='needs the git history (bfe73ee)')
def test_an_older_model_is_imported_without_leaving_its_file(monkeypatch, tmp_path):
    """--compare_commit imports that commit's model.py from a temporary folder, which each run left in /tmp."""
    import tempfile
    sys.path.insert(0, ROOT)
    import bench
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    old = bench.old_model_module('bfe73ee')
    # the folder it was imported from, by name: not tmp_path's listing, which also holds torch's torchinductor_root
    # when this test runs alone (bfe73ee's model.py compiles at import, and torch makes its cache folder in the
    # temporary folder of the moment on its first compile in a process; the whole suite had made it in /tmp before)
    folder = os.path.dirname(old.__file__)
    assert hasattr(old, 'IceModel') and os.path.dirname(folder) == str(tmp_path) and not os.path.exists(folder)


def test_a_profile_that_saw_nothing_is_an_error_not_an_idle_device():
    """On a GPU node without CUPTI the profiler records no kernels; a busy share of 0 would read as an idle GPU."""
    import bench
    model = bench.M.IceModel(t1_dim=16, t1_heads=2, t2_dim=32, t2_heads=2, t2_layers=1)
    with pytest.raises(RuntimeError, match='recorded no CPU ops'):
        bench.step_profile(model, [])


def interrupted_bench(tmp_path, target, args):
    """bench.py in a subprocess where target ('module.function', or a method: 'module.Class.method') first sends it
    a SIGINT, as a Ctrl-C or timeout's stop would, then does its work. Returns the process and the out it wrote to."""
    wrapper = tmp_path / 'interrupted_bench.py'
    wrapper.write_text(
        "import os, runpy, signal, sys\n"
        f"sys.path.insert(0, {ROOT!r}); os.chdir({ROOT!r})\n"
        f"import {target.split('.')[0]}\n"
        f"made = {target}\n"
        "def interrupted(*a, **kw):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return made(*a, **kw)\n"
        f"{target} = interrupted\n"
        "sys.argv = ['bench.py'] + sys.argv[1:]\n"
        "runpy.run_path('bench.py', run_name='__main__')\n")
    out = tmp_path / 'bench.json'
    p = subprocess.run([sys.executable, str(wrapper), f'--work_dir={tmp_path / "work"}', f'--out={out}'] + args,
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    return p, out


def test_ctrl_c_stops_it_in_one_line(tmp_path):
    """A Ctrl-C (here while the bench's data is simulated) ends bench.py in one line with exit 130, nothing written
    to out, where it printed a KeyboardInterrupt traceback."""
    p, out = interrupted_bench(tmp_path, 'simulate.simulate', TINY)
    assert p.returncode == 130 and p.stderr.strip() == f"bench: stopped by SIGINT; {out} not written", p.stderr[-2000:]
    assert not out.exists()


def test_a_stopped_efficiency_row_leaves_the_figures_it_measured(tmp_path):
    """tests/gpu_check.sh runs the efficiency row in what is left of its time, after the training stage: a bench
    stopped by its limit (timeout's SIGINT; here as the loader's rate is about to be measured) printed nothing but
    'not written', and the GPU's step rate and the compile's time were lost with it. Each figure is printed as it is
    measured, the step's first; out stays unwritten, as nothing there may look complete."""
    args = [a for a in TINY if not a.startswith('--compare_commit')] + ['--rows=efficiency', '--efficiency_configs=toy_cpu']
    # the efficiency row's loader_rate makes the only BatchLoader of this run
    p, out = interrupted_bench(tmp_path, 'prepare.BatchLoader.__init__', args)
    assert p.returncode == 130 and p.stderr.strip() == f"bench: stopped by SIGINT; {out} not written", p.stderr[-2000:]
    assert not out.exists()
    said = [line.removeprefix('bench: efficiency toy_cpu: ') for line in p.stdout.splitlines()
            if line.startswith('bench: efficiency toy_cpu: ')]
    assert [w.split()[0] for w in said] == ['budgets', 'step', 'matmul'], p.stdout
    assert 'the first two' in said[0] and said[1].endswith('events/s') and float(said[1].split()[1].replace(',', '')) > 0


def test_step_flops_are_the_matmuls_plus_attention_forward_and_backward(monkeypatch):
    """step_flops is FlopCounterMode's own count (the matmuls) plus, for each call of the CPU flash kernel, torch's
    attention formulas on its q, k, v: forward and backward alike. A kernel left out of the mapping, or a factor on
    either, moves every MFLOP/event and share of the matmul rate of the efficiency row without a word."""
    import numpy as np
    import torch
    import torch.utils.flop_counter as fc
    import bench
    import model as M
    from test_model import fake_events, pack
    torch.manual_seed(0)
    model = M.IceModel(t1_dim=16, t1_heads=2, t1_layers=1, t2_dim=32, t2_heads=2, t2_layers=1)
    b = M.model_inputs(pack(fake_events(np.random.default_rng(1), 4, 8), 512, 64, 8), 'sdpa')
    with fc.FlopCounterMode(display=False) as plain:  # torch has no formula for the CPU kernel: the matmuls alone
        bench.train_step(model, b)
    calls = []
    monkeypatch.setattr(fc, 'sdpa_flop_count', lambda q, k, v: calls.append(('fwd', q, k, v)) or 1000)
    monkeypatch.setattr(fc, 'sdpa_backward_flop_count', lambda g, q, k, v: calls.append(('bwd', q, k, v)) or 10**6)
    total = bench.step_flops(model, b)
    fwd = [c[1:] for c in calls if c[0] == 'fwd']
    bwd = [c[1:] for c in calls if c[0] == 'bwd']
    assert fwd and sorted(fwd) == sorted(bwd) and all(len(q) == 4 for q, _, _ in fwd), calls
    assert plain.get_total_flops() > 0 and total == plain.get_total_flops() + 1000 * len(fwd) + 10**6 * len(bwd)


def test_matmul_rate_counts_every_linear_forward_and_both_backward_matmuls(monkeypatch):
    """The roofline's FLOPs, by hand: per stream (T1's tokens at t1_dim, T2's at t2_dim) qkv, proj, fc and fc_out, each
    forward (n, k) @ (k, m) and its two backward matmuls of the same 2 n k m FLOPs, over the timed seconds."""
    import torch
    import bench
    import model as M
    monkeypatch.setattr(bench, 'timed', lambda fn, repeat=1: (0.5, fn()))
    model = M.IceModel(t1_dim=16, t1_heads=2, t1_layers=1, t2_dim=32, t2_heads=2, t2_layers=1, mlp_ratio=3)
    b = {'t1_src': torch.zeros(70, dtype=torch.long), 't2_src': torch.zeros(24, dtype=torch.long)}
    want = sum(3 * 2 * n * (d * 3 * d + d * d + d * 3 * d + 3 * d * d) for n, d in ((70, 16), (24, 32)))
    assert bench.matmul_rate(model, b) == pytest.approx(want / 0.5, rel=1e-12)


def test_rates_count_the_batches_events_not_their_padding(monkeypatch):
    """steps_per_s, forward_rate and loader_rate divide the events the batches hold (n_events, not the padded
    event_index) by the time measured; the loader's two first batches (its thread's start) are left off both."""
    import types
    import torch
    import bench
    monkeypatch.setattr(bench, 'timed', lambda fn, repeat=1: (2.0, fn()))
    monkeypatch.setattr(bench, 'train_step', lambda model, b: None)
    batches = [{'n_events': torch.tensor(n), 'event_index': torch.tensor([0] * n + [-1] * (8 - n))} for n in (3, 5)]
    assert bench.steps_per_s(None, batches) == 4.0
    assert bench.forward_rate(lambda b: None, batches, repeat=3) == 4.0

    class Loader:
        def __init__(self, *a, **kw):
            self.n = 0

        def __next__(self):
            self.n += 1
            return {'n_events': 100 * self.n, 'event_index': [0] * 1000}

        def close(self):
            pass
    monkeypatch.setattr(bench.prepare, 'BatchLoader', Loader)
    monkeypatch.setattr(bench, 'loader_batches', 3)
    monkeypatch.setattr(bench, 'time', types.SimpleNamespace(perf_counter=iter([10.0, 14.0]).__next__))
    assert bench.loader_rate(None, (1, 1, 1, 1), None) == (300 + 400 + 500) / 4.0


def test_ratio_at_is_flat_over_hier_at_the_size_asked():
    """ratio_at: the flat model's time and memory over the hierarchical one's (how many times faster, how many times
    less memory), at n_want, else at the largest size both ran; none where the flat model ran none."""
    import bench
    sc = [{'n_pulses': n, 'hier': {'s': h, 'peak_mb': hm}, 'flat': f} for n, h, hm, f in (
        (100, 0.1, 10.0, {'s': 0.2, 'peak_mb': 30.0}), (1000, 0.5, 20.0, {'s': 4.0, 'peak_mb': 100.0}),
        (10000, 2.0, 50.0, {'skipped': 'estimated'}))]
    assert bench.ratio_at(sc, 100) == (100, 2.0, 3.0)
    assert bench.ratio_at(sc, 10000) == (1000, 8.0, 5.0)  # flat skipped there: the largest it ran
    n, t, m = bench.ratio_at(sc[2:], 10000)
    assert n is None and math.isnan(t) and math.isnan(m)


def test_scaling_estimates_the_flat_model_from_its_largest_size(tiny_data, monkeypatch):
    """The scaling row's flat model skips a size whose time, estimated as n^2 from the largest size it ran, or memory
    (~ n), passes flat_max_s or flat_max_gb, and runs it otherwise. Each side's time is its measured best, its memory
    the larger peak of its two calls."""
    import torch
    import bench
    import model as M
    torch.manual_seed(0)
    hier = M.IceModel(t1_dim=16, t1_heads=2, t1_layers=1, t2_dim=32, t2_heads=2, t2_layers=1)
    monkeypatch.setattr(bench, 'scaling_sizes', '1000,100')  # out of order: the estimates read the largest last
    for name, v in (('t1_layers', 1), ('t2_layers', 1), ('t2_dim', 32), ('t2_heads', 2)):
        monkeypatch.setattr(bench, name, v)
    geometry = tiny_data[1].geometry
    for max_s, max_gb, skipped in ((39.0, 8.0, True), (120.0, 4.9, True), (41.0, 5.1, False)):
        calls = []

        def measured(fn, repeat):  # the first call of each size and model: 0.5 s, 512 MB; the second 0.4 s, 256 MB
            calls.append(1)
            return (0.5, 2**29, None) if len(calls) % 2 else (0.4, 2**28, None)
        monkeypatch.setattr(bench, 'measured', measured)
        monkeypatch.setattr(bench, 'flat_max_s', max_s)
        monkeypatch.setattr(bench, 'flat_max_gb', max_gb)
        small, big = bench.bench_scaling(hier, geometry)
        assert small['hier'] == small['flat'] == {'s': 0.4, 'peak_mb': 512.0}
        if skipped:  # from 100 pulses at 0.4 s and 0.5 GB: 1,000 at 0.4 x 10^2 = 40 s, 0.5 x 10 = 5 GB
            f = big['flat']
            assert 'skipped' in f and f['estimated_s'] == pytest.approx(40.0) and f['estimated_gb'] == pytest.approx(5.0)
            assert f['time_exponent'] == 2.0
        else:
            assert big['flat'] == {'s': 0.4, 'peak_mb': 512.0}


def test_efficiency_row_arithmetic_and_its_a_b_comparison(tiny_data, tmp_path, monkeypatch):
    """The efficiency row's figures from its measurements: the CPU budget divisor applied once (a config for another
    device), FLOP/s = FLOP/event x events/s and its share of the matmul rate; with compare_commit the medians of each
    A B pass's ratio (new over old; not of the best passes, nor of the medians), the old side first in each pass."""
    import types
    import bench
    import model as M
    cfg = tmp_path / 'gpu.py'  # no device: train.py's default, 'cuda', so reduced on the CPU
    cfg.write_text("t1_dim = 16\nt1_heads = 2\nt1_layers = 1\nt2_dim = 32\nt2_heads = 2\nt2_layers = 1\n"
                   "max_pulses = 1024\nmax_doms = 128\nmax_events = 32\nmax_pulses_per_dom = 8\n")

    class Old(M.IceModel):
        pass
    for name, value in (('step_batches', 2), ('step_repeat', 1), ('cpu_budget_divisor', 2), ('compare_events', 40),
                        ('compare_commit', 'abc1234'), ('profile', False)):
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, 'old_model_module', lambda commit: types.SimpleNamespace(IceModel=Old, model_inputs=M.model_inputs))
    monkeypatch.setattr(bench, 'source_at', lambda commit, path: 'INFER_BUDGET = 1\n')
    monkeypatch.setattr(bench, 'step_flops', lambda model, b: 1e6 * int(b['n_events']))
    monkeypatch.setattr(bench, 'matmul_rate', lambda model, b: 1e9)
    monkeypatch.setattr(bench, 'loader_rate', lambda split, budgets, transform: 500.0)
    # each side's rates in the order measured: the step's own, then the network's, then three A B passes
    rates = {'new': [50.0, 10.0, 30.0, 20.0], 'network': [70.0, 40.0, 90.0, 60.0], 'old': [5.0, 20.0, 8.0],
             'fwd_old': [0.0, 10.0, 40.0, 20.0], 'fwd_new': [0.0, 30.0, 20.0, 80.0]}  # (the forward's first: warm-up)
    order, seen = [], []

    def steps(model, batches):
        if isinstance(model, Old):
            side = 'old'
        else:
            seen.append(id(batches)) if id(batches) not in seen else None
            side = ('new', 'network')[seen.index(id(batches))]
        order.append(side)
        return rates[side].pop(0)

    def forward(model, batches, repeat=1):
        side = 'fwd_old' if isinstance(model, Old) else 'fwd_new'
        order.append(side)
        return rates[side].pop(0)
    monkeypatch.setattr(bench, 'steps_per_s', steps)
    monkeypatch.setattr(bench, 'forward_rate', forward)
    e = bench.bench_efficiency(str(cfg), tiny_data[1])
    assert e['budgets'] == [512, 64, 16, 8] and e['budget_divisor'] == 2 and e['loader_budgets'] == [1024, 128, 32, 8]
    assert e['events_per_s'] == 50 and e['network_events_per_s'] == 70 and e['loader_events_per_s'] == 500
    assert e['flops_per_event'] == pytest.approx(1e6) and e['flops_per_s'] == pytest.approx(5e7)
    assert e['matmul_flops_per_s'] == 1e9 and e['share_of_matmul'] == pytest.approx(0.05)
    c = e['compare']
    assert order == ['new', 'network'] + ['old', 'new', 'network'] * 3 + ['fwd_new', 'fwd_old'] + ['fwd_old', 'fwd_new'] * 3
    assert (c['old'], c['new'], c['new_network'], c['passes']) == (20, 30, 90, 3)
    # per pass 10/5, 30/20, 20/8 = 2, 1.5, 2.5; network 8, 4.5, 7.5; forward 3, 0.5, 4 (the medians' ratio 1.5)
    assert c['step_ratio'] == pytest.approx(2.0) and c['network_ratio'] == pytest.approx(7.5)
    assert c['inference_ratio'] == pytest.approx(3.0)
    assert c['inference_old_events_per_s'] == 40 and c['inference_events_per_s'] == 80
    from sample import INFER_BUDGET
    assert c['inference_budget_factors'] == [1, INFER_BUDGET] and c['inference_events'] >= 40 // 2


def test_the_table_and_ratios_are_the_rows_own_figures(tmp_path, monkeypatch, capsys):
    """main's ratios and table from the rows' figures (the rows themselves stubbed): each ratio the right way up (x
    faster, x less memory, x the read time), the scaling row's memory exponent between its two largest sizes."""
    import types
    import bench
    for name in ('work_dir', 'out', 'efficiency_configs', 'rows', 'compare_commit'):
        monkeypatch.setattr(bench, name, getattr(bench, name))
    monkeypatch.setattr(sys, 'argv', ['bench.py', f'--work_dir={tmp_path}', f'--out={tmp_path / "b.json"}',
                                      '--efficiency_configs=toy_cpu'])
    monkeypatch.setattr(bench, 'make_data', lambda: ('raw', 'packed'))
    monkeypatch.setattr(bench.prepare, 'open_split', lambda path: types.SimpleNamespace(geometry=None))
    monkeypatch.setattr(bench, 'bench_prepare', lambda raw: {
        'pulses': 1000, 'pyarrow_read_s': 0.5, 'prepare_s': 4.0, 'packing_s': 1.0, 'prepare_pulses_per_s': 250.0,
        'packing_pulses_per_s': 1000.0, 'pyarrow_read_pulses_per_s': 2000.0})
    monkeypatch.setattr(bench, 'bench_reading', lambda raw, split: {
        'events': 100, 'packed_events_per_s': 3000.0, 'parquet_events_per_s': 100.0})
    monkeypatch.setattr(bench, 'step_batches_of', lambda split: ([], None))
    monkeypatch.setattr(bench, 'bench_step', lambda batches: ({
        'hier': {'s': 1.0, 'events_per_s': 400.0, 'peak_mb': 50.0}, 'flat': {'s': 8.0, 'events_per_s': 50.0, 'peak_mb': 150.0},
        'padded_t1': {'s': 2.0, 'events_per_s': 100.0, 'peak_mb': 200.0}}, None))
    monkeypatch.setattr(bench, 'bench_scaling', lambda hier, geometry: [
        {'n_pulses': n, 'n_doms': 1, 'hier': {'s': h, 'peak_mb': hm}, 'flat': f} for n, h, hm, f in (
            (1000, 0.01, 10.0, {'s': 0.03, 'peak_mb': 20.0}), (10000, 0.1, 40.0, {'s': 1.2, 'peak_mb': 160.0}),
            (100000, 1.0, 1000.0, {'skipped': 'estimated'}))])
    monkeypatch.setattr(bench, 'bench_inference', lambda split, batches, idx, hier: {
        'events': 10, 'model_events_per_s': 600.0, 'linefit_events_per_s': 2000.0,
        'linefit_improved': {'skipped': 'x'}, 'mpe': {'skipped': 'x'}})
    monkeypatch.setattr(bench, 'bench_efficiency', lambda name, split: {
        'events_per_s': 200.0, 'network_events_per_s': 250.0, 'flops_per_event': 5e6, 'flops_per_s': 1e9, 'matmul_flops_per_s': 4e9,
        'share_of_matmul': 0.25, 'budgets': [1, 2, 3, 4], 'budget_divisor': 1, 'loader_events_per_s': 1000.0,
        'loader_budgets': [1, 2, 3, 4], 'loader_path': 'sdpa'})
    bench.main()
    q = json.loads((tmp_path / 'b.json').read_text())['ratios']
    assert q['prepare_over_pyarrow_read'] == 8.0 and q['packing_over_pyarrow_read'] == 2.0
    assert q['reading_vs_parquet'] == 30.0
    assert q['step_vs_flat_realistic'] == 8.0 and q['step_vs_padded_t1_realistic'] == 4.0
    assert q['step_memory_flat_over_hier_realistic'] == 3.0 and q['step_memory_padded_t1_over_hier_realistic'] == 4.0
    assert (q['step_vs_flat_10k_pulses'], q['step_vs_flat_10k'], q['memory_flat_over_hier_10k']) == (10000, pytest.approx(12.0), 4.0)
    assert q['hier_memory_exponent'] == pytest.approx(math.log(25) / math.log(10))
    assert q['inference_vs_linefit'] == 0.3
    table = capsys.readouterr().out
    for said in ('2.00x the read time for the packing', '8.0x with the LineFits', '30.0x faster', '8.0x faster (goal >= 1), 3.0x less memory',
                 '4.0x faster, 4.0x less memory', '3.0x faster\n', '12.0x faster (goal >= 10)', '0.300x LineFit',
                 'toy_cpu: 200 events/s, 5 MFLOP/event, 1.0 GFLOP/s', '25% of it', '5.0x the step', 'pulses^1.40'):
        assert said in table, said


def test_step_and_inference_rows_divide_their_events_by_their_times(tiny_data, monkeypatch):
    """The step row's events/s: the batches' events (not their padding) over the sum of each batch's measured time, its
    memory the largest batch's peak; the inference row's rates each over its own events (the likelihood fits over
    likelihood_events, LineFit over all)."""
    import numpy as np
    import torch
    import bench
    import model as M
    from test_model import fake_events, pack
    for name, value in (('t1_dim', 16), ('t1_heads', 2), ('t1_layers', 1), ('t2_dim', 32), ('t2_heads', 2), ('t2_layers', 1),
                        ('step_repeat', 1), ('likelihood_events', 4), ('compile', False)):
        monkeypatch.setattr(bench, name, value)
    batches = [M.model_inputs(pack(fake_events(np.random.default_rng(s), 3, 8), 512, 64, 8), 'sdpa') for s in (1, 2)]
    calls = []

    def measured(fn, repeat):  # per model: 0.25 s and 40 MB, then 0.5 s and 10 MB
        calls.append(1)
        return (0.25, 40 * 2**20, None) if len(calls) % 2 else (0.5, 10 * 2**20, None)
    monkeypatch.setattr(bench, 'measured', measured)
    monkeypatch.setattr(bench, 'train_step', lambda model, b: None)
    st, _ = bench.bench_step(batches)
    assert st['events'] == 6 and all(st[m] == {'s': 0.75, 'events_per_s': 8.0, 'peak_mb': 40.0} for m in ('hier', 'flat', 'padded_t1'))
    # where no /proc measures memory (peak_memory's NaN: not Linux) the row says so, not 0 MB
    monkeypatch.setattr(bench, 'measured', lambda fn, repeat: (0.25, float('nan'), None))
    st, _ = bench.bench_step(batches)
    assert all(math.isnan(st[m]['peak_mb']) for m in ('hier', 'flat', 'padded_t1')), st
    monkeypatch.setattr(bench, 'timed', lambda fn, repeat=1: (2.0, fn()))
    monkeypatch.setattr(bench.classical, 'reconstruct', lambda method, ev, geometry: None)
    inf = bench.bench_inference(tiny_data[1], batches, np.arange(10), torch.nn.Identity())
    assert inf['events'] == 6 and inf['model_events_per_s'] == 3.0 and inf['linefit_events_per_s'] == 5.0
    for method in ('linefit_improved', 'mpe'):
        assert inf[method] == {'events': 4, 'events_per_s': 2.0}, inf


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='Linux only')
def test_peak_memory_sees_what_the_call_freed_again():
    """peak_memory's bytes are the call's peak (VmHWM), also of what it frees before it returns, as a step frees its
    activations: the resident set after the call would read close to nothing."""
    import numpy as np
    import bench

    def call():
        a = np.ones(64 * 2**20, np.uint8)  # 64 MB, touched, freed before the call returns
        return int(a[-1])
    peak, result = bench.peak_memory(call)
    assert result == 1 and peak >= 48 * 2**20, peak
