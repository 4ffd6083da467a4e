# The main job (config/toy_cpu.py: the same data, model and settings) trained for 90 minutes instead of 13, to see
# what more CPU time buys on a 2-core machine. Then evaluate as the main job:
#   python train.py config/toy_long.py
#   python sample.py --out_dir=out-toy-long
# and, for the likelihood fit on the bright tracks beside the model (the MPE fit takes about 15 minutes on 2,000 events):
#   python sample.py --out_dir=out-toy-long --baselines=linefit,linefit_improved,time_fit,mpe --max_events=2000
import os

exec(open(os.path.join(os.path.dirname(__file__), 'toy_cpu.py')).read())

out_dir = 'out-toy-long'
max_iters = 200000           # the time budget below ends the run first
max_minutes = 90.0           # of training (evaluations not counted); the cosine decay follows this clock
eval_interval = 2000
