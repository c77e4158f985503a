# fewstep: one DAG from prompts to leaderboard. Stages live in workflows/rules/*.smk.
# The default config is the toy world; `--configfile` selects another, `--config k=v` overrides.
import json
import shlex
import sys

from fewstep import planning
from fewstep.config import validate


configfile: f"{workflow.basedir}/workflows/config/default.yaml"


validate(config, source="workflow config")


wildcard_constraints:
    family="[a-z0-9_]+",
    method="[A-Za-z0-9_-]+",
    run="[A-Za-z0-9_-]+",
    steps="[0-9]+",
    seed="[0-9]+",
    replicate="seed[0-9]+|released",

FEWSTEP = f"{sys.executable} -m fewstep"
THREADS_ENV = "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
FAMILIES = config["families"]
TOY = config["world"] == "toy"
STEPS = config["eval"]["steps"]
SEEDS = " ".join(map(str, config["eval"]["seeds"]))
CLAIMS = f"{workflow.basedir}/reports/claims.yaml"  # data of the repository, not of the workdir


include: "workflows/rules/prompts.smk"
include: "workflows/rules/teachers.smk"
include: "workflows/rules/sample.smk"
include: "workflows/rules/train.smk"
include: "workflows/rules/score.smk"
include: "workflows/rules/report.smk"


rule all:
    input:
        "reports/leaderboard.md",
        "reports/claims_audit.md",
        f"reports/{config['mlflow']['experiment']}/index.html",
        "results/mlflow/tracked.json",
