# All of a family's teacher sets in one job: the teacher is loaded and the prompts encoded once
# (on the toy world a process's start-up costs as much as sampling a short set).
TEACHER_SETS = "results/samples/{family}/teacher/steps{steps}"
# Longest sampling job first, so the last job to finish is a short one (relative toy cost,
# tests/benchmarks/bench_foundation.py); families not listed go last.
SAMPLE_ORDER = {"sdxl": 3, "sd3": 2, "sit": 1}


rule sample_teacher:
    input:
        teacher="results/teachers/{family}",
        prompts="results/prompts/{family}.jsonl",
    output:
        [directory(path) for path in expand(TEACHER_SETS, family="{family}", steps=STEPS)],
    params:
        guidance=lambda wc: config["teachers"]["guidance"][wc.family],
        sampler=config["teachers"].get("sampler", "scheduler"),  # a schema enum
        seeds=SEEDS,
        steps=" ".join(map(str, STEPS)),
    threads: 1
    priority: lambda wc: SAMPLE_ORDER.get(wc.family, 0)
    resources:
        gpu=1,
    log:
        "results/logs/samples/{family}/teacher.log",
    shell:
        THREADS_ENV + " {FEWSTEP} sample --teacher {input.teacher} --prompts {input.prompts} "
        "--steps {params.steps} --guidance {params.guidance} --seeds {params.seeds} "
        "--sampler {params.sampler} --out {output} > {log} 2>&1"
