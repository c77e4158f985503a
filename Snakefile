# fewstep: one DAG from prompts to leaderboard. Stages live in workflows/rules/*.smk.
# The default config is the toy world; `--configfile` selects another, `--config k=v` overrides.
import json
import shlex
import signal
import sys

from fewstep import planning
from fewstep.config import validate


configfile: f"{workflow.basedir}/workflows/config/default.yaml"


validate(config, source="workflow config")

# SLURM's time-limit warning (--signal=USR1@300) reaches every process of a job's step, and on one
# node the step is the inner Snakemake running the job: ignoring SIGUSR1 here keeps it (and the
# job's shell, which inherits the disposition) alive while `fewstep train` and torchrun, which set
# their own handlers, save and exit 75; Snakemake then reports the job failed and its retry
# resumes. Other jobs ignore SIGUSR1 too and end at the time limit as before.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)


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
