rule sample_teacher:
    input:
        teacher="results/teachers/{family}",
        prompts="results/prompts/{family}.jsonl",
    output:
        directory("results/samples/{family}/teacher/steps{steps}"),
    params:
        guidance=lambda wc: config["teachers"]["guidance"][wc.family],
        seeds=SEEDS,
    threads: 1
    # longest jobs first (cost grows with steps), so the last job to finish is a short one
    priority: lambda wc: int(wc.steps)
    resources:
        gpu=1,
    log:
        "results/logs/samples/{family}/teacher/steps{steps}.log",
    shell:
        THREADS_ENV + " {FEWSTEP} sample --teacher {input.teacher} --prompts {input.prompts} "
        "--steps {wildcards.steps} --guidance {params.guidance} --seeds {params.seeds} "
        "--out {output} > {log} 2>&1"
