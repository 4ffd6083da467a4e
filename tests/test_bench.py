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
