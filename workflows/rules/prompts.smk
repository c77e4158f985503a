rule prompts:
    output:
        "results/prompts/{family}.jsonl",
    params:
        n=config["eval"]["prompts"],
    priority: 1000  # seconds of work that unblock the sampling jobs
    log:
        "results/logs/prompts/{family}.log",
    shell:
        "{FEWSTEP} prompts --family {wildcards.family} --n {params.n} --out {output} > {log} 2>&1"
