# Distillation: every configured method on every family's teacher, once per training seed
# (distill/seeds), then each student sampled on the held-out prompts with the same per-(prompt,
# image seed) noise as the teacher and as the cell's other training seeds (paired design).
# The plan (runs, stages, each run's inputs and arguments) is fewstep.planning's: what a method
# reads besides its teacher comes from its class's `requires`, so a plugin is planned as a
# built-in is.
DISTILL = config["distill"]


if not TOY:  # each family's training prompts, checked and hashed once (provenance sidecar)

    rule train_prompts:
        output:
            "results/train_prompts/{family}.jsonl",
        params:
            args=lambda wc: planning.train_prompt_args(config, wc.family),
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
            source=config["fid"]["feature_net"],
            steps=config["fid"]["feature_net_steps"],
        log:
            "results/logs/metrics/reward_net.log",
        shell:
            # the toy feature recipe with another seed: the reward shares no weights with toy FID;
            # shipped: the packaged seed-1 net, hash-verified (what the recipe trains, bit for bit)
            THREADS_ENV + " {FEWSTEP} features --source {params.source} --role reward "
            "--size {params.res} --steps {params.steps} --seed 1 --out {output} > {log} 2>&1"


rule pairs:
    input:
        unpack(lambda wc: planning.pairs_inputs(config, wc.family)),
    output:
        pairs="results/pairs/{family}.safetensors",
        prompts="results/pairs/{family}.json",
    params:
        n=DISTILL["pairs"]["count"],
        steps=DISTILL["pairs"]["steps"],
        guidance=lambda wc: planning.pairs_guidance(config),
        sampler=config["teachers"].get("sampler", "scheduler"),  # a schema enum
        prompts=lambda wc, input: f"--prompts {input.prompts}" if "prompts" in input.keys() else "",
    threads: 1
    priority: 60
    resources:
        gpu=1,
    log:
        "results/logs/pairs/{family}.log",
    shell:
        THREADS_ENV + " {FEWSTEP} pairs --teacher {input.teacher} --count {params.n} "
        "--steps {params.steps} --guidance {params.guidance} --sampler {params.sampler} "
        "{params.prompts} --out {output.pairs} > {log} 2>&1"


PROCESSES = DISTILL.get("processes", 1)
TRAIN_LAUNCH = planning.train_launch(config, sys.executable)
TRAIN_GUARD = planning.train_guard(config)  # "" on one node


rule train:
    input:
        unpack(lambda wc: planning.train_inputs(config, wc.family, wc.run, int(wc.seed))),
    output:
        directory("results/models/{family}/{run}/seed{seed}"),
    params:
        args=lambda wc: planning.train_args(config, wc.family, wc.run, int(wc.seed)),
        res=config["resolution"],
    threads: PROCESSES
    priority: 40
    resources:
        # one node: gpu=processes; distill.nodes > 1: nodes, tasks, gres and mpi (the plugin's names)
        **planning.train_resources(config),
    log:
        "results/logs/train/{family}/{run}/seed{seed}.log",
    shell:
        # the run folder keeps checkpoints outside the output: a retried job resumes from it
        TRAIN_GUARD + "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " + TRAIN_LAUNCH + " train {params.args} --teacher {input.teacher} "
        "--resolution {params.res} --run-dir results/runs/{wildcards.family}/{wildcards.run}/"
        "seed{wildcards.seed} "
        "--out {output} --no-progress > {log} 2>&1"


rule sample_student:
    input:
        teacher="results/teachers/{family}",
        model=lambda wc: planning.model_dir(config, wc.family, wc.method, wc.replicate),
        prompts="results/prompts/{family}.jsonl",
    output:
        directory("results/samples/{family}/{method}/{replicate}"),
    params:
        seeds=SEEDS,
    threads: 1
    priority: 30
    resources:
        gpu=1,
    log:
        "results/logs/samples/{family}/{method}/{replicate}.log",
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
        weights=lambda wc: planning.release_params(config, wc.family, wc.method)["weights"],
        lora=lambda wc: planning.release_params(config, wc.family, wc.method)["lora"],
        preset=lambda wc: planning.release_params(config, wc.family, wc.method)["preset"],
    threads: 1
    log:
        "results/logs/release/{family}/{method}.log",
    shell:
        "{FEWSTEP} release --method {wildcards.method} --preset {params.preset} "
        "--teacher {input.teacher} --weights {params.weights} {params.lora} --out {output} "
        "> {log} 2>&1"
