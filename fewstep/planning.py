"""The DAG's plan as pure functions of the workflow config (workflows/rules/*.smk call them).

Which runs train, what each reads and the arguments each job gets. What a method reads besides
its teacher comes from the method class's `requires` (through the registry, so an installed
plugin gets its inputs as a built-in does; a staged method's run reads its stage class's):
"pairs" the teacher's ODE pairs, "reward" the toy reward net in the toy world and
distill/rewards/<method> in the real one, "real" captioned real images (distill/train_data/<family>/real_images; the toy world renders its own). Every config
string reaches the shell quoted. No snakemake import: the functions are unit-tested directly.
"""
from __future__ import annotations

import json
import shlex
from typing import NamedTuple

TOY_REWARD_NET = "results/metrics/toy_reward_net.safetensors"
TOY_FEATURE_NET = "results/metrics/toy_feature_net.safetensors"
RELEASED = "released"  # the replicate name of a released checkpoint (a trained one: seed<s>)


class Run(NamedTuple):
    method: str
    preset: str
    previous: str | None  # the run it starts from (a staged method's earlier stage)


def is_toy(config: dict) -> bool:
    return config["world"] == "toy"


def requires(method: str) -> tuple[str, ...]:
    """The method's extra DAG inputs, read from its class (imports it, and so torch)."""
    from fewstep.registry import METHODS

    return tuple(METHODS.get(method).requires)


def run_options(config: dict, run: str):
    """(the class that trains the run, its resolved options): a staged method's stage class, from
    `for_options` on the run's preset and the method's overrides."""
    from fewstep.errors import FewstepError
    from fewstep.options import resolve
    from fewstep.registry import METHODS

    method, preset, _ = runs(config)[run]
    cls = METHODS.get(method)
    try:
        options = resolve(cls.Options, cls.PRESETS, preset,
                          config["distill"]["overrides"].get(method), method,
                          world_size=world_size(config))
    except FewstepError as err:
        raise FewstepError(f"{err} (world size = distill.nodes {config['distill'].get('nodes', 1)}"
                           f" x distill.processes {config['distill'].get('processes', 1)})"
                           ) from None
    return cls.for_options(options), options


def run_requires(config: dict, run: str) -> tuple[str, ...]:
    """The run's extra DAG inputs: its stage class's `requires` (DMD2's regression warm start
    reads teacher pairs, its DMD2 stage real images); a method with one class, that class's."""
    from fewstep.registry import METHODS

    cls = METHODS.get(runs(config)[run].method)
    # the base class's for_options (read by name: the core does not import the engine)
    if getattr(cls.for_options, "__qualname__", "") == "Method.for_options":
        return tuple(cls.requires)  # no stages: no options to resolve (a plugin may have none)
    return tuple(run_options(config, run)[0].requires)


def runs(config: dict) -> dict[str, Run]:
    """run name -> Run; a staged method expands to one run per stage (the last one named as the
    method)."""
    distill, plan = config["distill"], {}
    for method in distill["methods"]:
        presets = distill["stages"].get(method, [distill["preset"]])
        previous = None
        for i, preset in enumerate(presets):
            name = method if i == len(presets) - 1 else f"{method}-stage{i + 1}"
            plan[name] = Run(method, preset, previous)
            previous = name
    return plan


def trained_presets(config: dict) -> dict[str, list[str]]:
    """method -> the presets its training runs use (its stages, else distill/preset); methods
    released on every run family train nothing."""
    distill = config["distill"]
    released = distill.get("released", {})
    return {m: distill["stages"].get(m, [distill["preset"]]) for m in distill["methods"]
            if any(f not in released.get(m, {}) for f in config["families"])}


def trained_runs(config: dict) -> list[str]:
    """The runs some family trains: a method released on every run family trains nothing, and
    its (unvalidated, unused) training preset is never resolved."""
    trained = trained_presets(config)
    return [name for name, run in runs(config).items() if run.method in trained]


def released(config: dict) -> dict:
    """Published students evaluated instead of trained:
    {method: {family: {weights, lora, preset}}}."""
    return config["distill"].get("released", {})


def training_seeds(config: dict) -> list[int]:
    """The training seeds every trained cell runs with (distill/seeds; one seed, 0, by default)."""
    return list(config["distill"].get("seeds", [0]))


def replicate_name(seed: int | None) -> str:
    """The folder/file name of a replicate: seed<s> for a trained student, released otherwise."""
    return RELEASED if seed is None else f"seed{int(seed)}"


def replicates(config: dict, family: str, method: str) -> list[str]:
    """A cell's replicates: one per training seed (seed<s>), or its released checkpoint."""
    if family in released(config).get(method, {}):
        return [RELEASED]
    return [replicate_name(s) for s in training_seeds(config)]


def model_dir(config: dict, family: str, method: str, replicate: str) -> str:
    """The model a student set is sampled from: trained by the DAG (one folder per training
    seed) or a released checkpoint."""
    if family in released(config).get(method, {}):
        return f"results/released/{family}/{method}"
    return f"results/models/{family}/{method}/{replicate}"


def all_model_dirs(config: dict) -> list[str]:
    """Every trained run's model folder per training seed (families where its method is not
    released), then every released one."""
    plan, cells = runs(config), released(config)
    trained = [f"results/models/{f}/{r}/seed{s}" for f in config["families"] for r in plan
               if f not in cells.get(plan[r].method, {}) for s in training_seeds(config)]
    return trained + [model_dir(config, f, m, "released") for m, fams in cells.items()
                      for f in fams]


def replicate_scores(config: dict, family: str, method: str) -> list[str]:
    """A cell's per-replicate score files, the inputs of its aggregate."""
    return [f"results/scores/{family}/{method}/{r}.json" for r in replicates(config, family, method)]


def aggregate_seeds(config: dict, family: str, method: str) -> str:
    """`fewstep aggregate --training-seeds`: each replicate's seed (released: `released`)."""
    reps = replicates(config, family, method)
    return RELEASED if reps == [RELEASED] else " ".join(r.removeprefix("seed") for r in reps)


def train_inputs(config: dict, family: str, run: str, seed: int) -> dict[str, str]:
    """The train job's input files by name: the teacher, and what the method requires (a staged
    run starts from the previous stage trained with the same seed)."""
    previous = runs(config)[run].previous
    needs = run_requires(config, run)
    inputs = {"teacher": f"results/teachers/{family}"}
    if "pairs" in needs:
        inputs["pairs"] = f"results/pairs/{family}.safetensors"
    if "reward" in needs and is_toy(config):
        inputs["reward"] = TOY_REWARD_NET
    if not is_toy(config):  # the real world trains on the configured data; the toy world on its own
        inputs["prompts"] = f"results/train_prompts/{family}.jsonl"
    if previous:
        inputs["init"] = f"results/models/{family}/{previous}/seed{int(seed)}"
    return inputs


def train_args(config: dict, family: str, run: str, seed: int) -> str:
    """`fewstep train`'s arguments for the run and training seed, but the teacher and the output
    folders."""
    distill, toy = config["distill"], is_toy(config)
    method, preset, _ = runs(config)[run]
    inputs, needs = train_inputs(config, family, run, seed), run_requires(config, run)
    sets = [f"{k}={v}" for k, v in distill["overrides"].get(method, {}).items()]
    if "pairs" in inputs:
        sets.append(f"pairs={inputs['pairs']}")
    if "init" in inputs:
        sets.append(f"init_from={inputs['init']}")
    sets.append(f"seed={int(seed)}")  # every random stream of the run derives from it
    # every config string reaches the shell quoted (the preset was also resolved at validation)
    args = f"--method {shlex.quote(method)} --preset {shlex.quote(preset)}"
    if "reward" in needs:
        reward = inputs["reward"] if toy else distill["rewards"][method]
        args += f" --reward {shlex.quote(reward)}"
    if "prompts" in inputs:
        args += f" --train-prompts {inputs['prompts']}"
    if not toy and "real" in needs:  # a path or a name in the weights cache
        real = distill["train_data"][family]["real_images"]
        args += f" --real-data {shlex.quote(real)}"
    return args + ("" if not sets else " --set " + " ".join(shlex.quote(s) for s in sets))


# The c10d rendezvous port on the head node, from the job id inside the srun'd task: two
# multi-node jobs whose first node is the same machine would collide on one fixed port (the
# second cannot bind it, or joins the first one's store). 29500 (torchrun's default) + id mod
# 2000: unprivileged, below Linux's ephemeral range (32768-60999, where outgoing connections
# take their ports), distinct for any two jobs whose ids differ by less than 2000.
RDZV_PORT_BASE, RDZV_PORTS = 29500, 2000

# torchrun's agent forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to its ranks by default; SIGUSR1
# (what the SLURM profile sends 300 s before the time limit, profiles/slurm) would kill the agent
# itself and orphan the ranks unsaved. Listed, the agent sends it on to every rank (which saves
# and exits 75: fewstep.engine.loop) and exits nonzero itself, so the retry resumes.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# Seconds the agent waits for its ranks to save and exit before SIGKILL (torchrun's default 30
# s could cut a large FSDP save short): inside the profile's 300 s warning, leaving the agent
# time to exit before SLURM's own kill at the limit.
STOP_GRACE_S = 240
# Both flags are torch 2.14's (pyproject pins torch==2.14.1); a torchrun without them refuses the
# unknown flag before any rank starts, rather than losing the signal.
TORCHRUN_SIGNALS = f"--signals-to-handle {FORWARDED_SIGNALS} --shutdown-timeout {STOP_GRACE_S}"


def rdzv_port(job_id: int) -> int:
    """The head node's rendezvous port for a SLURM job id (node_launch computes it in bash)."""
    return RDZV_PORT_BASE + int(job_id) % RDZV_PORTS


def world_size(config: dict) -> int:
    """A training job's ranks: distill.nodes x distill.processes (per node)."""
    distill = config["distill"]
    return int(distill.get("nodes", 1)) * int(distill.get("processes", 1))


def node_launch(python: str, nodes: int, processes: int) -> str:
    """What runs once per node: torchrun with a c10d rendezvous on the allocation's first node.
    The head and the port (rdzv_port) are worked out inside the task (srun sets
    SLURM_JOB_NODELIST there; the SLURM jobstep executor strips it from the job's own shell);
    the program's arguments follow as "$@", so no config string is ever parsed twice by a shell.
    `exec`: torchrun is the task srun signals and waits for."""
    script = ('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) && '
              f"port=$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORTS})) && "
              f"exec {shlex.quote(python)} -m torch.distributed.run --nnodes {int(nodes)} "
              f"--nproc_per_node {int(processes)} --rdzv_backend c10d "
              f'--rdzv_endpoint "$head:$port" --rdzv_id "$SLURM_JOB_ID" {TORCHRUN_SIGNALS} "$@"')
    return f"bash -c {shlex.quote(script)} torchrun"


def multinode_launch(python: str, nodes: int, processes: int) -> str:
    """One SLURM job of `nodes` nodes: srun starts one torchrun per node, each spawning
    `processes` ranks. torchrun under srun, not srun's own tasks with RANK/LOCAL_RANK mapped from
    SLURM_PROCID/SLURM_LOCALID: the same launcher, elastic agent and failure handling as the
    single-node job (a dead rank stops its node's agent, --kill-on-bad-exit the others), one task
    per node whatever the GPU binding, and the rendezvous is testable without SLURM."""
    return (f"srun --nodes {int(nodes)} --ntasks {int(nodes)} --ntasks-per-node 1 "
            f"--kill-on-bad-exit=1 {node_launch(python, nodes, processes)} -m fewstep")


def train_launch(config: dict, python: str) -> str:
    """The train command's launcher: several ranks run under torchrun inside the one job (and its
    one allocation); several nodes under srun (multinode_launch); the engine picks NCCL on GPUs
    and gloo on the CPU."""
    nodes, processes = config["distill"].get("nodes", 1), config["distill"].get("processes", 1)
    if nodes > 1:
        return multinode_launch(python, nodes, processes)
    if processes > 1:
        return (f"{python} -m torch.distributed.run --standalone {TORCHRUN_SIGNALS} "
                f"--nproc_per_node {processes} -m fewstep")
    return f"{python} -m fewstep"


def train_guard(config: dict) -> str:
    """A shell prefix that stops a multi-node train job outside a SLURM allocation (a local run
    would start N x processes ranks waiting for nodes that never come)."""
    nodes = int(config["distill"].get("nodes", 1))
    if nodes == 1:
        return ""
    msg = (f"distill.nodes = {nodes} needs one SLURM job of {nodes} nodes, but this train job "
           "is not inside a SLURM allocation: run snakemake --profile slurm (install it with "
           "fewstep profile install slurm), or set distill.nodes: 1")
    return f'if [ -z "$SLURM_JOB_ID" ]; then echo {shlex.quote(msg)} >&2; exit 2; fi; '


def train_resources(config: dict) -> dict:
    """The train rule's resources. One node: `gpu` = processes (sbatch --gpus). Several: the
    SLURM executor plugin's names: nodes, one task per node (tasks = nodes; tasks_per_gpu 0 so
    the plugin does not turn tasks into --ntasks-per-gpu), gres gpu:processes (per node), and
    mpi = "srun" so the job's command runs as is and its own srun starts the tasks."""
    nodes, processes = config["distill"].get("nodes", 1), config["distill"].get("processes", 1)
    if nodes == 1:
        return {"gpu": processes}
    return {"nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "gres": f"gpu:{processes}",
            "mpi": "srun"}


def train_prompt_args(config: dict, family: str) -> str:
    """World real: a family's training prompts, a registered prompt set or a prompt file."""
    from fewstep.prompt_sets import PROMPT_SETS

    spec = config["distill"]["train_data"][family]["prompts"]
    return f"--set {spec}" if spec in PROMPT_SETS else f"--file {shlex.quote(spec)}"


def pairs_inputs(config: dict, family: str) -> dict[str, str]:
    inputs = {"teacher": f"results/teachers/{family}"}
    if not is_toy(config):
        inputs["prompts"] = f"results/train_prompts/{family}.jsonl"
    return inputs


def pairs_guidance(config: dict) -> float:
    """The pairs are sampled with the guidance of the DM teacher that uses them (methods/notes/
    dmd.md sec. 8, item 7): the resolved `teacher_guidance` of the runs that read pairs (DMD,
    DMD2's regression warm start), which must agree: one pairs file per family."""
    from fewstep.errors import FewstepError

    readers = {run: float(run_options(config, run)[1].teacher_guidance)
               for run in trained_runs(config) if "pairs" in run_requires(config, run)}
    if len(set(readers.values())) > 1:
        raise FewstepError(f"the runs that read teacher pairs use different guidance {readers}; "
                           "the DAG samples one pairs file per family: give them one "
                           "teacher_guidance (distill/overrides)")
    return next(iter(readers.values()))  # a number by validation; never a config string


def release_params(config: dict, family: str, method: str) -> dict[str, str]:
    """The release job's weights, LoRA flag and preset (the distill preset unless the cell names
    one), quoted."""
    cell = released(config)[method][family]
    return {"weights": shlex.quote(cell["weights"]), "lora": "--lora" if cell.get("lora") else "",
            "preset": shlex.quote(cell.get("preset", config["distill"]["preset"]))}


def prompt_set_args(config: dict, family: str) -> str:
    """World real: the family's benchmark prompt set, with its size and seed when given."""
    spec = config["eval"]["prompt_sets"][family]
    args = f"--set {shlex.quote(spec['name'])}"
    for key in ("n", "seed"):
        if key in spec:
            args += f" --{key} {int(spec[key])}"
    return args


def score_extra_inputs(config: dict) -> dict[str, str]:
    """What a score job's metrics read first: the toy FID's feature net and reference statistics
    (toy world), the real FID's reference statistics (world real with fid)."""
    reference = "results/metrics/fid_reference/{family}.json"
    if is_toy(config):
        return {"net": TOY_FEATURE_NET, "reference": reference}
    return {"reference": reference} if "fid" in config["metrics"] else {}


def score_params(config: dict) -> dict:
    """The score jobs' parameters (config strings quoted: the metric options are one JSON
    argument). `interval` holds the `--interval X ` and `--seed-level Y ` flags, each empty for
    its default (percentile, t) so the default DAG's score commands stay as they were."""
    interval = config["bootstrap"].get("interval", "percentile")
    seed_level = config["bootstrap"].get("seed_level", "t")
    flags = ("" if interval == "percentile" else f"--interval {shlex.quote(interval)} ") + (
        "" if seed_level == "t" else f"--seed-level {shlex.quote(seed_level)} ")
    return dict(
        metrics=" ".join(config["metrics"]),
        seeds=" ".join(map(str, config["eval"]["seeds"])),
        res=config["resolution"],
        # the seed level reaches the command as a flag; kept out of this param so that a results
        # folder scored before the option does not rescore (Snakemake's params rerun trigger)
        boot={k: v for k, v in config["bootstrap"].items() if k != "seed_level"},
        interval=flags,
        n_ref=config.get("fid", {}).get("reference_images"),  # toy FID only
        options=shlex.quote(json.dumps(config.get("metric_options", {}), sort_keys=True)),
        # toy world: an empty canvas is a legitimate bad sample, scored rather than refused
        blank="--allow-blank" if is_toy(config) else "",
    )


def score_files(config: dict) -> list[str]:
    """Every score file the report reads: each teacher set, then each student."""
    steps, methods = config["eval"]["steps"], config["distill"]["methods"]
    return ([f"results/scores/{f}/teacher/steps{s}.json" for f in config["families"] for s in steps]
            + [f"results/scores/{f}/{m}/student.json" for f in config["families"] for m in methods])


def sample_sets(config: dict) -> list[str]:
    """Every sample set the report's grids read: each teacher set, then each student's first
    replicate."""
    steps, methods = config["eval"]["steps"], config["distill"]["methods"]
    return ([f"results/samples/{f}/teacher/steps{s}" for f in config["families"] for s in steps]
            + [f"results/samples/{f}/{m}/{replicates(config, f, m)[0]}" for f in config["families"]
               for m in methods])


def track_params(config: dict) -> dict[str, str]:
    """The track job's experiment, tracking URI option and the whole config as one JSON argument."""
    mlflow = config["mlflow"]
    uri = mlflow["tracking_uri"]
    return {"experiment": shlex.quote(mlflow["experiment"]),
            "uri": "--tracking-uri " + shlex.quote(uri) if uri else "",
            "config": shlex.quote(json.dumps(config, sort_keys=True)),
            "grids": f"reports/{mlflow['experiment']}/img"}


def eval_shards(config: dict) -> int:
    """K of eval.shards: each sample set sampled by K shard jobs, then gathered (1: one job)."""
    return int(config["eval"].get("shards", 1))


def shard_dirs(set_dir: str, shards: int) -> list[str]:
    """The K shard folders of a sample set: results/samples/X -> results/shards/X/shard<i>-of-<K>
    (K in the name: shards of another count are other folders, never mixed in)."""
    rel = set_dir.removeprefix("results/samples/")
    return [f"results/shards/{rel}/shard{i}-of-{shards}" for i in range(shards)]


# `fewstep sample`'s default --batch, which the DAG's sample rules use: a shard is a run of whole
# batches (fewstep.sampling.shard_span), so a set of B batches makes at most B shards
SAMPLE_BATCH = 64


def set_prompts(config: dict, family: str) -> int | None:
    """The prompts of each of a family's sample sets, as the prompts rule will write them: the
    toy world's held-out rows (fewstep.selection.toy_eval_rows, SiT's classes repeated); a
    benchmark set's n, else its official size (its loader refuses any other count). None: a set
    whose size is not known before it is read."""
    if is_toy(config):
        from fewstep.selection import toy_eval_rows

        try:
            return len(toy_eval_rows(family, config["eval"]["prompts"]))
        except ValueError:  # more prompts than the split holds: the prompts job says so
            return None
    import inspect

    from fewstep import prompt_sets as ps
    from fewstep.geneval_prompts import TASK_SIZES

    spec = config["eval"]["prompt_sets"][family]
    official = {"hpdv2": len(ps.HPDV2_STYLES) * ps.HPDV2_PROMPTS_PER_STYLE,
                "geneval": sum(TASK_SIZES.values()), "imagenet-classes": ps.IMAGENET_CLASSES,
                "drawbench": ps.DRAWBENCH_PROMPTS}
    if spec["name"] in official:
        return official[spec["name"]]
    loader = ps.PROMPT_SETS.get(spec["name"])
    n = inspect.signature(loader).parameters.get("n") if loader else None
    return int(spec.get("n", n.default)) if n is not None else None


def max_shards(config: dict) -> tuple[int, str] | None:
    """(the largest eval.shards every sample set can take, the family of the smallest set): the
    batches of SAMPLE_BATCH in its (prompt, seed) jobs. None: no set's size is known."""
    seeds = len(config["eval"]["seeds"])
    sizes = [(-(-prompts * seeds // SAMPLE_BATCH), family) for family in config["families"]
             if (prompts := set_prompts(config, family)) is not None]
    return min(sizes, key=lambda s: s[0]) if sizes else None
