# Tracking, the leaderboard and HTML report, and the claims audit over every score file (the
# lists of score files, sample sets and models come from fewstep.planning).
SCORES = planning.score_files(config)
TRACK = planning.track_params(config)


rule track:
    input:
        scores=SCORES,
        models=planning.all_model_dirs(config),
        report=f"reports/{config['mlflow']['experiment']}/index.html",
    output:
        "results/mlflow/tracked.json",
    params:
        **TRACK,
    log:
        "results/logs/track.log",
    shell:
        "{FEWSTEP} track --scores {input.scores} --experiment {params.experiment} {params.uri} "
        "--config-json {params.config} --results results --grids {params.grids} "
        "--out {output} > {log} 2>&1"


SAMPLE_SETS = planning.sample_sets(config)
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
        fidelity="reports/fidelity.md",
    params:
        html=f"reports/{EXPERIMENT}",
        experiment=shlex.quote(EXPERIMENT),
    threads: 1
    log:
        "results/logs/report.log",
    shell:
        THREADS_ENV + " {FEWSTEP} report --scores {input.scores} --out {output.board} "
        "--html {params.html} --experiment {params.experiment} --verdicts {input.verdicts} "
        "--fidelity {output.fidelity} > {log} 2>&1"


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
