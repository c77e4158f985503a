# Distillation: every configured method on every family's teacher, then its student sampled on
# the held-out prompts with the same per-(prompt, seed) noise as the teacher (paired design).
# Which extra inputs a method reads (DMD: teacher pairs; reward-guided methods: the toy reward)
# mirrors each method class's `requires` (tests/test_engine.py checks the two agree).
DISTILL = config["distill"]
REQUIRES = {"dmd": ["pairs"], "dmd2": ["real"], "amd": ["reward", "real"], "rtdmd": ["reward"]}


def _runs():
    """run name -> (method, preset, run it starts from); staged methods expand to one run per stage."""
    runs = {}
    for method in DISTILL["methods"]:
        presets = DISTILL["stages"].get(method, [DISTILL["preset"]])
        previous = None
        for i, preset in enumerate(presets):
            name = method if i == len(presets) - 1 else f"{method}-stage{i + 1}"
            runs[name] = (method, preset, previous)
            previous = name
    return runs


RUNS = _runs()
# published students evaluated instead of trained: {method: {family: {weights, lora}}}
RELEASED = DISTILL.get("released", {})


def model_dir(family: str, method: str) -> str:
    """The model a student set is sampled from: trained by the DAG or a released checkpoint."""
    if family in RELEASED.get(method, {}):
        return f"results/released/{family}/{method}"
    return f"results/models/{family}/{method}"


def all_model_dirs() -> list[str]:
    trained = [f"results/models/{f}/{r}" for f in FAMILIES for r in RUNS
               if f not in RELEASED.get(RUNS[r][0], {})]
    return trained + [model_dir(f, m) for m, fams in RELEASED.items() for f in fams]


TRAIN_DATA = DISTILL.get("train_data", {})  # world real: {family: {prompts, real_images}}


def _train_inputs(wc):
    method, _, previous = RUNS[wc.run]
    needs = REQUIRES.get(method, [])
    inputs = {"teacher": f"results/teachers/{wc.family}"}
    if "pairs" in needs:
        inputs["pairs"] = f"results/pairs/{wc.family}.safetensors"
    if "reward" in needs and TOY:
        inputs["reward"] = "results/metrics/toy_reward_net.safetensors"
    if not TOY:  # the real world trains on the configured data; the toy world on its own
        inputs["prompts"] = f"results/train_prompts/{wc.family}.jsonl"
    if previous:
        inputs["init"] = f"results/models/{wc.family}/{previous}"
    return inputs


def _train_args(wc, input):
    method, preset, _ = RUNS[wc.run]
    sets = [f"{k}={v}" for k, v in DISTILL["overrides"].get(method, {}).items()]
    if "pairs" in input.keys():
        sets.append(f"pairs={input.pairs}")
    if "init" in input.keys():
        sets.append(f"init_from={input.init}")
    # every config string reaches the shell quoted (the preset was also resolved at validation)
    args = f"--method {shlex.quote(method)} --preset {shlex.quote(preset)}"
    if "reward" in REQUIRES.get(method, []):
        reward = input.reward if TOY else DISTILL["rewards"][method]
        args += f" --reward {shlex.quote(reward)}"
    if "prompts" in input.keys():
        args += f" --train-prompts {input.prompts}"
    if not TOY and "real" in REQUIRES.get(method, []):  # a path or a name in the weights cache
        args += f" --real-data {shlex.quote(TRAIN_DATA[wc.family]['real_images'])}"
    return args + ("" if not sets else " --set " + " ".join(shlex.quote(s) for s in sets))


if not TOY:  # each family's training prompts, checked and hashed once (provenance sidecar)

    def _train_prompt_args(wc):
        from fewstep.prompt_sets import PROMPT_SETS

        spec = TRAIN_DATA[wc.family]["prompts"]
        return f"--set {spec}" if spec in PROMPT_SETS else f"--file {shlex.quote(spec)}"

    rule train_prompts:
        output:
            "results/train_prompts/{family}.jsonl",
        params:
            args=_train_prompt_args,
        log:
            "results/logs/train_prompts/{family}.log",
        shell:
            "{FEWSTEP} prompts {params.args} --out {output} > {log} 2>&1"


if config["world"] == "toy":  # the toy reward net of the reward-guided methods

    rule reward_net:
        output:
            "results/metrics/toy_reward_net.safetensors",
        threads: 1
        priority: 90
        params:
            res=config["resolution"],
            steps=config["fid"]["feature_net_steps"],
        log:
            "results/logs/metrics/reward_net.log",
        shell:
            # the toy feature recipe with another seed: the reward shares no weights with toy FID
            THREADS_ENV + " {FEWSTEP} features --size {params.res} --steps {params.steps} --seed 1 "
            "--out {output} > {log} 2>&1"


def pairs_guidance() -> float:
    """The pairs are sampled with the guidance of the DM teacher that uses them (dmd.md 8, item
    7): the resolved `teacher_guidance` of the (first) run whose method reads pairs."""
    from fewstep.engine.options import resolve
    from fewstep.registry import METHODS

    method, preset, _ = next(r for r in RUNS.values() if "pairs" in REQUIRES.get(r[0], []))
    cls = METHODS.get(method)
    options = resolve(cls.Options, cls.PRESETS, preset, DISTILL["overrides"].get(method), method)
    return float(options.teacher_guidance)  # a number by validation; never a config string


rule pairs:
    input:
        unpack(lambda wc: {"teacher": f"results/teachers/{wc.family}"} if TOY else
               {"teacher": f"results/teachers/{wc.family}",
                "prompts": f"results/train_prompts/{wc.family}.jsonl"}),
    output:
        pairs="results/pairs/{family}.safetensors",
        prompts="results/pairs/{family}.json",
    params:
        n=DISTILL["pairs"]["count"],
        steps=DISTILL["pairs"]["steps"],
        guidance=lambda wc: pairs_guidance(),
        prompts=lambda wc, input: f"--prompts {input.prompts}" if "prompts" in input.keys() else "",
    threads: 1
    priority: 60
    resources:
        gpu=1,
    log:
        "results/logs/pairs/{family}.log",
    shell:
        THREADS_ENV + " {FEWSTEP} pairs --teacher {input.teacher} --count {params.n} "
        "--steps {params.steps} --guidance {params.guidance} {params.prompts} --out {output.pairs} "
        "> {log} 2>&1"


PROCESSES = DISTILL.get("processes", 1)
# several ranks: torchrun inside the one job (and its one allocation); the engine picks NCCL on
# GPUs and gloo on the CPU
TRAIN_LAUNCH = (f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node "
                f"{PROCESSES} -m fewstep" if PROCESSES > 1 else FEWSTEP)


rule train:
    input:
        unpack(_train_inputs),
    output:
        directory("results/models/{family}/{run}"),
    params:
        args=_train_args,
        res=config["resolution"],
    threads: PROCESSES
    priority: 40
    resources:
        gpu=PROCESSES,
    log:
        "results/logs/train/{family}/{run}.log",
    shell:
        # the run folder keeps checkpoints outside the output: a retried job resumes from it
        "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " + TRAIN_LAUNCH + " train {params.args} --teacher {input.teacher} "
        "--resolution {params.res} --run-dir results/runs/{wildcards.family}/{wildcards.run} "
        "--out {output} --no-progress > {log} 2>&1"


rule sample_student:
    input:
        teacher="results/teachers/{family}",
        model=lambda wc: model_dir(wc.family, wc.method),
        prompts="results/prompts/{family}.jsonl",
    output:
        directory("results/samples/{family}/{method}/student"),
    params:
        seeds=SEEDS,
    threads: 1
    priority: 30
    resources:
        gpu=1,
    log:
        "results/logs/samples/{family}/{method}/student.log",
    shell:
        THREADS_ENV + " {FEWSTEP} sample --teacher {input.teacher} --student {input.model} "
        "--prompts {input.prompts} --seeds {params.seeds} --out {output} > {log} 2>&1"


# A published student: its weights as a model folder, sampled with the method's preset sampler.
rule release:
    input:
        teacher="results/teachers/{family}",
    output:
        directory("results/released/{family}/{method}"),
    params:
        weights=lambda wc: shlex.quote(RELEASED[wc.method][wc.family]["weights"]),
        lora=lambda wc: "--lora" if RELEASED[wc.method][wc.family].get("lora") else "",
        preset=lambda wc: shlex.quote(RELEASED[wc.method][wc.family].get("preset", DISTILL["preset"])),
    threads: 1
    log:
        "results/logs/release/{family}/{method}.log",
    shell:
        "{FEWSTEP} release --method {wildcards.method} --preset {params.preset} "
        "--teacher {input.teacher} --weights {params.weights} {params.lora} --out {output} "
        "> {log} 2>&1"
