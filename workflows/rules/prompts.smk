rule prompts:
    output:
        "results/prompts/{family}.jsonl",
    params:
        n=config["eval"]["prompts"],
    log:
        "results/logs/prompts/{family}.log",
    shell:
        "{FEWSTEP} prompts --family {wildcards.family} --n {params.n} --out {output} > {log} 2>&1"
