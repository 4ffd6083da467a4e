"""
Train the hierarchical transformer (model.py) on prepared data (prepare.py).

    python train.py config/toy_cpu.py                                    # CPU, synthetic data
    torchrun --standalone --nproc_per_node=8 train.py config/baseline_1m.py  # 8 GPUs, Kaggle data
    python train.py config/toy_cpu.py --init_from=resume                  # continue a stopped run

Settings are the module globals below, overridden by config files and --key=value (configurator.py).
A micro-batch is a token budget (max_pulses pulses, max_doms DOMs, at most max_events events), not a
fixed event count, so shapes stay fixed (no recompiles) and a huge event cannot blow the memory.
One iteration = gradient_accumulation_steps micro-batches on each rank; the loss is the mean over every
event of the step on all ranks. Checkpoints (out_dir/ckpt.pt the latest, out_dir/best.pt the best val
error) are written atomically at every evaluation and at the end.
"""

import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
from prepare import BatchLoader, open_split

# -----------------------------------------------------------------------------
# settings
out_dir = 'out'
data_dir = 'data/sim_packed'
init_from = 'scratch'        # 'scratch' or 'resume' (from out_dir/ckpt.pt)
max_iters = 5000
max_minutes = 0.0            # wall-clock budget of training incl. evaluations (0 = none): the run stops at
                             # max_iters or max_minutes, whichever comes first, and the cosine follows the further
eval_interval = 500          # evaluate on val, write checkpoints (and at the last iteration)
eval_events = 20000          # val events per evaluation (0 = the whole split)
train_events = 0             # train on the first train_events events of the split only (0 = all)
log_interval = 10
seed = 1337
# data: budget per micro-batch (per rank)
max_pulses = 16384
max_doms = 4096
max_events = 256
max_pulses_per_dom = 64      # a DOM keeps its earliest max_pulses_per_dom pulses
gradient_accumulation_steps = 1  # micro-batches per iteration on each rank
# model
t1_dim = 64
t1_layers = 2
t1_heads = 4
t2_dim = 128
t2_layers = 4
t2_heads = 4
mlp_ratio = 4
attn = 'auto'                # 'auto' (FlexAttention on CUDA, padded SDPA elsewhere), 'flex' or 'sdpa'
# loss: von Mises-Fisher NLL + angular_weight * angle (rad)
angular_weight = 0.0
# optimizer: AdamW, linear warmup then cosine decay to min_lr at lr_decay_iters
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
lr_decay_iters = 0           # 0 = max_iters
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # 0 = off
ema_decay = 0.999            # evaluation and checkpoints use an exponential moving average of the weights (0 = off)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'           # autocast dtype on CUDA ('float32' = off); the CPU always runs float32
compile = True
# logging
wandb_log = False
wandb_project = 'iceaggr'
wandb_run_name = 'run'
wandb_mode = 'offline'       # 'offline' (sync later with `wandb sync`), 'online' or 'disabled'
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if master:
    os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
use_amp = device_type == 'cuda' and dtype != 'float32'
autocast = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=use_amp)


def log(msg):
    if master:
        print(msg, flush=True)


def fail(msg):
    print(f"train: error: {msg}", file=sys.stderr, flush=True)
    if ddp:
        dist.destroy_process_group()
    sys.exit(1)


# data
train_split = open_split(os.path.join(data_dir, 'train'))
val_split = open_split(os.path.join(data_dir, 'val'))

# model: from scratch, or rebuilt from the checkpoint's model settings
model_args = dict(t1_dim=t1_dim, t1_layers=t1_layers, t1_heads=t1_heads, t2_dim=t2_dim, t2_layers=t2_layers,
                  t2_heads=t2_heads, mlp_ratio=mlp_ratio, attn=attn)
iter_num, best_val, seconds_before = 0, float('inf'), 0.0
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
checkpoint = None
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
    checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    model_args = checkpoint['model_args']
    max_pulses_per_dom = checkpoint['max_pulses_per_dom']
    iter_num, best_val, seconds_before = checkpoint['iter_num'], checkpoint['best_val'], checkpoint['train_seconds']
elif init_from != 'scratch':
    fail(f"init_from must be 'scratch' or 'resume', not {init_from!r}")
raw_model = M.IceModel(**model_args)
if checkpoint is not None:
    raw_model.load_state_dict(checkpoint.get('train_model', checkpoint['model']))
raw_model.to(device)
# The averaged weights: on the toy data the val error of the training weights jumps by up to 0.05 rad from one
# evaluation to the next late in a run, which makes the best checkpoint a lottery; the average's moves by 0.002-0.004.
ema = None
if ema_decay and checkpoint is not None and 'train_model' in checkpoint:
    ema = [checkpoint['model'][name].to(device) for name, _ in raw_model.named_parameters()]
elif ema_decay:
    ema = [p.detach().clone() for p in raw_model.parameters()]

decay = [p for p in raw_model.parameters() if p.dim() >= 2]
no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                               {'params': no_decay, 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    checkpoint = None

eval_model = torch.compile(raw_model) if compile else raw_model  # evaluation runs without DDP
model = DDP(eval_model, device_ids=[local_rank] if device_type == 'cuda' else None) if ddp else eval_model

n_t1 = sum(p.numel() for n, p in raw_model.named_parameters() if n.startswith(('pulse_embed', 't1.', 't1_ln')))
n_train = min(train_events, len(train_split)) if train_events else len(train_split)
log(f"train: {raw_model.num_params() / 1e6:.3f}M parameters (T1 {n_t1 / 1e6:.3f}M, T2+head "
    f"{(raw_model.num_params() - n_t1) / 1e6:.3f}M); {n_train} train / {len(val_split)} val events "
    f"in {data_dir}; device {device} x{world_size}, attention {raw_model.path(torch.device(device))}, "
    f"compile={compile}, amp={dtype if use_amp else 'off'}, weight average {ema_decay:g}; {max_iters} iterations"
    f"{f' or {max_minutes:g} min' if max_minutes else ''}; micro-batch {max_pulses} pulses / {max_doms} DOMs / "
    f"{max_events} events, {gradient_accumulation_steps} per rank per iteration; "
    f"{'resuming at iter ' + str(iter_num) if init_from == 'resume' else 'from scratch'}")

wandb = None
if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config, mode=wandb_mode, dir=out_dir)


def train_seconds():
    # wall-clock seconds of training so far, over all runs of a resumed training; the same on every rank
    (s,) = all_sum([seconds_before + time.time() - t_start])
    return s / world_size


def get_lr(it, seconds):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    decay_iters = lr_decay_iters or max_iters
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    if max_minutes and not lr_decay_iters:
        ratio = max(ratio, seconds / (60 * max_minutes))  # whichever budget runs out first
    if ratio >= 1:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def all_sum(values):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def swap_ema():
    # exchange the training weights and the averaged ones in place (the compiled model is kept, no recompile)
    if ema is not None:
        for p, e in zip(raw_model.parameters(), ema):
            tmp = p.detach().clone()
            p.copy_(e)
            e.copy_(tmp)


@torch.no_grad()
def evaluate():
    """Mean angular error (rad) and mean loss of the averaged weights over the first eval_events val events,
    split across ranks."""
    swap_ema()
    eval_model.eval()
    loader = BatchLoader(val_split, max_pulses, max_doms, max_events, max_pulses_per_dom, shuffle=False,
                         rank=rank, world_size=world_size, epochs=1, max_events_total=eval_events)
    err_sum = loss_sum = n = 0.0
    for batch in loader:
        b = M.batch_to_tensors(batch, device)
        real = b['event_index'] >= 0
        with autocast:
            pred = eval_model(b)
        target = torch.where(real[:, None], b['event_dir'].float(), 0.0)
        err_sum += torch.where(real, M.direction_error(pred, target), 0.0).sum().item()
        loss_sum += M.per_event_loss(pred, target, real, angular_weight).sum().item()
        n += batch['n_events']
    loader.close()
    err_sum, loss_sum, n = all_sum([err_sum, loss_sum, n])
    eval_model.train()
    swap_ema()
    return err_sum / max(n, 1), loss_sum / max(n, 1), int(n)


def record(row):
    """One line of out_dir/log.jsonl, the training curves that sample.py plots; master rank only, at log and eval
    points, from numbers already on the host."""
    if master:
        with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(row) + '\n')


def start_record():
    """A fresh run starts out_dir/log.jsonl anew; a resumed one keeps its lines up to the checkpoint's iteration
    (not those of a stopped run past it, nor a line cut short when it was killed)."""
    path = os.path.join(out_dir, 'log.jsonl')
    if master:
        lines = open(path).readlines() if init_from == 'resume' and os.path.exists(path) else []
        with open(path + '.tmp', 'w') as f:
            f.writelines(line for line in lines if line.endswith('\n') and json.loads(line)['iter'] <= iter_num)
        os.replace(path + '.tmp', path)


def save_checkpoint(path):
    """Atomic: write a temporary file, then rename it over the old one. 'model' holds the weights to use (the
    averaged ones), 'train_model' the training weights that a resumed run continues from."""
    weights = {'model': raw_model.state_dict()}
    if ema is not None:
        weights = {'model': {**weights['model'], **dict(zip([n for n, _ in raw_model.named_parameters()], ema))},
                   'train_model': weights['model']}
    ckpt = {**weights, 'optimizer': optimizer.state_dict(), 'model_args': raw_model.args,
            'iter_num': iter_num, 'best_val': best_val, 'config': config, 'train_seconds': seconds,
            'max_pulses_per_dom': max_pulses_per_dom, 'data_dir': data_dir}
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


# training loop
loader = BatchLoader(train_split, max_pulses, max_doms, max_events, max_pulses_per_dom, shuffle=True,
                     seed=seed + iter_num, rank=rank, world_size=world_size, max_events_total=train_events)
model.train()
t_start = time.time()
t_last = t_start
iters_timed = 0
window_events = window_pulses = window_loss = 0.0
first_iter = iter_num
start_record()
while True:
    seconds = train_seconds()
    last = iter_num >= max_iters or (max_minutes > 0 and seconds >= 60 * max_minutes)
    if (iter_num % eval_interval == 0 and iter_num > first_iter) or last:
        t_eval = time.time()
        val_err, val_loss, n_val = evaluate()
        improved = val_err < best_val
        best_val = min(best_val, val_err)
        log(f"eval iter {iter_num}: val mean angular error {val_err:.4f} rad ({math.degrees(val_err):.2f} deg), "
            f"val loss {val_loss:.4f}, {n_val} events, best {best_val:.4f} rad ({time.time() - t_eval:.1f}s)")
        record({'iter': iter_num, 'val_error': val_err, 'val_loss': val_loss, 'seconds': seconds})
        if master:
            save_checkpoint(ckpt_path)
            if improved:  # a copy, renamed into place: serialising a big model twice costs seconds
                shutil.copyfile(ckpt_path, os.path.join(out_dir, 'best.pt.tmp'))
                os.replace(os.path.join(out_dir, 'best.pt.tmp'), os.path.join(out_dir, 'best.pt'))
        if wandb is not None:
            wandb.log({'iter': iter_num, 'val/angular_error': val_err, 'val/angular_error_deg': math.degrees(val_err),
                       'val/loss': val_loss, 'val/best': best_val})
        t_last += time.time() - t_eval  # evaluation time is not training time
    if last:
        break

    lr = get_lr(iter_num, seconds)
    for g in optimizer.param_groups:
        g['lr'] = lr
    micro = [next(loader) for _ in range(gradient_accumulation_steps)]
    n_events_step, n_pulses_step = all_sum([sum(b['n_events'] for b in micro), sum(b['n_pulses'] for b in micro)])
    loss_sum = 0.0
    for k, batch in enumerate(micro):
        b = M.batch_to_tensors(batch, device)
        if ddp:
            model.require_backward_grad_sync = k == len(micro) - 1
        with autocast:
            pred = model(b)
        per = M.per_event_loss(pred, b['event_dir'], b['event_index'] >= 0, angular_weight)
        # DDP averages gradients over ranks; scale so the step's gradient is that of the mean over all events
        loss = per.sum() * (world_size / n_events_step)
        loss.backward()
        loss_sum += per.sum().detach()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    (loss_mean,) = all_sum([float(loss_sum)])
    loss_mean /= n_events_step
    if not math.isfinite(loss_mean):
        fail(f"loss is {loss_mean} at iteration {iter_num}: stopping; the last good checkpoint is {ckpt_path} "
             f"(iteration of the last evaluation). Try a lower learning_rate or grad_clip.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:  # the decay starts at 0.1 and grows to ema_decay, so the first weights fade fast
        torch._foreach_lerp_(ema, [p.detach() for p in raw_model.parameters()], 1 - min(ema_decay, (1 + iter_num) / (10 + iter_num)))
    iter_num += 1
    iters_timed += 1
    window_events += n_events_step
    window_loss += loss_mean * n_events_step
    window_pulses += n_pulses_step

    if iter_num % log_interval == 0 or iter_num == max_iters:
        now = time.time()
        dt = (now - t_last) / iters_timed
        left = dt * (max_iters - iter_num)
        if max_minutes:
            left = min(left, 60 * max_minutes - seconds)
        log(f"iter {iter_num}: loss {window_loss / window_events:.4f}, lr {lr:.2e}, {window_events / (now - t_last):.0f} events/s, "
            f"{window_pulses / (now - t_last):.0f} pulses/s, {dt * 1000:.0f} ms/iter, "
            f"{left / 60:.1f} min left")
        record({'iter': iter_num, 'train_loss': window_loss / window_events, 'lr': lr})
        if wandb is not None:
            wandb.log({'iter': iter_num, 'train/loss': window_loss / window_events, 'lr': lr, 'events_per_s': window_events / (now - t_last)})
        t_last, iters_timed, window_events, window_pulses, window_loss = now, 0, 0.0, 0.0, 0.0

loader.close()
log(f"train: done, {iter_num} iterations in {(time.time() - t_start) / 60:.1f} min, best val {best_val:.4f} rad "
    f"({math.degrees(best_val):.2f} deg); checkpoints in {out_dir}")
if wandb is not None:
    wandb.finish()
if ddp:
    dist.destroy_process_group()
