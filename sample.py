"""
Evaluate a trained model on held-out events, beside plain and improved LineFit on the same events
(the `baselines` setting: classical.py's methods).

    python sample.py                                  # out/best.pt on the val split of its data
    python sample.py --split=test                     # predictions + Kaggle submission.csv
    python sample.py --out_dir=out-1m --max_events=100000 --ckpt=ckpt.pt

Prints the competition metric (mean angular error) in rad and degrees, the median and percentiles, and
breakdowns by pulse count, DOM count, zenith, predicted kappa, and energy and kind where the data has a
truth file (the synthetic set does). Writes to out_dir:
    eval_<split>.json          the same figures (n_events, mean_angular_error, median_angular_error, ...,
                               linefit, linefit_improved: {mean_angular_error, median_angular_error},
                               breakdowns)
    predictions_<split>.csv    event_id, azimuth, zenith, kappa (+ true angles and errors where known)
    submission.csv             for the test split: event_id, azimuth, zenith (the Kaggle format)
"""

import functools
import json
import math
import os
import time

import numpy as np
import torch

import model as M
import classical
from prepare import KIND_NAMES, BatchLoader, SplitError, open_split

# -----------------------------------------------------------------------------
# settings
out_dir = 'out'
ckpt = 'best.pt'          # file in out_dir
data_dir = ''             # '' = the data_dir the model was trained on
split = 'val'
max_events = 0            # the first max_events events of the split (0 = all)
max_pulses = 0            # micro-batch budgets; 0 = those of training
max_doms = 0
max_events_per_batch = 0
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'        # autocast dtype on CUDA
compile = False
baselines = 'linefit,linefit_improved'  # classical methods on the same events, from classical.METHODS ('mpe' too: slow; '' = none)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
configure(globals())
# -----------------------------------------------------------------------------

methods = [m for m in baselines.split(',') if m]
if set(methods) - set(classical.METHODS):
    raise SystemExit(f"sample: unknown baseline {sorted(set(methods) - set(classical.METHODS))}; choose from {classical.METHODS}")
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ckpt_path = os.path.join(out_dir, ckpt)
if not os.path.exists(ckpt_path):
    raise SystemExit(f"sample: error: {ckpt_path}: no checkpoint there; train.py writes best.pt and ckpt.pt into "
                     f"its out_dir: choose them with --out_dir and --ckpt")
try:
    ck = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    missing = [k for k in ('config', 'model', 'model_args', 'iter_num', 'max_pulses_per_dom', 'data_dir') if k not in ck]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
except Exception as e:  # truncated zip, garbage, no permission, not a train.py checkpoint
    raise SystemExit(f"sample: error: {ckpt_path}: unreadable checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
                     f"the file is damaged: try --ckpt=ckpt.pt or --ckpt=ckpt.prev.pt (train.py keeps the one before ckpt.pt)") from None
cfg = ck['config']
data_dir = data_dir or ck['data_dir']
max_pulses = max_pulses or cfg['max_pulses']
max_doms = max_doms or cfg['max_doms']
max_events_per_batch = max_events_per_batch or cfg['max_events']
raw_model = M.IceModel(**ck['model_args'])
raw_model.load_state_dict(ck['model'])
raw_model.to(device).eval()
model = torch.compile(raw_model) if compile else raw_model
autocast = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=device_type == 'cuda' and dtype != 'float32')

try:
    s = open_split(os.path.join(data_dir, split))
except (FileNotFoundError, SplitError) as e:
    raise SystemExit(f"sample: error: {e}")
n = min(max_events, len(s)) if max_events else len(s)
print(f"sample: {os.path.join(out_dir, ckpt)} (iter {ck['iter_num']}, {raw_model.num_params() / 1e6:.3f}M parameters) "
      f"on {n} of {len(s)} events of {os.path.join(data_dir, split)}, device {device}")

# model predictions, in split order
t0 = time.time()
pred = np.zeros((n, 3), np.float64)
seen = np.zeros(n, bool)
# the loader builds each batch's stream layout, and on the CPU its features, ahead of the model (model.model_inputs)
to_model = functools.partial(M.model_inputs, path=raw_model.path(device), with_features=device_type == 'cpu')
loader = BatchLoader(s, max_pulses, max_doms, max_events_per_batch, ck['max_pulses_per_dom'], shuffle=False,
                     epochs=1, max_events_total=n, transform=to_model, pin_memory=device_type == 'cuda')
with torch.no_grad():
    for batch in loader:
        b = M.to_device(batch, device)
        with autocast:
            out = model(b)
        k = batch['n_events']
        pred[batch['event_index'][:k].numpy()] = out[:k].float().cpu().numpy()
        seen[batch['event_index'][:k].numpy()] = True
loader.close()
assert seen.all(), "some events were not evaluated"
t_model = time.time() - t0
kappa = np.linalg.norm(pred, axis=1)
az, zen = M.vector_to_angles(pred)
print(f"sample: model on {n} events in {t_model:.1f}s ({n / t_model:.0f} events/s)")

# the classical reconstructions on the same events (classical.py), timed like the model
base_dirs, speed = {}, {'model': n / t_model}
for name in methods:
    t0 = time.time()
    dirs = np.zeros((n, 3))
    chunk = 2000 if name == 'mpe' else 20000
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        dirs[lo:hi] = classical.reconstruct(name, s.events(np.arange(lo, hi)), s.geometry, device=device)
    base_dirs[name], speed[name] = dirs, n / (time.time() - t0)
    print(f"sample: {name} on {n} events in {time.time() - t0:.1f}s ({speed[name]:.0f} events/s)")

result = {'split': split, 'n_events': int(n), 'checkpoint': os.path.join(out_dir, ckpt), 'iter': int(ck['iter_num'])}
has_labels = bool(np.isfinite(s.azimuth[:n]).all())
cols = {'event_id': s.event_id[:n], 'azimuth': az, 'zenith': zen, 'kappa': kappa}


def summary(err):
    return {'mean_angular_error': float(err.mean()), 'median_angular_error': float(np.median(err)),
            'mean_angular_error_deg': math.degrees(err.mean()), 'median_angular_error_deg': math.degrees(np.median(err)),
            'percentiles_deg': {str(p): math.degrees(np.percentile(err, p)) for p in (10, 25, 75, 90)}}


def breakdown(name, values, edges, fmt):
    """Mean error of the model and of each baseline per bin of values; prints a table, returns a list of rows."""
    rows = []
    print(f"  by {name}:")
    idx = np.digitize(values, edges[1:-1])
    for i in range(len(edges) - 1):
        m = idx == i
        if not m.any():
            continue
        row = {'bin': fmt(edges[i], edges[i + 1]), 'n': int(m.sum()), 'mean_angular_error': float(err[m].mean())}
        row.update({f'{k}_mean_angular_error': float(e[m].mean()) for k, e in base_err.items()})
        rows.append(row)
        txt = "".join(f"   {k} {math.degrees(row[f'{k}_mean_angular_error']):6.2f}" for k in base_err)
        print(f"    {row['bin']:>18} {row['n']:8d} events   model {math.degrees(row['mean_angular_error']):6.2f} deg{txt}")
    return rows


if has_labels:
    err = M.angular_errors(s.azimuth[:n], s.zenith[:n], az, zen)
    base_err = {k: M.angular_errors(s.azimuth[:n], s.zenith[:n], *M.vector_to_angles(d)) for k, d in base_dirs.items()}
    result.update(summary(err))
    result['events_per_s'] = speed['model']
    for k, e in base_err.items():
        result[k] = {**summary(e), 'events_per_s': speed[k]}
    # one table: a row per method, on the same events
    print(f"{'method':<18} {'mean (rad)':>10} {'mean (deg)':>10} {'median (deg)':>12} {'events/s':>10}")
    for k, e in [('model', err)] + list(base_err.items()):
        print(f"{k:<18} {e.mean():10.4f} {math.degrees(e.mean()):10.2f} {math.degrees(np.median(e)):12.2f} {speed[k]:10.0f}")
    for k, name in [('linefit', 'LineFit'), ('linefit_improved', 'improved LineFit')]:
        if k in base_err:
            print(f"model / {name} mean angular error: {err.mean() / base_err[k].mean():.3f}")
    print("model percentiles (deg): " + ", ".join(f"p{p} {v:.1f}" for p, v in result['percentiles_deg'].items()))
    intfmt = lambda a, b: f"{a:.0f}-{b:.0f}" if np.isfinite(b) else f">= {a:.0f}"
    ev_pulses, ev_doms = s.n_pulses[:n], s.n_doms[:n]
    result['by_pulses'] = breakdown('pulse count', ev_pulses, [0, 30, 60, 100, 200, 500, 1000, 10000, np.inf], intfmt)
    result['by_doms'] = breakdown('DOM count', ev_doms, [0, 10, 20, 40, 80, 160, 320, np.inf], intfmt)
    result['by_zenith'] = breakdown('true zenith (deg)', np.degrees(s.zenith[:n]), np.arange(0, 181, 30.0), intfmt)
    q = np.quantile(kappa, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    q[-1] = np.inf
    result['by_kappa'] = breakdown('predicted kappa (quintiles)', kappa, q, lambda a, b: f"{a:.1f}-{b:.1f}")
    if s.truth is not None:
        energy = s.truth['energy'][:n].astype(np.float64)
        result['by_energy'] = breakdown('energy (log10 GeV)', np.log10(np.maximum(energy, 1e-3)),
                                        [-np.inf, 2.5, 3, 3.5, 4, 5, 6, np.inf],
                                        lambda a, b: f"{a}-{b}" if np.isfinite(a) and np.isfinite(b) else (f"< {b}" if np.isfinite(b) else f">= {a}"))
        kind = s.truth['kind'][:n]
        result['by_kind'] = breakdown('kind (0 track, 1 cascade)', kind, [-0.5, 0.5, 1.5], lambda a, b: KIND_NAMES[int(a + 0.5)])
        # the classical fits' home ground: well-lit tracks, where likelihood fits are judged by their median
        bright = (kind == 0) & (ev_doms >= 50)
        if bright.any():
            result['tracks_50_doms'] = {'n': int(bright.sum()), 'median_angular_error': float(np.median(err[bright])),
                                        **{f'{k}_median_angular_error': float(np.median(e[bright])) for k, e in base_err.items()}}
            print(f"  tracks with >= 50 hit DOMs ({bright.sum()} events), median: model {np.median(err[bright]):.4f} rad"
                  + "".join(f"   {k} {np.median(e[bright]):.4f}" for k, e in base_err.items()))
    cols.update({'true_azimuth': s.azimuth[:n], 'true_zenith': s.zenith[:n], 'angular_error': err})
    cols.update({f'{k}_angular_error': e for k, e in base_err.items()})
else:
    print(f"sample: {split} has no labels; writing predictions only")
    result['mean_angular_error'] = result['median_angular_error'] = None

with open(os.path.join(out_dir, f'eval_{split}.json.tmp'), 'w') as f:
    json.dump(result, f, indent=1)
os.replace(os.path.join(out_dir, f'eval_{split}.json.tmp'), os.path.join(out_dir, f'eval_{split}.json'))


def write_csv(path, columns):
    names = list(columns)
    fmts = ['%d' if np.issubdtype(np.asarray(columns[c]).dtype, np.integer) else '%.6f' for c in names]
    np.savetxt(path + '.tmp', np.column_stack([np.asarray(columns[c], np.float64) if f != '%d' else columns[c] for c, f in zip(names, fmts)]),
               fmt=fmts, delimiter=',', header=','.join(names), comments='')
    os.replace(path + '.tmp', path)


write_csv(os.path.join(out_dir, f'predictions_{split}.csv'), cols)
if split == 'test':
    write_csv(os.path.join(out_dir, 'submission.csv'), {'event_id': s.event_id[:n], 'azimuth': az, 'zenith': zen})
print(f"sample: wrote {os.path.join(out_dir, f'eval_{split}.json')}, predictions_{split}.csv"
      + (", submission.csv" if split == 'test' else ""))
