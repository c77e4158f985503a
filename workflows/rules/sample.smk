# All of a family's teacher sets in one job: the teacher is loaded and the prompts encoded once
# (on the toy world a process's start-up costs as much as sampling a short set).
TEACHER_SETS = "results/samples/{family}/teacher/steps{steps}"
# Longest sampling job first, so the last job to finish is a short one (relative toy cost,
# tests/benchmarks/bench_foundation.py); families not listed go last.
SAMPLE_ORDER = {"sdxl": 3, "sd3": 2, "sit": 1}
TEACHER_SAMPLE = (THREADS_ENV + " {FEWSTEP} sample --teacher {input.teacher} --prompts "
                  "{input.prompts} --steps {params.steps} --guidance {params.guidance} --seeds "
                  "{params.seeds} --sampler {params.sampler}")
TEACHER_INPUTS = {"teacher": "results/teachers/{family}", "prompts": "results/prompts/{family}.jsonl"}
TEACHER_PARAMS = {
    "guidance": lambda wc: config["teachers"]["guidance"][wc.family],
    "sampler": config["teachers"].get("sampler", "scheduler"),  # a schema enum
    "seeds": SEEDS,
    "steps": " ".join(map(str, STEPS)),
}


rule sample_teacher:
    input:
        **TEACHER_INPUTS,
    output:
        [directory(path) for path in expand(TEACHER_SETS, family="{family}", steps=STEPS)],
    params:
        **TEACHER_PARAMS,
    threads: 1
    priority: lambda wc: SAMPLE_ORDER.get(wc.family, 0)
    resources:
        gpu=1,
    log:
        "results/logs/samples/{family}/teacher.log",
    shell:
        TEACHER_SAMPLE + " --out {output} > {log} 2>&1"


# eval.shards = K > 1: every set is sampled by K shard jobs (a failed one reruns alone) under
# results/shards/, and one gather job checks them and writes the set folder the score rules read.
SHARDS = planning.eval_shards(config)
if SHARDS > 1:
    SHARD = "/shard{shard}-of-" + str(SHARDS)

    rule sample_teacher_shard:
        input:
            **TEACHER_INPUTS,
        output:
            [directory(p.replace("results/samples/", "results/shards/") + SHARD)
             for p in expand(TEACHER_SETS, family="{family}", steps=STEPS)],
        params:
            **TEACHER_PARAMS,
            shard=lambda wc: f"{wc.shard}/{SHARDS}",
        threads: 1
        priority: lambda wc: SAMPLE_ORDER.get(wc.family, 0)
        resources:
            gpu=1,
        log:
            "results/logs/samples/{family}/teacher-shard{shard}.log",
        shell:
            TEACHER_SAMPLE + " --shard {params.shard} --out {output} > {log} 2>&1"

    rule sample_student_shard:
        input:
            teacher="results/teachers/{family}",
            model=lambda wc: planning.model_dir(config, wc.family, wc.method, wc.replicate),
            prompts="results/prompts/{family}.jsonl",
        output:
            directory("results/shards/{family}/{method}/{replicate}" + SHARD),
        params:
            seeds=SEEDS,
            shard=lambda wc: f"{wc.shard}/{SHARDS}",
        threads: 1
        priority: 30
        resources:
            gpu=1,
        log:
            "results/logs/samples/{family}/{method}/{replicate}-shard{shard}.log",
        shell:
            THREADS_ENV + " {FEWSTEP} sample --teacher {input.teacher} --student {input.model} "
            "--prompts {input.prompts} --seeds {params.seeds} --shard {params.shard} "
            "--out {output} > {log} 2>&1"

    rule gather_samples:
        input:
            lambda wc: planning.shard_dirs(f"results/samples/{wc.family}/{wc.method}/{wc.set}",
                                           SHARDS),
        output:
            directory("results/samples/{family}/{method}/{set}"),
        wildcard_constraints:
            set="steps[0-9]+|seed[0-9]+|released",
        log:
            "results/logs/samples/{family}/{method}/{set}-gather.log",
        shell:
            "{FEWSTEP} gather --shards {input} --out {output} > {log} 2>&1"

    # the set folders: gathered, not sampled whole (sample_student lives in train.smk)
    ruleorder: gather_samples > sample_teacher
    ruleorder: gather_samples > sample_student
