"""Running a paper's grid at scale on engines researchers already use (README 'Running at scale'):

- `python -m papers.<slug> reproduce --launcher slurm|submitit-local ...` splits the grid (datasets x shots x
  seeds, `common.engine.cells`) into jobs submitted with submitit (`launcher.py`, `job.py`);
- `python -m common.launch status|gather <slug>` follows a launch and collects it (`status.py`);
- `python -m common.launch gpu -- <command>` gives each DVC experiment-queue worker its own GPU (`gpu.py`);
- data parallel within one run is torchrun's (`common.engine.distributed`).

Nothing is imported here, so `python -m common.launch gpu` starts without torch.
"""


def launch(*args, **kwargs):
    from .launcher import launch as _launch
    return _launch(*args, **kwargs)
