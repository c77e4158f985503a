SCORES = expand("results/scores/{family}/teacher/steps{steps}.json", family=FAMILIES, steps=STEPS)
SCORES += expand("results/scores/{family}/{method}/student.json", family=FAMILIES,
                 method=config["distill"]["methods"])


rule track:
    input:
        SCORES,
    output:
        "results/mlflow/tracked.json",
    params:
        experiment=config["mlflow"]["experiment"],
        uri=("--tracking-uri " + config["mlflow"]["tracking_uri"]) if config["mlflow"]["tracking_uri"] else "",
    log:
        "results/logs/track.log",
    shell:
        "{FEWSTEP} track --scores {input} --experiment {params.experiment} {params.uri} "
        "--out {output} > {log} 2>&1"


rule report:
    input:
        SCORES,
    output:
        "reports/leaderboard.md",
    log:
        "results/logs/report.log",
    shell:
        "{FEWSTEP} report --scores {input} --out {output} > {log} 2>&1"
