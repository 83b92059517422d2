"""Training methods, looked up by name in `METHODS` (imported on first use: `semiseg config show` stays fast).

The method contract: a module `methods/<name>.py` with
- `LOADERS`: the names of the data streams it reads (data/streams.py `STREAMS`), e.g.
  ("labeled", "unlabeled", "unlabeled_mix"); the first stream that defines the epoch sets its length.
- `train_step(model, batch, ctx) -> (loss, logs)`: one iteration's loss (a scalar tensor the trainer
  backpropagates) and a dict of scalar tensors to log (kept on the device; the trainer averages each over
  the steps that report it). `batch` maps the streams' tensor names (legend in data/streams.py) to device
  tensors, images ImageNet-normalised; `ctx` is an `engine.trainer.StepContext` (cfg, iteration, total,
  env, state, epoch). Call `model(...)` only (it may be a DDP wrapper), under the trainer's autocast.
- optionally `make_state(cfg, model, out, env)`: an object kept across steps, passed as `ctx.state`
  (PrevMatch's pool, S4MC's E_c, SemiVL's guidance encoder). It may define `state_dict()` /
  `load_state_dict(state)` (saved in and restored from the checkpoint: a resumed run continues exactly)
  and `after_eval(model, improved, iteration)` (called after each evaluation, before the checkpoint).
- optionally `OWN_BACKWARD = True`: train_step backpropagates itself (SimSeg's gradient cache), through
  `ctx.scale` (the GradScaler's scale) and the wrapper's `no_sync`, and returns its loss detached; the trainer
  then only steps the optimizer. `DDP_IGNORE`: parameter names the DDP wrapper leaves out (used outside its
  forward; the method all-reduces their gradients).
A method that extends another calls its pieces (UniMatch's `streams`, FixMatch's `cutmix`); it does not
copy them. The module docstring cites the paper and the equations it implements.
"""

METHODS: dict[str, str] = {
    "supervised": "semiseg_cli.methods.supervised",
    "fixmatch": "semiseg_cli.methods.fixmatch",
    "unimatch": "semiseg_cli.methods.unimatch",
    "prevmatch": "semiseg_cli.methods.prevmatch",
    "s4mc": "semiseg_cli.methods.s4mc",
    "semivl": "semiseg_cli.methods.semivl",
    "semiovs": "semiseg_cli.methods.semiovs",
    "slrnet": "semiseg_cli.methods.slrnet",
    "simseg": "semiseg_cli.methods.simseg",
}
