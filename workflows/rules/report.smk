SCORES = expand("results/scores/{family}/teacher/steps{steps}.json", family=FAMILIES, steps=STEPS)
SCORES += expand("results/scores/{family}/{method}/student.json", family=FAMILIES,
                 method=config["distill"]["methods"])


rule track:
    input:
        scores=SCORES,
        models=all_model_dirs(),
        report=f"reports/{config['mlflow']['experiment']}/index.html",
    output:
        "results/mlflow/tracked.json",
    params:
        experiment=shlex.quote(config["mlflow"]["experiment"]),
        uri=("--tracking-uri " + shlex.quote(config["mlflow"]["tracking_uri"]))
        if config["mlflow"]["tracking_uri"] else "",
        config=shlex.quote(json.dumps(config, sort_keys=True)),
        grids=f"reports/{config['mlflow']['experiment']}/img",
    log:
        "results/logs/track.log",
    shell:
        "{FEWSTEP} track --scores {input.scores} --experiment {params.experiment} {params.uri} "
        "--config-json {params.config} --results results --grids {params.grids} "
        "--out {output} > {log} 2>&1"


SAMPLE_SETS = expand(TEACHER_SETS, family=FAMILIES, steps=STEPS)
SAMPLE_SETS += expand("results/samples/{family}/{method}/student", family=FAMILIES,
                      method=config["distill"]["methods"])
EXPERIMENT = config["mlflow"]["experiment"]


# The Markdown leaderboard and the static HTML report (tables, plots, sample grids, the audit).
rule report:
    input:
        scores=SCORES,
        samples=SAMPLE_SETS,
        verdicts="results/audit/verdicts.json",
    output:
        board="reports/leaderboard.md",
        html=f"reports/{EXPERIMENT}/index.html",
    params:
        html=f"reports/{EXPERIMENT}",
        experiment=shlex.quote(EXPERIMENT),
    threads: 1
    log:
        "results/logs/report.log",
    shell:
        THREADS_ENV + " {FEWSTEP} report --scores {input.scores} --out {output.board} "
        "--html {params.html} --experiment {params.experiment} --verdicts {input.verdicts} "
        "> {log} 2>&1"


# The papers' claims (reports/claims.yaml) judged against the scores: paper-protocol verdicts and,
# for relative claims, toy-scale evidence from paired differences on the shared noise.
rule audit:
    input:
        claims=CLAIMS,
        scores=SCORES,
    output:
        report="reports/claims_audit.md",
        verdicts="results/audit/verdicts.json",
    threads: 1
    log:
        "results/logs/audit.log",
    shell:
        THREADS_ENV + " {FEWSTEP} audit --claims {input.claims} --scores {input.scores} "
        "--out {output.report} --json {output.verdicts} > {log} 2>&1"
