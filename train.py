"""
Train the hierarchical transformer (model.py) on prepared data (prepare.py).

    python train.py config/toy_cpu.py                                    # CPU, synthetic data
    torchrun --standalone --nproc_per_node=8 train.py config/baseline_1m.py  # 8 GPUs, Kaggle data
    python train.py config/toy_cpu.py --init_from=resume                  # continue a stopped run

Settings are the module globals below, overridden by config files and --key=value (configurator.py).
A micro-batch is a token budget (max_pulses pulses, max_doms DOMs, at most max_events events), not a
fixed event count, so shapes stay fixed (no recompiles) and a huge event cannot blow the memory.
One iteration = gradient_accumulation_steps micro-batches on each rank; the loss is the mean over the events of all
ranks' micro-batches, so W ranks train as one process with W times the micro-batches would. Checkpoints
(out_dir/ckpt.pt the latest, out_dir/best.pt the best val error) are written atomically at every evaluation and at
the end; the one before ckpt.pt stays as ckpt.prev.pt. SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C)
finishes the current iteration, writes ckpt.pt and exits 143 (130 for SIGINT); --init_from=resume goes on with the
same data order.
"""

import concurrent.futures
import functools
import inspect
import io
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time


def stop_starting(signum, frame):
    # Ctrl-C or SIGTERM during the start-up (imports, data, model; on_signal takes over at the loop): one line and the
    # signal's exit status, where Ctrl-C printed a KeyboardInterrupt traceback. Nothing is trained yet, nothing saved
    os.write(2, f"train: {signal.Signals(signum).name}: stopped during the start-up; nothing was trained\n".encode())
    sys.exit(128 + signum)


signal.signal(signal.SIGINT, stop_starting)
signal.signal(signal.SIGTERM, stop_starting)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import model as M  # noqa: E402
from prepare import BatchLoader, SplitError, glob_in, open_split  # noqa: E402

# -----------------------------------------------------------------------------
# settings
out_dir = 'out'
data_dir = 'data/sim_packed'
init_from = 'scratch'        # 'scratch' or 'resume' (from out_dir/ckpt.pt)
max_iters = 5000
max_minutes = 0.0            # wall-clock budget of training, evaluations not counted (0 = none): the run stops at
                             # max_iters or max_minutes, whichever comes first, and the cosine follows that one
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
micro_threads = 1            # micro-batches of an iteration computed at once, each in its own Python thread (CPU, one
                             # process): on 2 cores two micro-batches on one core each beat one micro-batch on both
loader_workers = 0           # processes per rank that pack batches (0 = one background thread); more when the loader
                             # cannot keep two steps ahead of a GPU (bench.py's efficiency row times it beside the step)
features = 'model'           # where the no-grad features run: 'model' (in the forward pass, on the model's device)
                             # or 'loader' (the loader's CPU, ahead of the step: faster only with a core to spare)
# model
t1_dim = 64
t1_layers = 2
t1_heads = 4
t2_dim = 128
t2_layers = 4
t2_heads = 4
mlp_ratio = 4
attn = 'auto'                # 'auto' (FlexAttention on CUDA, grouped SDPA elsewhere), 'flex' or 'sdpa'
# loss: von Mises-Fisher NLL + angular_weight * angle (rad), plus truth_weight * the track and energy heads' loss
# (model.truth_loss) where the data has a truth file (simulation; the Kaggle data has none, and the heads stay untrained)
angular_weight = 0.0
truth_weight = 1.0
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
dtype = 'bfloat16'           # autocast dtype on CUDA ('float32' = off); the CPU always runs float32. No
                             # 'float16': its gradients underflow without loss scaling, which this loop has not
compile = True
compile_mode = 'default'     # torch.compile mode; 'reduce-overhead' adds CUDA graphs (the flex layout's shapes are fixed)
# logging
wandb_log = False
wandb_project = 'iceaggr'
wandb_run_name = 'run'
wandb_mode = 'offline'       # 'offline' (sync later with `wandb sync`), 'online' or 'disabled'
# -----------------------------------------------------------------------------
from configurator import check_device, check_ranges, configure, lock_folder  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------
check_ranges('train', globals(), at_least=dict(
    max_iters=0, max_minutes=0, eval_interval=1, eval_events=0, train_events=0, log_interval=1, max_pulses=1, max_doms=1,
    max_events=1, max_pulses_per_dom=1, gradient_accumulation_steps=1, micro_threads=0, loader_workers=0,
    learning_rate=0, min_lr=0, warmup_iters=0, lr_decay_iters=0, grad_clip=0, ema_decay=0, truth_weight=0,
    angular_weight=0, t1_dim=1, t1_layers=0, t1_heads=1, t2_dim=1, t2_layers=1, t2_heads=1, mlp_ratio=1, beta1=0,
    beta2=0), below=dict(beta1=1, beta2=1, ema_decay=1),
    # the heads split the width (a resumed run takes its checkpoint's model, whatever these say)
    more=[f"{t}_dim={dim} (a multiple of {t}_heads={heads})"
          for t, dim, heads in (('t1', t1_dim, t1_heads), ('t2', t2_dim, t2_heads))
          if init_from == 'scratch' and heads >= 1 and dim % heads]
    + ([f"min_lr={min_lr!r} (at most learning_rate={learning_rate!r}: the decay would raise it)"] if min_lr > learning_rate else []),
    choices=dict(init_from=('scratch', 'resume'), features=('model', 'loader'),
    attn=('auto', 'flex', 'sdpa'), dtype=('float32', 'bfloat16'), wandb_mode=('offline', 'online', 'disabled')))
if not out_dir:
    raise SystemExit("train: error: out_dir is empty; name the folder for the checkpoints")
check_device('train', device)
if attn == 'flex' and not device.startswith('cuda'):
    raise SystemExit("train: error: attn='flex' trains on CUDA only (FlexAttention has no CPU backward in this torch); "
                     "on the CPU use attn='sdpa' or 'auto'")

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        if local_rank >= torch.cuda.device_count():  # (set_device's own error is a traceback per rank)
            raise SystemExit(f"train: error: local rank {local_rank} has no GPU of its own: this node has "
                             f"{torch.cuda.device_count()}; give torchrun --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
out_dir_error = None  # rank 0's one line on why out_dir cannot be this run's: under torchrun every rank stops on it
if master:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # under a read-only folder: was a traceback
        out_dir_error = SystemExit(f"train: error: {out_dir}: cannot make it ({e.strerror}); give an out_dir you can write")
    # one run per out_dir, held until this process ends: a second one started beside it (a job resubmitted while the
    # first still runs) moved the first's checkpoints into previous/ (deleting the run kept there) or resumed from
    # them, and then both wrote ckpt.pt, best.pt and log.jsonl in turn, sharing ckpt.pt.tmp
    try:
        out_dir_lock = None if out_dir_error else lock_folder('train', out_dir)
    except SystemExit as e:
        out_dir_error = e
if ddp:  # rank 0 alone stopped, and the other ranks died at their first reduce in a traceback ('Connection closed by peer')
    stop = torch.tensor(float(out_dir_error is not None), device=device)
    dist.all_reduce(stop)
    if stop.item():
        dist.destroy_process_group()
        raise out_dir_error or SystemExit(1)
elif out_dir_error:
    raise out_dir_error
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


def next_batch(loader):
    """The loader's next batch (None after its last); damaged data met in it (prepare.Split names the file, the event
    and the command that rebuilds it) stops the run in one line, not a traceback from the loader's thread or worker."""
    try:
        return next(loader, None)
    except SplitError as e:
        fail(e)


if micro_threads > 1:
    # ops release the interpreter lock, so the threads' forward and backward passes overlap; each thread's ops run on
    # one core, where a single micro-batch spreads badly over two (many small ops, a nearly serial SDPA backward).
    # With two micro-batches per thread the order of their gradient sums would vary from run to run: one each.
    if ddp or compile or device_type != 'cpu' or gradient_accumulation_steps != micro_threads:
        fail(f"micro_threads={micro_threads} needs one CPU process, compile=False and gradient_accumulation_steps="
             f"{micro_threads} (one micro-batch per thread); under torchrun, with compile or on a GPU set --micro_threads=1")
    torch.set_num_threads(max(1, torch.get_num_threads() // micro_threads))

# data
try:
    train_split = open_split(os.path.join(data_dir, 'train'))
    val_split = open_split(os.path.join(data_dir, 'val'))
except (FileNotFoundError, SplitError) as e:
    fail(e)

# model: from scratch, or rebuilt from the checkpoint's model settings
model_args = dict(t1_dim=t1_dim, t1_layers=t1_layers, t1_heads=t1_heads, t2_dim=t2_dim, t2_layers=t2_layers,
                  t2_heads=t2_heads, mlp_ratio=mlp_ratio, attn=attn)
# an argument added to IceModel and as a setting here, but not to model_args, trained the model's default while the
# run's config said otherwise
if missed := [k for k in inspect.signature(M.IceModel).parameters if k in config and k not in model_args]:
    fail(f"{', '.join(missed)}: a setting and an argument of model.IceModel, but not in train.py's model_args, which "
         f"passes the settings to the model: add it there")
iter_num, best_val, seconds_before, wandb_id = 0, float('inf'), 0.0, None
ckpt_path, prev_path, best_path = (os.path.join(out_dir, f) for f in ('ckpt.pt', 'ckpt.prev.pt', 'best.pt'))
CHECKPOINTS = ('ckpt.pt', 'ckpt.prev.pt', 'best.pt', 'ckpt.damaged.pt')
RUN_FILES = CHECKPOINTS + ('calibration.json', 'log.jsonl', 'eval_*.json', 'predictions_*.csv', 'submission.csv',
                           'resolution_*.png', 'coverage_*.png', 'training.png')  # a run's files, sample.py's too
checkpoint, damaged_ckpt, data_order = None, None, None


def load_resume_checkpoint():
    """ckpt.pt; if it is missing or unreadable (a write cut short, a damaged disk), the newest readable of
    ckpt.prev.pt (the one before it) and best.pt (a copy of ckpt.pt at the best evaluation, so a full training
    state too, and newer than ckpt.prev.pt when the last evaluation was the best), with a message."""
    global damaged_ckpt
    problems, found = [], []
    for path in (ckpt_path, prev_path, best_path):
        if not os.path.exists(path):
            problems.append(f"{path} is missing")
            continue
        try:
            ck = M.read_checkpoint(path, ('model', 'optimizer', 'model_args', 'iter_num'))
        except ValueError as e:  # damaged, unreadable or foreign: all mean the same here
            problems.append(f"{path} is unreadable ({e})")
            continue
        if path == ckpt_path:
            return ck
        found.append((ck['iter_num'], path, ck))
    if not found:
        fail(f"init_from='resume' but there is no readable checkpoint in {out_dir}: {'; '.join(problems)}")
    it, path, ck = max(found, key=lambda f: f[0])  # the first on a tie: ckpt.prev.pt
    damaged_ckpt = os.path.join(out_dir, 'ckpt.damaged.pt') if os.path.exists(ckpt_path) else None
    log(f"train: {problems[0]}; resuming from {path} (iteration {it}) instead, the iterations since then are done again"
        + (f"; {ckpt_path} is kept as {damaged_ckpt} at the next checkpoint" if damaged_ckpt else ""))
    return ck


restarts = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))
if init_from == 'scratch' and restarts and any(os.path.exists(p) for p in (ckpt_path, prev_path, best_path)):
    # torchrun --max-restarts starts the ranks again with the same arguments after one fails: from scratch, that moved
    # the checkpoints of the attempt before into previous/ (replaced at the next restart) and trained from iteration 0
    log(f"train: torchrun restart {restarts}: resuming from the checkpoints in {out_dir} rather than starting over")
    init_from = 'resume'
if init_from == 'resume':
    checkpoint = load_resume_checkpoint()
    data_order = checkpoint.get('data_order')
    # the model the checkpoint holds, and the pulses per DOM it learned from, whatever the settings say: named when
    # they differ, and recorded as they are in the next checkpoint's config
    # (not attn: the attention layout computes the same function with the same weights, and a run trained with
    # attn='flex' on a GPU must resume on the CPU with this run's 'auto' or 'sdpa', FlexAttention having no CPU backward)
    kept = {**{k: v for k, v in checkpoint['model_args'].items() if k != 'attn'},
            'max_pulses_per_dom': checkpoint['max_pulses_per_dom']}
    differ = [f"{k}={v!r} (not {config[k]!r})" for k, v in kept.items() if config.get(k, v) != v]
    if differ:
        log(f"train: a resumed run keeps its checkpoint's model and max_pulses_per_dom: {', '.join(differ)}")
    # the other settings are this run's: named where they differ from the run it continues (a loss weight changed
    # mid-run changes what log.jsonl's train and val losses measure from here on)
    changed = [f"{k}={config[k]!r} (was {v!r})" for k, v in checkpoint.get('config', {}).items()
               if k in config and k not in kept and k != 'init_from' and config[k] != v]
    if changed:
        log(f"train: resumed with settings other than the checkpoint's: {', '.join(changed)}")
    config.update((k, v) for k, v in kept.items() if k in config)
    model_args = {**checkpoint['model_args'], 'attn': attn}
    max_pulses_per_dom = checkpoint['max_pulses_per_dom']
    iter_num, best_val, seconds_before = checkpoint['iter_num'], checkpoint['best_val'], checkpoint['train_seconds']
    wandb_id = checkpoint.get('wandb_id')
    if os.path.realpath(checkpoint['data_dir']) != os.path.realpath(data_dir):  # fine-tuning on other data, say
        log(f"train: resuming on data_dir={data_dir!r}, not the checkpoint's {checkpoint['data_dir']!r}: best.pt "
            f"starts over (val errors of other data do not compare)")
        best_val = float('inf')
elif master:
    # a fresh run in an out_dir that holds another run's files: they move aside, not lost (a run started without
    # --init_from=resume by mistake and stopped before its first checkpoint), and not mistaken for this run's (sample.py's
    # results and submission.csv too). A run that saved no checkpoint left only its log: that goes, and previous/ keeps
    # the last run that trained something.
    # (glob_in: out_dir run[1] read as a pattern matched run1, another run's files, and the move stopped in a traceback)
    previous = sorted({os.path.basename(f) for pattern in RUN_FILES for f in glob_in(out_dir, pattern)})
    trained = any(f in previous for f in CHECKPOINTS)
    if 'log.jsonl' in previous and not trained:
        os.remove(os.path.join(out_dir, 'log.jsonl'))
        previous.remove('log.jsonl')
        log(f"train: from scratch in {out_dir}: removed the log.jsonl of a run that saved no checkpoint")
    if previous:
        if trained:
            shutil.rmtree(os.path.join(out_dir, 'previous'), ignore_errors=True)
        os.makedirs(os.path.join(out_dir, 'previous'), exist_ok=True)
        for f in previous:
            os.replace(os.path.join(out_dir, f), os.path.join(out_dir, 'previous', f))
        log(f"train: from scratch in {out_dir}: the previous run's {', '.join(previous)} moved to {out_dir}/previous/")
if ddp:  # every rank goes on from one state: on several nodes, an out_dir that is not one shared folder gave a rank
    # another run's checkpoint, or none, and its iteration count parted from the others' (a hang at the end)
    state = torch.tensor([iter_num, seconds_before], dtype=torch.float64, device=device)
    span = torch.cat([state, -state])
    dist.all_reduce(span, op=dist.ReduceOp.MAX)
    if (span[:2] != -span[2:]).any():
        fail(f"the ranks start from different states (iterations {-span[2].item():.0f} to {span[0].item():.0f}); this "
             f"rank, {rank}, from {'iteration ' + str(iter_num) if checkpoint else 'scratch'} in {out_dir}: every rank "
             f"must see the same out_dir (on several nodes, one shared folder)")
raw_model = M.IceModel(**model_args)
if checkpoint is not None and M.load_weights(raw_model, checkpoint.get('train_model', checkpoint['model']),
                                             f"the checkpoint in {out_dir}", 'train', checkpoint.get('model_sha1')):
    log("train: the checkpoint was written by another model.py (edited since, or another commit): its weights fit "
        "this one's shapes and train on with this one's inputs and code")
raw_model.to(device)
# The averaged weights: on the toy data the val error of the training weights jumps by up to 0.05 rad from one
# evaluation to the next late in a run, which makes the best checkpoint a lottery; the average's moves by 0.002-0.004.
ema = None
if ema_decay and checkpoint is not None and 'train_model' in checkpoint:
    ema = [checkpoint['model'][name].to(device) for name, _ in raw_model.named_parameters()]
elif ema_decay:
    ema = [p.detach().clone() for p in raw_model.parameters()]

# the loader builds each batch's stream layout (and with features='loader' the features) ahead of the step, in
# pinned memory for a GPU; the step then copies it without waiting. On a 2-core CPU the features in the loader made
# the main job slower, not faster: its work took the core that the step's second thread needed, and its Python held
# the interpreter lock the step's own dispatch waits for (notes/experiments.md)
attn_path = raw_model.path(device)  # 'flex' or 'sdpa', the attention layout the loader builds
to_model = functools.partial(M.model_inputs, path=attn_path, with_features=features == 'loader')
pin = device_type == 'cuda'

# the seed's weights in the prediction (IceModel.with_seed) learn from a loss that reaches nothing else; clipped on
# their own, their gradient (large when a bright track's seed weight is wrong) never shrinks the network's step
seed_weights = list(raw_model.combine.parameters())
network_weights = [p for name, p in raw_model.named_parameters() if not name.startswith('combine.')]
decay = [p for p in raw_model.parameters() if p.dim() >= 2]
no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
# fused: one kernel per step on either device (the unfused CPU path reads its step count with .item())
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                               {'params': no_decay, 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=True)
# the optimizer's parameters by name, in its order: torch matches a checkpoint's moments to them by position alone
name_of = {id(p): n for n, p in raw_model.named_parameters()}
optimizer_params = [name_of[id(p)] for group in optimizer.param_groups for p in group['params']]
if checkpoint is not None:
    # a model.py whose parameters come in another order (the same names and shapes, so its weights load) gave the
    # moments to the wrong ones without a word; of other shapes, the fused CPU step aborted ('double free or
    # corruption'). Checkpoints written before the names were recorded get the shapes checked
    saved, state = checkpoint.get('optimizer_params', optimizer_params), checkpoint['optimizer']['state']
    params = dict(raw_model.named_parameters())
    differ = [n for i, n in enumerate(optimizer_params) if i >= len(saved) or saved[i] != n
              or i in state and state[i]['exp_avg'].shape != params[n].shape]
    if differ or [len(g['params']) for g in checkpoint['optimizer']['param_groups']] != [len(decay), len(no_decay)]:
        fail(f"the checkpoint in {out_dir}: its optimizer state does not fit this model.py's parameters (first "
             f"{(differ or ['the groups'])[0]}): it was written by another version; train a new model, or use the "
             f"commit that wrote it")
    optimizer.load_state_dict(checkpoint['optimizer'])
    # load_state_dict also brings back the checkpoint's betas and weight decay: this run's settings apply instead (the
    # learning rate is set every iteration), as the config that the next checkpoint records says
    for group, wd in zip(optimizer.param_groups, (weight_decay, 0.0)):
        group.update(betas=(beta1, beta2), weight_decay=wd)
    checkpoint = None  # its weights and moments are in the model and the optimizer now: not held twice

eval_model = torch.compile(raw_model, mode=compile_mode) if compile else raw_model  # evaluation runs without DDP
model = DDP(eval_model, device_ids=[local_rank] if device_type == 'cuda' else None) if ddp else eval_model

n_t1 = sum(p.numel() for n, p in raw_model.named_parameters() if n.startswith(('pulse_embed', 't1.', 't1_ln')))
n_train = min(train_events, len(train_split)) if train_events else len(train_split)
# the shape trained, whatever set it: a default edited above does nothing where a config file sets the same setting
model_shape = {t: f"{raw_model.args[f'{t}_dim']} wide x {raw_model.args[f'{t}_layers']} deep" for t in ('t1', 't2')}
log(f"train: {raw_model.num_params() / 1e6:.3f}M parameters (T1 {model_shape['t1']}, {n_t1 / 1e6:.3f}M; T2+head "
    f"{model_shape['t2']}, {(raw_model.num_params() - n_t1) / 1e6:.3f}M); {n_train} train / {len(val_split)} val events "
    f"in {data_dir}; device {device} x{world_size}, attention {attn_path}, "
    f"compile={compile}, amp={dtype if use_amp else 'off'}, weight average {ema_decay:g}; {max_iters} iterations"
    f"{f' or {max_minutes:g} min' if max_minutes else ''}; micro-batch {max_pulses} pulses / {max_doms} DOMs / "
    f"{max_events} events, {gradient_accumulation_steps} per rank per iteration"
    f"{f' ({micro_threads} threads at once)' if micro_threads > 1 else ''}; "
    f"{'resuming at iter ' + str(iter_num) if init_from == 'resume' else 'from scratch'}")
if compile:  # nothing is logged until the compile is over: say why
    log("train: compile=True: the first iteration compiles the step, the first evaluation the forward again "
        + ("(minutes on the CPU, where later iterations run no faster than eager; config/toy_cpu.py sets --compile=False)"
           if device_type == 'cpu' else "(about 3 minutes for config/baseline_1m.py on an H200 with torch 2.11)"))

wandb = None
if wandb_log and master:
    import wandb
    # a resumed run goes on logging into its wandb run (the checkpoint keeps the run's id): a run preempted and
    # resumed on a cluster was a new wandb run each time, its curve in pieces
    wandb_id = wandb.init(project=wandb_project, name=wandb_run_name, config=config, mode=wandb_mode, dir=out_dir,
                          id=wandb_id, resume='allow' if wandb_id else None).id
    if wandb_mode == 'offline':
        log(f"train: wandb run {wandb_id}, offline; to upload it with the runs it resumed: "
            f"wandb sync --id={wandb_id} {shlex.quote(out_dir)}/wandb/offline-run-*-{wandb_id}*")
    # every chart against the iteration: by default wandb counts log calls, and the train and val lines (logged at
    # log_interval and eval_interval) would part from each other and from another run's with other intervals
    wandb.define_metric('iter')
    wandb.define_metric('*', step_metric='iter')


clock_ends_run = False  # whether the time budget, not max_iters, is to end the run (get_lr)


def get_lr(it, seconds):
    global clock_ends_run
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    decay_iters = lr_decay_iters or max_iters
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    if max_minutes and not lr_decay_iters:
        # whichever budget runs out first: the clock leads the cosine once, at the agreed rate, it would end the run
        # before max_iters (and from then on, so that a faster hour never turns the cosine back), or while the rate is
        # unknown (before the first log point). The clock counts the warmup and the iterations' ratio does not, so with
        # max() alone the clock led just after the warmup even where max_iters ends the run long before the budget,
        # and two runs of config/toy_cpu.py --max_iters=130 differed (232 of 290 tensors, up to 2.2e-5)
        per_iter = clock['per_iter']
        clock_ends_run = clock_ends_run or (per_iter > 0 and seconds + per_iter * (max_iters - it) > 60 * max_minutes)
        if clock_ends_run or per_iter == 0:
            ratio = max(ratio, seconds / (60 * max_minutes))
    if ratio >= 1:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def all_sum(values):
    """Sums over ranks of a few numbers (Python floats or device scalars), read on the host: a synchronisation, so the
    training loop calls it once per log interval and at evaluations only."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
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


def event_losses(pred, b):
    """Per event slot of micro-batch b: the direction's loss plus truth_weight times the kind and energy heads'."""
    return (M.per_event_loss(pred, b['event_dir'], b['event_index'] >= 0, angular_weight)
            + truth_weight * M.truth_loss(pred, b['event_track'], b['event_log_energy']))


@torch.no_grad()
def evaluate():
    """Mean angular error (rad) and mean loss of the averaged weights over the first eval_events val events,
    split across ranks, and how many events that was."""
    swap_ema()
    eval_model.eval()
    loader = BatchLoader(val_split, max_pulses, max_doms, max_events, max_pulses_per_dom, shuffle=False,
                         rank=rank, world_size=world_size, epochs=1, max_events_total=eval_events, transform=to_model,
                         workers=loader_workers, pin_memory=pin)
    err_sum = loss_sum = n = 0.0
    while (batch := next_batch(loader)) is not None:
        b = M.to_device(batch, device)
        real = b['event_index'] >= 0
        with autocast:
            pred = eval_model(b)
        target = torch.where(real[:, None], b['event_dir'].float(), 0.0)
        err_sum += torch.where(real, M.direction_error(pred, target), 0.0).sum()
        loss_sum += event_losses(pred, b).sum()
        n += batch['n_events']
    loader.close()
    err_sum, loss_sum, n = all_sum([err_sum, loss_sum, n])
    eval_model.train()
    swap_ema()
    return err_sum / max(n, 1), loss_sum / max(n, 1), int(n)


def data_start():
    """(loader seed, (epoch, position)) for this rank: on resume, where the checkpoint's data order stopped, so the
    run sees the batches an uninterrupted one would; a fresh shuffle if the ranks, seed or events changed."""
    if init_from != 'resume':
        return seed, (0, 0)
    if data_order and (data_order['seed'], data_order['world_size'], data_order['n_events']) == (seed, world_size, n_train):
        return data_order['loader_seed'], tuple(data_order['positions'][rank])
    log("train: the checkpoint's data order does not apply (another seed, world size or train_events, or an older "
        "checkpoint); the data are shuffled afresh")
    return seed + iter_num, (0, 0)


def record(row):
    """One line of out_dir/log.jsonl, the training curves that sample.py plots; master rank only, at log and eval
    points, from numbers already on the host."""
    if master:
        try:
            with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(row) + '\n')
        except OSError as e:  # a full disk: was a traceback (a line cut short is dropped by the resume's start_record)
            fail(f"{os.path.join(out_dir, 'log.jsonl')}: cannot append to it ({e.strerror or e}); free some space and "
                 f"resume (--init_from=resume) from the last checkpoint, {ckpt_path}")


def start_record():
    """A fresh run starts out_dir/log.jsonl anew; a resumed one keeps its lines up to the checkpoint's iteration
    (not those of a stopped run past it, nor a line cut short when it was killed)."""
    path = os.path.join(out_dir, 'log.jsonl')
    if master:
        lines = []
        if init_from == 'resume' and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()
        with open(path + '.tmp', 'w') as f:
            f.writelines(line for line in lines if line.endswith('\n') and json.loads(line)['iter'] <= iter_num)
        os.replace(path + '.tmp', path)


def save_checkpoint(path, best=False):
    """Called on every rank, which gathers the ranks' data positions; rank 0 writes. Atomic: a temporary file renamed
    over the old one, and the old one renamed to ckpt.prev.pt, a way back if the new one is damaged later. best: a
    copy goes to best.pt too, first (write_best).
    'model' holds the weights to use (the averaged ones), 'train_model' the training weights that a resumed run
    continues from; 'train_seconds' the agreed clock, which each caller has just read (flush_window): the loop's
    estimate between log points was 0 before a run's first."""
    global saved_iter, damaged_ckpt
    flat = [0.0] * (2 * world_size)
    flat[2 * rank:2 * rank + 2] = loader.position
    flat = all_sum(flat)
    saved_iter, set_aside, damaged_ckpt = iter_num, damaged_ckpt, None  # on every rank: stop_for_signal reads them
    if not master:
        return
    weights = {'model': raw_model.state_dict()}
    if ema is not None:
        weights = {'model': {**weights['model'], **dict(zip([n for n, _ in raw_model.named_parameters()], ema))},
                   'train_model': weights['model']}
    ckpt = {**weights, 'optimizer': optimizer.state_dict(), 'model_args': raw_model.args,
            'iter_num': iter_num, 'best_val': best_val, 'config': config, 'train_seconds': clock['seconds'],
            'optimizer_params': optimizer_params,  # the optimizer state's parameters, which a resume checks
            # data_dir by its full path: a relative one named another folder, or none, for a sample.py run elsewhere
            'max_pulses_per_dom': max_pulses_per_dom, 'data_dir': os.path.abspath(data_dir), 'wandb_id': wandb_id,
            'truth_heads': bool(truth_weight > 0 and train_split.truth is not None),  # sample.py reads them if so
            'model_sha1': M.SOURCE_SHA1,  # the model.py that trained it (sample.py and a resume compare theirs)
            'data_order': {'seed': seed, 'world_size': world_size, 'n_events': n_train, 'loader_seed': loader_seed,
                           'positions': [[int(flat[2 * r]), int(flat[2 * r + 1])] for r in range(world_size)]}}
    tmp = path + '.tmp'
    buf = io.BytesIO()  # serialised in memory, then written: torch.save into a full disk raised a RuntimeError
    torch.save(ckpt, buf)  # ('unexpected pos ...') in place of ENOSPC, a traceback that left the cut ckpt.pt.tmp behind
    try:
        with open(tmp, 'wb') as f:
            f.write(buf.getbuffer())
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"{path}: cannot write the checkpoint ({e.strerror or e}); the previous {path} is intact: free some space "
             f"and resume (--init_from=resume)")
    best_error = write_best(tmp) if best else None
    if os.path.exists(path):  # a damaged ckpt.pt that the run resumed past is set aside, not kept as the previous one
        # the old one kept by a second name (a hard link) before the new one replaces it: renamed away first, ckpt.pt
        # was missing for an instant, and a sample.py --ckpt=ckpt.pt started then found no checkpoint
        try:
            if os.path.lexists(tmp + '.old'):  # left by a run killed between the link and the rename (one writer: lock_folder)
                os.remove(tmp + '.old')
            os.link(path, tmp + '.old')
            os.replace(tmp + '.old', set_aside or prev_path)
        except OSError:  # a file system without hard links: renamed, as before
            os.replace(path, set_aside or prev_path)
    os.replace(tmp, path)
    if best_error:
        fail(f"{best_path}: cannot write it ({best_error.strerror or best_error}); the previous best.pt is intact and "
             f"{path} holds this better one (iteration {iter_num}): free some space, then cp {path} {best_path}")


def write_best(tmp):
    """best.pt, a copy of the checkpoint just written (serialising a big model twice costs seconds), renamed into place
    before ckpt.pt is: a run killed between the two left a ckpt.pt whose best_val (this evaluation's) no best.pt held,
    and the resume, whose evaluations then had to beat it, never wrote best.pt. Returns the OSError of a full disk,
    which stops the run once ckpt.pt holds the checkpoint too."""
    try:
        shutil.copyfile(tmp, best_path + '.tmp')
        os.replace(best_path + '.tmp', best_path)
    except OSError as e:  # a full disk: was a traceback that left the cut best.pt.tmp behind
        if os.path.exists(best_path + '.tmp'):
            os.remove(best_path + '.tmp')
        return e
    return None


stop_signal, signal_time = None, 0.0


def on_signal(signum, frame):
    # only a flag, read between iterations: the iteration in progress finishes, then the state is saved. Alone, a
    # second signal a second or more later stops at once, saving nothing (a first iteration that compiles can take
    # minutes). Not under torchrun: a scheduler's SIGTERM to every process of the job reaches a rank both directly and
    # forwarded by torchrun, whose own grace period then ends the ranks (a Ctrl-C reaches torchrun alone, which
    # forwards it: each rank runs in a session of its own)
    global stop_signal, signal_time
    if stop_signal is not None:
        if not ddp and time.time() - signal_time >= 1.0:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return
    stop_signal, signal_time = signum, time.time()
    os.write(2, f"train: {signal.Signals(signum).name}: stopping after this iteration"
                f"{'' if ddp else '; a second one stops at once, unsaved'}\n".encode())  # not print: the handler may interrupt one


def stopping():
    """Whether to stop for a signal now, the same answer on every rank. Alone: the handler's flag, free to read
    every iteration. Under torchrun the ranks must stop at the same iteration, so they compare flags in the small
    reduce of each log point (flush_window), which costs the step no host sync."""
    return stop_signal is not None if not ddp else window['stop']


def stop_for_signal():
    """Save the finished iterations and exit 128 + the signal number (143 SIGTERM, 130 SIGINT: a scheduler sees a
    stopped job, not a finished one)."""
    sig = stop_signal or signal.SIGTERM  # under torchrun a rank may stop for another rank's signal
    if window['iters']:
        flush_window()  # checks the loss before it is saved; the checkpoint takes the clock it reads
    if iter_num != saved_iter or (damaged_ckpt and iter_num > 0):  # after a fallback, ckpt.pt is the damaged one
        save_checkpoint(ckpt_path)
    if ddp:
        dist.barrier()  # rank 0 has written before any rank leaves (torchrun stops the others when one leaves)
    loader.close()
    log(f"train: {signal.Signals(sig).name}: stopped at iteration {iter_num}; " + (
        f"{ckpt_path} holds it, continue with --init_from=resume" if iter_num > 0
        else "nothing was trained yet, so nothing was saved"))
    if wandb is not None:
        wandb.finish(exit_code=128 + sig)
    if ddp:
        dist.destroy_process_group()
    sys.exit(128 + sig)


# training loop. Nothing in an iteration waits for the device: the batch's numbers of events and pulses come from the
# loader (host ints), the loss accumulates on the device, and the clock that the time budget and the learning rate
# follow is agreed by all ranks at log points (one small reduce, the only host synchronisation between them) and
# extrapolated in between, so every rank takes the same learning rate and stops at the same iteration.
loader_seed, start = data_start()
try:
    loader = BatchLoader(train_split, max_pulses, max_doms, max_events, max_pulses_per_dom, shuffle=True,
                         seed=loader_seed, rank=rank, world_size=world_size, max_events_total=train_events, start=start,
                         transform=to_model, workers=loader_workers, pin_memory=pin)
except ValueError as e:  # more ranks than train events
    fail(e)
saved_iter = iter_num
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
model.train()
t_start = t_begin = time.time()  # t_start moves past each evaluation: evaluation time is not training time
clock = dict(iter=iter_num, seconds=seconds_before, per_iter=0.0)  # the agreed clock at the last log point
# the iterations since the last log point: t when the window began, t1 when its first iteration ended (the clock's
# rate leaves that one out, flush_window), wait the seconds spent waiting for the loader's batches, stop whether any
# rank had a signal at the last log point
window = dict(iters=0, events=0, pulses=0, loss=torch.zeros((), device=device), t=t_start, t1=t_start, wait=0.0,
              stop=False)


def last_good():
    """Where to go on from after the loss or the val error went bad, and what to change."""
    where = (f"the last good checkpoint is {ckpt_path} (iteration {saved_iter})" if saved_iter > first_iter or init_from == 'resume'
             else "nothing was saved yet")
    return f"{where}. Try a lower learning_rate or grad_clip."


def flush_window():
    """A log point: one reduce over ranks of the window's loss, events, pulses, seconds and waits for the loader;
    checks the loss, logs, and advances the agreed clock."""
    if device_type == 'cuda':  # the window's work done, not only queued, before the clock is read (the reduce below
        torch.cuda.synchronize()  # would wait for it anyway): else the rate counts the host's launches
    now = time.time()
    loss_sum, events, pulses, elapsed, steady, waited, stops = all_sum([window['loss'], window['events'], window['pulses'],
        now - t_start, now - window['t1'], window['wait'], float(stop_signal is not None)])
    loss_mean = loss_sum / max(events, 1)
    if not math.isfinite(loss_mean):
        fail(f"loss is {loss_mean} at iteration {iter_num}: stopping; {last_good()}")
    seconds = seconds_before + elapsed / world_size
    # the rate the clock extrapolates with leaves out the window's first iteration: a run's first one compiles (tens
    # of seconds on a GPU), and counted in the rate it would run the clock past max_minutes before the next log point
    n = window['iters']
    per_iter = steady / world_size / (n - 1) if n > 1 else (seconds - clock['seconds']) / max(iter_num - clock['iter'], 1)
    clock.update(per_iter=per_iter, iter=iter_num, seconds=seconds)
    dt = (now - window['t']) / max(n, 1)
    left = per_iter * (max_iters - iter_num)
    if max_minutes:
        left = max(min(left, 60 * max_minutes - seconds), 0.0)  # the last iteration may pass the budget
    window_s = max(now - window['t'], 1e-9)
    # the share of the window the loop waited for the loader (the ranks' mean): near 0 while the loader keeps ahead of
    # the step; where it does not, events/s measures the loader (more loader_workers, or features='model')
    wait = waited / world_size / window_s
    log(f"iter {iter_num}: loss {loss_mean:.4f}, lr {lr:.2e}, {events / window_s:.0f} events/s, "
        f"{pulses / window_s:.0f} pulses/s, {dt * 1000:.0f} ms/iter, loader wait {wait:.0%}, {left / 60:.1f} min left")
    record({'iter': iter_num, 'train_loss': loss_mean, 'lr': lr})
    if wandb is not None:
        wandb.log({'iter': iter_num, 'train/loss': loss_mean, 'lr': lr, 'events_per_s': events / window_s,
                   'loader_wait': wait})
    window.update(iters=0, events=0, pulses=0, loss=torch.zeros((), device=device), t=time.time(), wait=0.0, stop=stops > 0)


def micro_step(b, share):
    """Forward and backward of one micro-batch (on the device), its loss scaled to the iteration's mean per event
    (share: the iteration's events on this rank, or under DDP the job's mean per rank); returns the sum of its
    events' losses (a device scalar, not read here)."""
    with autocast:
        pred = model(b)
    per = event_losses(pred, b).sum()
    (per / share).backward()
    return per.detach()


threads = concurrent.futures.ThreadPoolExecutor(micro_threads) if micro_threads > 1 else None
lr = get_lr(iter_num, seconds_before)
first_iter = iter_num
start_record()
while True:
    seconds = clock['seconds'] + (iter_num - clock['iter']) * clock['per_iter']  # the same on every rank
    last = iter_num >= max_iters or (max_minutes > 0 and seconds >= 60 * max_minutes)
    if (iter_num % eval_interval == 0 and iter_num > first_iter) or last:
        if window['iters']:
            flush_window()
        seconds = clock['seconds']
        t_eval = time.time()
        val_err, val_loss, n_val = evaluate()
        if not math.isfinite(val_err):  # NaN weights: saved, they would pass for the last good checkpoint
            fail(f"val error is {val_err} at iteration {iter_num}: the averaged weights went bad; {last_good()}")
        improved = val_err < best_val
        best_val = min(best_val, val_err)
        log(f"eval iter {iter_num}: val mean angular error {val_err:.4f} rad ({math.degrees(val_err):.2f} deg), "
            f"val loss {val_loss:.4f}, {n_val} events, best {best_val:.4f} rad ({time.time() - t_eval:.1f}s)")
        record({'iter': iter_num, 'val_error': val_err, 'val_loss': val_loss, 'seconds': seconds})
        save_checkpoint(ckpt_path, best=improved)
        if wandb is not None:
            wandb.log({'iter': iter_num, 'val/angular_error': val_err, 'val/angular_error_deg': math.degrees(val_err),
                       'val/loss': val_loss, 'val/best': best_val})
        t_eval = time.time() - t_eval  # evaluation time is not training time
        t_start += t_eval
        window['t'] += t_eval
    if last:
        break
    if stopping():
        stop_for_signal()

    lr = get_lr(iter_num, seconds)
    for g in optimizer.param_groups:
        g['lr'] = lr
    t_wait = time.perf_counter()
    micro = [next_batch(loader) for _ in range(gradient_accumulation_steps)]
    window['wait'] += time.perf_counter() - t_wait
    micro = [M.to_device(b, device) for b in micro]  # copies queued at once
    n_events = sum(b['n_events'] for b in micro)  # this rank's
    share = n_events
    if ddp:  # DDP averages the ranks' gradients: each divides its loss sum by the job's mean events per rank, so every
        # event weighs the same (a rank of a few large events weighed each of them more); an all-reduce of the counts
        # on the device, from the batches already there (a count copied from the host would wait for the device)
        share = sum((b['event_index'] >= 0).sum() for b in micro).float()
        dist.all_reduce(share)
        share = share / world_size
    if threads is None:
        for k, batch in enumerate(micro):
            if ddp:
                model.require_backward_grad_sync = k == len(micro) - 1
            window['loss'] += micro_step(batch, share)
    else:  # the gradients of the threads' micro-batches add up in the weights' .grad (autograd locks each sum)
        for per in threads.map(micro_step, micro, [share] * len(micro)):
            window['loss'] += per
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(network_weights, grad_clip)
        torch.nn.utils.clip_grad_norm_(seed_weights, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:  # the decay starts at 0.1 and grows to ema_decay, so the first weights fade fast
        torch._foreach_lerp_(ema, [p.detach() for p in raw_model.parameters()], 1 - min(ema_decay, (1 + iter_num) / (10 + iter_num)))
    iter_num += 1
    window['iters'] += 1
    if window['iters'] == 1:
        window['t1'] = time.time()
        if compile and iter_num == first_iter + 1:  # what each start of a compiled run costs, which the rates leave out
            log(f"train: the first iteration took {window['t1'] - window['t']:.1f} s (the compile included)")
    window['events'] += n_events
    window['pulses'] += sum(b['n_pulses'] for b in micro)
    if iter_num % log_interval == 0 or iter_num == max_iters:
        flush_window()

loader.close()
if threads is not None:
    threads.shutdown()
# this run's iterations, as the minutes are this run's (a resumed run's iter_num counts those before it too)
log(f"train: done, {iter_num - first_iter} iterations{f' (from iteration {first_iter} to {iter_num})' if first_iter else ''} "
    f"in {(time.time() - t_start) / 60:.1f} min of training "
    f"({(time.time() - t_begin) / 60:.1f} with the evaluations), best val {best_val:.4f} rad "
    f"({math.degrees(best_val):.2f} deg); checkpoints in {out_dir}")
if wandb is not None:
    wandb.finish()
if ddp:
    dist.destroy_process_group()
if master:
    os.close(out_dir_lock)  # (the process's end would too: this is for a caller that runs train.py in its own process)
