"""The one training loop: plans, optimisers, clipping, EMA, checkpoints, signals, NaN guard.

SIGTERM, and SIGUSR1 (which SLURM sends before a time limit when asked to), make the loop finish
the current iteration, save a checkpoint and exit with STOP_EXIT; the retried job resumes from
that checkpoint and continues exactly where it stopped. SIGINT (Ctrl-C) does the same, with the
same exit status 75 (rerun to resume, whoever stopped it); a second Ctrl-C aborts at once without
saving (the last complete checkpoint stays).
"""
from __future__ import annotations

import copy
import json
import re
import signal
import sys
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from fewstep.engine import checkpoint, fsdp
from fewstep.engine.distributed import DistInfo, any_rank, average_gradients, barrier, broadcast_module
from fewstep.engine.method import Method
from fewstep.errors import FewstepError
from fewstep.io import write_text
from fewstep.options import option_aliases

STOP_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerun to resume


class NonFiniteLossError(FewstepError):
    pass


class StopRequested(Exception):
    """Raised after the checkpoint is saved; the CLI turns it into exit status STOP_EXIT."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by signal {signum} after iteration {step}; checkpoint saved, "
                         f"rerun the same command to resume")
        self.step, self.signum = step, signum


@dataclass
class RunState:
    step: int = 0
    resumed_from: int | None = None
    last: dict = field(default_factory=dict)
    ema_updates: int = 0
    ema_ticks: int = 0
    seconds: float = 0.0  # iteration wall time summed over every process of the run (resumes too)


class _Signals:
    """Records a stop request; the loop saves and stops after the iteration in flight."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the save
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# Options that only say how long to run and how often to save or log: a resume may change them
# (that is how a finished run is extended); any other change makes the checkpoint another run's.
RUN_LENGTH_OPTIONS = ("steps", "checkpoint_every", "log_every")


def run_config(method: Method, inputs: dict | None = None) -> dict:
    """The method and its resolved options, minus the run length, and the identities of the run's
    inputs (teacher, input files: fewstep.engine.run.run_inputs), as JSON values."""
    options = {k: v for k, v in asdict(method.opt).items() if k not in RUN_LENGTH_OPTIONS}
    return json.loads(json.dumps({"method": method.name, **options, "inputs": inputs or {}},
                                 default=str))


def _changes(saved: dict, current: dict) -> list[str]:
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}".replace("'", "")
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def check_same_run(saved: dict | None, current: dict, folder, aliases: dict | None = None,
                   defaults: dict | None = None) -> None:
    """Refuse to resume a checkpoint written with another method, other options, another teacher
    or other input files. An option the checkpoint records under a paper's name (an alias of the
    options class) is compared as its harness name; an option it does not record (added since)
    ran as its default, which keeps the old behaviour (`defaults`: the options class's)."""
    if saved is None:  # a checkpoint from before configs were recorded
        return
    saved = {(aliases or {}).get(k, k): v for k, v in saved.items()}
    current = {k: v for k, v in current.items()
               if k in saved or k not in (defaults or {}) or v != _json(defaults[k])}
    if "inputs" not in saved:  # a checkpoint from before inputs were recorded: nothing to compare
        print(f"fewstep: warning: the checkpoint {folder} records no inputs (written before fewstep "
              "recorded the teacher and input files): cannot check this resume uses the same ones",
              file=sys.stderr)
    changed = _changes({k: v for k, v in saved.items() if k != "inputs"},
                       {k: v for k, v in current.items() if k != "inputs"})
    if "inputs" in saved:
        changed += _changes(saved["inputs"], current.get("inputs", {}))
    if changed:
        raise FewstepError(f"the checkpoint {folder} was written by another configuration ("
                           f"{'; '.join(changed)}); resuming it would mix two runs. Give a new "
                           "--run-dir, or restore those options, teacher and input files (only "
                           "steps, checkpoint_every and log_every may change across a resume)")


def _json(value):
    return json.loads(json.dumps(value, default=str))


def option_defaults(options) -> dict:
    """{name: default} of an options dataclass's fields that have a plain default."""
    return {f.name: f.default for f in fields(options) if f.default is not MISSING}


def warmup_factor(step: int, warmup: int, ticks: int = 1, start: str = "step") -> float:
    """LR multiplier after `step` scheduler steps: a linear warm-up over `warmup` ticks, constant
    after it; `ticks` ticks per step (Accelerate ticks a prepared scheduler once per process);
    `start` "step": the first step at 1 / warmup (fewstep's rule), "zero": at 0 (diffusers'
    constant_with_warmup, the official codes')."""
    if warmup <= 0:
        return 1.0
    return min(1.0, ticks * (step + (1 if start == "step" else 0)) / warmup)


def lr_schedulers(optimizers: dict, opt) -> dict:
    """One warm-up LambdaLR per network; its step count is in the checkpoint (exact resume)."""
    def factor(s, warm=int(opt.warmup), ticks=int(opt.warmup_ticks), start=opt.warmup_start):
        return warmup_factor(s, warm, ticks, start)
    return {n: torch.optim.lr_scheduler.LambdaLR(o, factor) for n, o in optimizers.items()}


def ema_decay(method: Method, updates: int) -> float:
    d = method.opt.ema_decay
    return min(d, (1 + updates) / (10 + updates)) if method.opt.ema_warmup else d


@torch.no_grad()
def lerp_toward(target: torch.nn.Module, source: dict, decay: float, copy_others: bool) -> None:
    """target <- decay target + (1 - decay) source over the floating-point state (lerp_ with
    weight 1 - decay); other entries (step counters) are copied when copy_others, else kept."""
    for name, e in target.state_dict().items():
        if e.dtype.is_floating_point:
            e.lerp_(source[name].to(e), 1.0 - decay)
        elif copy_others:
            e.copy_(source[name])


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    lerp_toward(ema, model.state_dict(), decay, copy_others=True)


class Trainer:
    def __init__(self, method: Method, run_dir: Path, info: DistInfo | None = None,
                 inputs: dict | None = None):
        self.method, self.run_dir = method, Path(run_dir)
        self.inputs = inputs or {}  # identities of the teacher and input files (run_inputs)
        self.info = info or DistInfo()
        opt = method.opt
        self.nets = method.networks()
        self.sharded = getattr(opt, "sharding", "ddp") == "fsdp"
        if getattr(opt, "fsdp_teacher", "replicate") == "shard" and not self.sharded:
            raise FewstepError(f"fsdp_teacher = shard needs sharding = fsdp (this run has "
                               f"sharding = {opt.sharding}): give sharding = fsdp, or "
                               "fsdp_teacher = replicate")
        self.emas = {"generator": copy.deepcopy(self.nets["generator"]).requires_grad_(False)} \
            if opt.ema_decay > 0 else {}
        self.skeletons: dict = {}  # FSDP: meta copies of the LoRA networks, for the export
        if self.sharded:  # before the optimisers: fully_shard replaces the parameters
            self.skeletons = shard_all(method, self.nets, self.emas, self.info)
        self.params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in self.nets.items()}
        self.optimizers = {n: torch.optim.AdamW(self.params[n], lr=method.lr(n), betas=tuple(opt.betas),
                                                weight_decay=method.weight_decay(n))
                           for n in self.nets}
        self.schedulers = lr_schedulers(self.optimizers, opt)
        self.state = RunState()
        self.exported: dict | None = None  # FSDP: the full weights gathered for export (rank 0)

    # -- checkpoints -------------------------------------------------------------------------------
    def resume(self) -> None:
        folder = checkpoint.latest(self.run_dir, report=self.info.main)
        if folder is None:
            if not self.sharded:  # FSDP: broadcast before sharding (shard_all)
                for module in self.nets.values():
                    broadcast_module(module, self.info)
            return
        fsdp.check_format(folder, self.sharded)
        check_same_run(checkpoint.read_extra(folder).get("config"),
                       run_config(self.method, self.inputs), folder,
                       option_aliases(type(self.method.opt)), option_defaults(self.method.opt))
        load = fsdp.load if self.sharded else checkpoint.load
        saved = load(folder, self.nets, self.emas, self.optimizers, self.schedulers)
        self.state.step = self.state.resumed_from = saved["step"]
        self.state.ema_updates = saved["extra"].get("ema_updates", 0)
        self.state.ema_ticks = saved["extra"].get("ema_ticks", 0)
        self.state.seconds = saved["extra"].get("train_seconds", 0.0)

    def save(self) -> None:
        extra = {"ema_updates": self.state.ema_updates, "ema_ticks": self.state.ema_ticks,
                 "train_seconds": self.state.seconds,
                 "config": run_config(self.method, self.inputs)}
        if self.sharded:  # every rank writes its shards
            fsdp.save(self.run_dir, self.state.step, self.nets, self.emas, self.optimizers,
                      self.schedulers, extra, self.info.main)
            return
        if self.info.main:
            checkpoint.save(self.run_dir, self.state.step, self.nets, self.emas, self.optimizers,
                            self.schedulers, extra)
        barrier(self.info)

    def gather_for_export(self) -> None:
        """FSDP: the full weights of every network (the EMA's for the generator) on rank 0, for
        fewstep.engine.run.export; a collective, so every rank calls it."""
        full = {n: fsdp.full_state_dict(m) for n, m in self.nets.items()}
        full.update({n: fsdp.full_state_dict(m) for n, m in self.emas.items()})
        if not self.info.main:
            self.exported = None
            return
        for name, frame in self.skeletons.items():  # the EMA has its generator's structure
            full[name] = fsdp.merged_full(frame, full[name])
        self.exported = full

    # -- one iteration -----------------------------------------------------------------------------
    def update(self, net: str, scratch: dict) -> dict:
        method, step = self.method, self.state.step
        opt = self.optimizers[net]
        opt.zero_grad(set_to_none=True)
        with method.ctx.autocast():
            loss, scalars = method.loss(net, scratch)
        finite = bool(torch.isfinite(loss.detach()).all())
        # FSDP: every rank stops together (a rank left behind would wait in the reduce-scatter)
        stop = any_rank(not finite, self.info) if self.sharded else not finite
        if stop:
            where = f"{loss.item()}" if not finite else f"{loss.item()} here, not finite on another rank"
            raise NonFiniteLossError(f"iteration {step}: the {net} loss of {method.name} is "
                                     f"{where}; stopping (last checkpoint kept)")
        if self.sharded:
            # FSDP's graph holds the unsharded parameters, not these DTensors, so no `inputs`:
            # other networks may get gradients too; each optimiser zeroes its own before use
            loss.backward()
        else:
            loss.backward(inputs=self.params[net])
            average_gradients(self.params[net], self.info)
        row = {f"{net}/loss": float(loss.detach())}
        if method.opt.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params[net], method.opt.grad_clip)
            if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor of the global norm
                norm = norm.full_tensor()
            if not torch.isfinite(norm):
                raise NonFiniteLossError(f"iteration {step}: the {net} gradient norm of "
                                         f"{method.name} is {norm.item()}; stopping")
            row[f"{net}/grad_norm"] = float(norm)
        opt.step()
        method.after_update(net)
        row.update({f"{net}/{k}": float(v.detach()) if torch.is_tensor(v) else float(v)
                    for k, v in scalars.items()})
        return row

    def iteration(self) -> dict:
        method = self.method
        method.ctx.step = self.state.step
        scratch: dict = {}
        row = {"step": self.state.step}
        plan = method.plan(self.state.step)
        for net in plan:
            row.update(self.update(net, scratch))
        # "iteration": every scheduler, updated or not (DMD2); "update": those of the networks
        # that updated (CDM steps each scheduler after its own optimiser)
        ticking = plan if method.opt.lr_schedule_on == "update" else self.schedulers
        with warnings.catch_warnings():
            # a network outside this iteration's plan has not stepped its optimiser; stepping its
            # scheduler anyway is intended under "iteration"
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for net in ticking:
                self.schedulers[net].step()
        if self.emas and (method.opt.ema_on == "iteration" or "generator" in plan):
            self.state.ema_ticks += 1
            if self.state.ema_ticks % method.opt.ema_every == 0:
                decay = ema_decay(method, self.state.ema_updates)
                ema_update(self.emas["generator"], self.nets["generator"], decay)
                self.state.ema_updates += 1
        return row

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> RunState:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        opt = self.method.opt
        if self.state.step > opt.steps:  # nothing to train, and the export would misname its length
            raise FewstepError(f"the checkpoint in {self.run_dir} is at iteration {self.state.step}, "
                               f"past steps = {opt.steps}; give steps >= {self.state.step} to "
                               "extend the run, or a new --run-dir")
        log_path = self.run_dir / "metrics.jsonl"
        if self.info.main:  # the log's writer: another rank's rewrite would orphan its handle
            _truncate_log(log_path, self.state.step)
        bar = tqdm(total=opt.steps, initial=self.state.step, desc=f"train {self.method.name}",
                   disable=not (progress and self.info.main))
        with _Signals() as signals, open(log_path, "a") as log:
            while self.state.step < opt.steps:
                start = time.perf_counter()
                row = self.iteration()
                row["seconds"] = time.perf_counter() - start
                self.state.seconds += row["seconds"]
                self.state.step += 1
                self.state.last = row
                if self.info.main and (row["step"] % max(1, opt.log_every) == 0):
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                bar.update(1)
                stop = any_rank(bool(signals.signum), self.info)
                if stop or self.state.step % opt.checkpoint_every == 0 or self.state.step == opt.steps:
                    self.save()
                if stop:
                    bar.close()
                    raise StopRequested(self.state.step, signals.signum or signal.SIGTERM)
        bar.close()
        if self.sharded:
            self.gather_for_export()
        return self.state


def shard_all(method: Method, nets: dict, emas: dict, info: DistInfo) -> dict:
    """FSDP2 over the trained networks and the EMA, from rank 0's initial weights; LoRA adapters
    are sharded with their (frozen) base blocks. Returns {name: meta skeleton} of the networks
    with LoRA adapters, for merging them at export."""
    fsdp.check_shardable(method)
    fsdp.ensure_group(info)
    policy = fsdp.precision_policy(method.opt, info.device)
    skeletons = {n: fsdp.skeleton(m) for n, m in nets.items() if fsdp.has_lora(m)}
    for module in list(nets.values()) + list(emas.values()):
        broadcast_module(module, info)
        fsdp.shard(module, policy)
    if method.opt.fsdp_teacher == "shard":  # frozen: its DTensors join no optimiser
        fsdp.shard(method.teacher.denoiser, policy)
    return skeletons


def _log_rows(path: Path) -> list[tuple[str, dict]]:
    """The (line, row) pairs of a metrics log; a torn last line (a crash mid-write) is dropped with a warning,
    a bad line before it is an error (the log was changed by something else)."""
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            rows.append((line, json.loads(line)))
        except ValueError as err:
            if number == len(lines):
                print(f"fewstep: {path}: dropped a torn last line (a write cut short): "
                      f"{line[:60]!r}", file=sys.stderr)
                break
            raise FewstepError(f"{path} line {number} is not JSON ({err}); the training loop "
                               "only appends whole lines. Fix or delete that line, then rerun "
                               "to resume") from err
    return rows


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop logged rows of iterations that will run again."""
    if not path.exists():
        return
    keep = [line for line, row in _log_rows(path) if row["step"] < step]
    write_text(path, "".join(line + "\n" for line in keep))  # atomic: a crash here keeps the log
