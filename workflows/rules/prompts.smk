# Toy world: each family's held-out prompts. Real world: the family's benchmark prompt set from
# the data folder (fewstep.prompt_sets), written with its provenance sidecar (name, sha256).
if config["world"] == "toy":

    rule prompts:
        output:
            "results/prompts/{family}.jsonl",
        params:
            n=config["eval"]["prompts"],
        priority: 1000  # seconds of work that unblock the sampling jobs
        log:
            "results/logs/prompts/{family}.log",
        shell:
            "{FEWSTEP} prompts --family {wildcards.family} --n {params.n} --out {output} "
            "> {log} 2>&1"

else:

    rule prompts:
        output:
            "results/prompts/{family}.jsonl",
        params:
            args=lambda wc: planning.prompt_set_args(config, wc.family),
        priority: 1000
        log:
            "results/logs/prompts/{family}.log",
        shell:
            "{FEWSTEP} prompts {params.args} --out {output} > {log} 2>&1"
