# Teachers: the shipped ones are verified against their hashes and copied; with
# `teachers.source: train` the recipe runs instead (minutes per family on 2 CPU cores).
TEACHER = config["teachers"]
if TEACHER["source"] == "shipped":

    rule teacher_install:
        output:
            directory("results/teachers/{family}"),
        priority: 1000  # a copy and a hash check that unblock the sampling jobs
        params:
            res=config["resolution"],
        log:
            "results/logs/teachers/{family}.log",
        shell:
            "{FEWSTEP} teacher install --family {wildcards.family} --resolution {params.res} "
            "--out {output} > {log} 2>&1"

elif TEACHER["source"] == "link":

    # real checkpoints: a link folder naming the weights in the cache (never a copy)
    rule teacher_link:
        output:
            directory("results/teachers/{family}"),
        priority: 1000
        params:
            weights=lambda wc: shlex.quote(TEACHER["link"][wc.family]),
            dtype=TEACHER.get("dtype", "bf16"),
            res=config["resolution"],
        log:
            "results/logs/teachers/{family}.log",
        shell:
            "{FEWSTEP} teacher link --family {wildcards.family} --weights {params.weights} "
            "--dtype {params.dtype} --resolution {params.res} --out {output} > {log} 2>&1"

else:

    rule teacher_train:
        output:
            directory("results/teachers/{family}"),
        params:
            res=config["resolution"],
            **TEACHER["train"],
        threads: 2
        resources:
            gpu=1,
        log:
            "results/logs/teachers/{family}.log",
        shell:
            THREADS_ENV + " {FEWSTEP} teacher train --family {wildcards.family} "
            "--resolution {params.res} --steps {params.steps} --batch {params.batch} "
            "--lr {params.lr} --seed {params.seed} --out {output} > {log} 2>&1"
