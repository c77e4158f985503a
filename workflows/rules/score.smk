# Scoring: the toy feature net (for toy FID) and each family's reference statistics are built once,
# before the score jobs fan out; a score job runs every configured metric on its sample sets.
METRIC_OPTIONS = config.get("metric_options", {})

if TOY:

    rule feature_net:
        output:
            "results/metrics/toy_feature_net.safetensors",
        # one thread and first in line: with `train` it trains beside the sampling jobs
        threads: 1
        priority: 100
        log:
            "results/logs/metrics/feature_net.log",
        params:
            res=config["resolution"],
            source=config["fid"]["feature_net"],
            steps=config["fid"]["feature_net_steps"],
        shell:
            THREADS_ENV + " {FEWSTEP} features --source {params.source} --size {params.res} "
            "--steps {params.steps} --out {output} > {log} 2>&1"

    rule fid_reference:
        input:
            prompts="results/prompts/{family}.jsonl",
            net=rules.feature_net.output,
        output:
            "results/metrics/fid_reference/{family}.json",
        priority: 50
        params:
            n=config["fid"]["reference_images"],
            res=config["resolution"],
        threads: 1
        log:
            "results/logs/metrics/fid_reference/{family}.log",
        shell:
            THREADS_ENV + " {FEWSTEP} fid-ref --prompts {input.prompts} --feature-net {input.net} "
            "--images {params.n} --resolution {params.res} --cache results/cache --out {output} "
            "> {log} 2>&1"

elif "fid" in config["metrics"]:

    # the real reference set's Inception statistics (reference, crop, evaluation resolution from
    # metric_options.fid), built once before the score jobs read them from the cache
    rule fid_reference:
        output:
            "results/metrics/fid_reference/{family}.json",
        priority: 50
        params:
            options=shlex.quote(json.dumps(METRIC_OPTIONS.get("fid", {}), sort_keys=True)),
            res=config["resolution"],
        resources:
            gpu=1,
        log:
            "results/logs/metrics/fid_reference/{family}.log",
        shell:
            "{FEWSTEP} fid-ref --metric fid --metric-options {params.options} "
            "--resolution {params.res} --cache results/cache --out {output} > {log} 2>&1"


def score_inputs(**inputs):
    """A score job's inputs: the sets and prompts, plus what its metrics read first."""
    return {**inputs, **planning.score_extra_inputs(config)}


def score_command(samples, out, against=""):
    toy_args = ("--feature-net {input.net} --reference-images {params.n_ref} " if TOY else "")
    return (THREADS_ENV + " {FEWSTEP} score --samples " + samples + " --prompts {input.prompts} "
            "--seeds {params.seeds} --resolution {params.res} --metrics {params.metrics} "
            + toy_args + "--cache results/cache {params.blank} "
            "--resamples {params.boot[resamples]} --confidence {params.boot[confidence]} "
            "--bootstrap-seed {params.boot[seed]} " + INTERVAL_FLAG
            + "--metric-options {params.options} " + against
            + "--out " + out + " > {log} 2>&1")


SCORE_PARAMS = planning.score_params(config)
# written into the command text, not a param: the default's empty flag leaves the score rules'
# shell text and params as they were, so an existing results folder does not rerun its scores
# (Snakemake's code and params rerun triggers); another interval changes the text and reruns them
INTERVAL_FLAG = SCORE_PARAMS.pop("interval")


if SHARDS == 1:

    # A family's teacher sets are scored in one job (metrics built once), like they are sampled.
    rule score_teacher:
        input:
            **score_inputs(samples=expand(TEACHER_SETS, family="{family}", steps=STEPS),
                           prompts="results/prompts/{family}.jsonl"),
        output:
            expand("results/scores/{family}/teacher/steps{steps}.json", family="{family}", steps=STEPS),
        params:
            **SCORE_PARAMS,
        threads: 1
        log:
            "results/logs/scores/{family}/teacher.log",
        shell:
            score_command("{input.samples}", "{output}")


    # Each replicate of a student (a training seed, or a released checkpoint) is also compared with its
    # teacher at the same NFE, paired on the shared noise.
    rule score_student:
        input:
            **score_inputs(samples="results/samples/{family}/{method}/{replicate}",
                           teacher_sets=expand(TEACHER_SETS, family="{family}", steps=STEPS),
                           teacher_scores=expand("results/scores/{family}/teacher/steps{steps}.json",
                                                 family="{family}", steps=STEPS),
                           prompts="results/prompts/{family}.jsonl"),
        output:
            "results/scores/{family}/{method}/{replicate}.json",
        params:
            **SCORE_PARAMS,
        threads: 1
        log:
            "results/logs/scores/{family}/{method}/{replicate}.log",
        shell:
            score_command("{input.samples}", "{output}", "--against {input.teacher_scores} ")


else:

    # eval.shards = K > 1: each shard folder is scored alone into a partial (per-image scores,
    # features, GenEval rows; a failed one reruns alone), and one merge job per set computes its
    # score file from the K partials and the gathered set (fewstep score-merge: equal to scoring
    # the gathered set whole). Rule names and score files are the K = 1 ones, so the rules below
    # read them unchanged.
    PARTIALS = "results/score_partials/"

    def partial_files(set_dir):
        return [d.replace("results/shards/", PARTIALS) + ".npz"
                for d in planning.shard_dirs(set_dir, SHARDS)]

    rule score_teacher_partial:
        input:
            **score_inputs(samples=[p.replace("results/samples/", "results/shards/") + SHARD
                                    for p in expand(TEACHER_SETS, family="{family}", steps=STEPS)],
                           prompts="results/prompts/{family}.jsonl"),
        output:
            [p.replace("results/samples/", PARTIALS) + SHARD + ".npz"
             for p in expand(TEACHER_SETS, family="{family}", steps=STEPS)],
        wildcard_constraints:
            shard="[0-9]+",
        params:
            **SCORE_PARAMS,
        threads: 1
        log:
            "results/logs/scores/{family}/teacher-shard{shard}.log",
        shell:
            score_command("{input.samples}", "{output}", "--partial ")

    rule score_teacher:
        input:
            # the merge computes the statistics: it reads the reference and the prompt file too
            **score_inputs(partials=lambda wc: partial_files(f"results/samples/{wc.family}/"
                                                             f"teacher/steps{wc.steps}"),
                           samples=TEACHER_SETS, prompts="results/prompts/{family}.jsonl"),
        output:
            "results/scores/{family}/teacher/steps{steps}.json",
        threads: 1
        log:
            "results/logs/scores/{family}/teacher-steps{steps}-merge.log",
        shell:
            THREADS_ENV + " {FEWSTEP} score-merge --partials {input.partials} --samples "
            "{input.samples} --out {output} > {log} 2>&1"

    rule score_student_partial:
        input:
            **score_inputs(samples="results/shards/{family}/{method}/{replicate}" + SHARD,
                           prompts="results/prompts/{family}.jsonl"),
        output:
            PARTIALS + "{family}/{method}/{replicate}" + SHARD + ".npz",
        wildcard_constraints:
            shard="[0-9]+",
        params:
            **SCORE_PARAMS,
        threads: 1
        log:
            "results/logs/scores/{family}/{method}/{replicate}-shard{shard}.log",
        shell:
            score_command("{input.samples}", "{output}", "--partial ")

    rule score_student:
        input:
            **score_inputs(partials=lambda wc: partial_files(f"results/samples/{wc.family}/"
                                                             f"{wc.method}/{wc.replicate}"),
                           samples="results/samples/{family}/{method}/{replicate}",
                           teacher_sets=expand(TEACHER_SETS, family="{family}", steps=STEPS),
                           teacher_scores=expand("results/scores/{family}/teacher/"
                                                 "steps{steps}.json", family="{family}",
                                                 steps=STEPS),
                           prompts="results/prompts/{family}.jsonl"),
        output:
            "results/scores/{family}/{method}/{replicate}.json",
        threads: 1
        log:
            "results/logs/scores/{family}/{method}/{replicate}.log",
        shell:
            THREADS_ENV + " {FEWSTEP} score-merge --partials {input.partials} --samples "
            "{input.samples} --against {input.teacher_scores} --out {output} > {log} 2>&1"


# A cell over its training seeds: the mean, an interval that resamples training seeds and then
# prompts, the per-seed values and the paired comparison with the teacher (fewstep.cells).
rule aggregate:
    input:
        **score_inputs(replicates=lambda wc: planning.replicate_scores(config, wc.family, wc.method),
                       samples=lambda wc: [f"results/samples/{wc.family}/{wc.method}/{r}" for r in
                                           planning.replicates(config, wc.family, wc.method)],
                       teacher_sets=expand(TEACHER_SETS, family="{family}", steps=STEPS),
                       teacher_scores=expand("results/scores/{family}/teacher/steps{steps}.json",
                                             family="{family}", steps=STEPS),
                       prompts="results/prompts/{family}.jsonl"),
    output:
        "results/scores/{family}/{method}/student.json",
    params:
        seeds=lambda wc: planning.aggregate_seeds(config, wc.family, wc.method),
    threads: 1
    log:
        "results/logs/scores/{family}/{method}/student.log",
    shell:
        THREADS_ENV + " {FEWSTEP} aggregate --replicates {input.replicates} "
        "--training-seeds {params.seeds} --against {input.teacher_scores} --out {output} "
        "> {log} 2>&1"
