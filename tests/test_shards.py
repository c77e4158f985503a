"""Sharded sampling: `fewstep sample --shard I/K` samples a contiguous, batch-aligned slice of a
set's (prompt, seed) jobs; `fewstep gather` merges the K shard folders into the set the unsharded
call writes, byte for byte (manifest and every PNG), after checking that the shards are exactly
the K shards of one set. In the DAG, eval.shards = K samples every set in K jobs and gathers it."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fewstep import config as workflow_config
from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts

SEEDS = ["0", "1"]
BATCH = "3"  # 5 prompts x 2 seeds = 10 jobs: batches of 3, 3, 3 and a last one of 1
K = 3


def set_files(folder: Path) -> dict:
    """Every file of a sample set but its provenance (which records wall times and shards) and
    hidden files (Snakemake's .snakemake_timestamp in a directory output)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name != "provenance.json" and not p.name.startswith(".")}


def teacher_call(work: Path, *extra) -> int:
    return main(["sample", "--teacher", str(work / "teacher"), "--prompts", str(work / "p.jsonl"),
                 "--seeds", *SEEDS, "--batch", BATCH, "--guidance", "2.0", "--device", "cpu",
                 *extra])


def shard_dirs(work: Path, name: str, k: int = K) -> list[Path]:
    return [work / "shards" / f"{name}-{i}of{k}" for i in range(k)]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """The toy SiT teacher at 1 and 2 steps: each set unsharded, and in 3 shards (both step
    counts in each shard call, as the DAG's shard job samples them)."""
    work = tmp_path_factory.mktemp("shards")
    assert main(["teacher", "install", "--family", "sit", "--resolution", "16", "--out",
                 str(work / "teacher")]) == 0
    (work / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_prompts("sit", 5)[:5]))
    assert teacher_call(work, "--steps", "1", "2", "--out", str(work / "s1"), str(work / "s2")) == 0
    for i in range(K):
        outs = [str(shard_dirs(work, f"s{steps}")[i]) for steps in (1, 2)]
        assert teacher_call(work, "--steps", "1", "2", "--shard", f"{i}/{K}", "--out", *outs) == 0
    return work


def gather(shards, out: Path) -> int:
    return main(["gather", "--shards", *map(str, shards), "--out", str(out)])


def test_three_teacher_shards_gather_into_the_unsharded_set_bitwise(sampled):
    for steps in (1, 2):
        out = sampled / "gathered" / f"s{steps}"
        assert gather(shard_dirs(sampled, f"s{steps}"), out) == 0
        whole = set_files(sampled / f"s{steps}")
        assert len(whole) == 10 + 1  # ten PNGs and the manifest
        assert set_files(out) == whole
        prov = json.loads((out / "provenance.json").read_text())
        assert [s["shard"]["index"] for s in prov["shards"]] == [0, 1, 2]


def test_a_shard_records_which_shard_of_which_set_it_is(sampled):
    shards = [json.loads((d / "shard.json").read_text()) for d in shard_dirs(sampled, "s2")]
    assert [s["index"] for s in shards] == [0, 1, 2] and {s["count"] for s in shards} == {K}
    # contiguous slices whose boundaries are multiples of the batch
    assert [s["jobs"] for s in shards] == [[0, 3], [3, 6], [6, 10]]
    ident = shards[0]["set"]
    assert {s["set"]["steps"] for s in shards} == {2}
    assert ident["family"] == "sit" and ident["method"] == "teacher" and ident["nfe"] == 4
    assert ident["guidance"] == 2.0 and ident["seeds"] == [0, 1] and ident["batch"] == 3
    assert ident["sampler"] == "scheduler" and len(ident["prompt_set_sha256"]) == 64
    assert ident["jobs"] == 10


def test_gather_order_of_the_shard_folders_does_not_matter(sampled, tmp_path):
    assert gather(reversed(shard_dirs(sampled, "s1")), tmp_path / "set") == 0
    assert set_files(tmp_path / "set") == set_files(sampled / "s1")


def refused(shards, out: Path, capsys) -> str:
    assert gather(shards, out) == 2
    assert not out.exists()  # a refused gather writes nothing
    return capsys.readouterr().err


def test_gather_refuses_a_missing_shard(sampled, tmp_path, capsys):
    dirs = shard_dirs(sampled, "s1")
    err = refused([dirs[0], dirs[2]], tmp_path / "set", capsys)
    assert "shard 1 of 3 is missing" in err and "--shard 1/3" in err


def test_gather_refuses_a_duplicate_shard(sampled, tmp_path, capsys):
    dirs = shard_dirs(sampled, "s1")
    copy = tmp_path / "copy_of_0"
    shutil.copytree(dirs[0], copy)
    err = refused([*dirs, copy], tmp_path / "set", capsys)
    assert "shard 0 of 3 is given twice" in err and str(copy) in err and str(dirs[0]) in err
    err = refused([*dirs, dirs[1]], tmp_path / "set", capsys)  # the same folder twice
    assert f"{dirs[1]} is given twice" in err


def test_gather_refuses_a_shard_of_another_set(sampled, tmp_path, capsys):
    ones, twos = shard_dirs(sampled, "s1"), shard_dirs(sampled, "s2")
    err = refused([ones[0], twos[1], ones[2]], tmp_path / "set", capsys)
    assert str(twos[1]) in err and "another set" in err
    assert "steps" in err and "nfe" in err


def test_gather_refuses_a_tampered_image(sampled, tmp_path, capsys):
    dirs = [tmp_path / d.name for d in shard_dirs(sampled, "s1")]
    for src, dst in zip(shard_dirs(sampled, "s1"), dirs):
        shutil.copytree(src, dst)
    # another valid PNG of the set in place of one image: only its hash tells
    shutil.copyfile(dirs[1] / "000004.png", dirs[1] / "000003.png")
    err = refused(dirs, tmp_path / "set", capsys)
    assert str(dirs[1]) in err and "000003.png" in err and "sha256" in err


def test_gather_refuses_a_folder_that_is_not_a_shard(sampled, tmp_path, capsys):
    err = refused([sampled / "s1"], tmp_path / "set", capsys)
    assert str(sampled / "s1") in err and "shard.json" in err and "--shard" in err


@pytest.mark.parametrize("spec, words", [
    ("3/3", ["--shard", "'3/3'", "0..2"]),
    ("0/0", ["--shard", "'0/0'", "at least 1"]),
    ("-1/2", ["--shard", "'-1/2'", "0..1"]),
    ("0/5", ["--shard", "'0/5'", "4 batches", "1..4"]),  # 10 jobs in batches of 3
    ("one/3", ["--shard", "'one/3'", "I/K"]),
])
def test_bad_shard_specs_name_the_option_the_value_and_the_range(sampled, tmp_path, capsys, spec,
                                                                  words):
    out = tmp_path / "x"
    assert teacher_call(sampled, "--steps", "1", f"--shard={spec}", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()


def test_shard_spans_tile_the_jobs_on_batch_boundaries():
    from fewstep.sampling import shard_span

    for jobs, batch in ((10, 3), (488, 64), (7, 7), (64, 8)):
        batches = -(-jobs // batch)
        for k in range(1, batches + 1):
            spans = [shard_span(jobs, batch, i, k) for i in range(k)]
            assert spans[0][0] == 0 and spans[-1][1] == jobs
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert all(lo % batch == 0 and hi > lo for lo, hi in spans)


# -- a student set ---------------------------------------------------------------------------------
def test_three_student_shards_gather_into_the_unsharded_set_bitwise(sampled, tmp_path):
    student = tmp_path / "student"
    assert main(["train", "--method", "dmd2", "--preset", "toy", "--teacher",
                 str(sampled / "teacher"), "--resolution", "16", "--run-dir", str(tmp_path / "run"),
                 "--out", str(student), "--no-progress", "--device", "cpu", "--set", "steps=1",
                 "batch=2", "checkpoint_every=1"]) == 0
    common = ["sample", "--teacher", str(sampled / "teacher"), "--prompts",
              str(sampled / "p.jsonl"), "--seeds", *SEEDS, "--batch", BATCH, "--device", "cpu",
              "--student", str(student)]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    dirs = [tmp_path / f"shard{i}" for i in range(K)]
    for i, d in enumerate(dirs):
        assert main([*common, "--shard", f"{i}/{K}", "--out", str(d)]) == 0
    assert gather(dirs, tmp_path / "gathered") == 0
    assert set_files(tmp_path / "gathered") == set_files(tmp_path / "whole")
    ident = json.loads((dirs[0] / "shard.json").read_text())["set"]
    assert ident["method"] == "dmd2" and len(ident["student_sha256"]) == 64


# -- the DAG ---------------------------------------------------------------------------------------
TINY = {"eval": {"prompts": 6, "seeds": [0, 1], "steps": [1, 2]},
        "distill": {"methods": ["dmd2"], "preset": "toy", "stages": {}, "seeds": [0, 1],
                    "overrides": {}, "pairs": {"count": 4, "steps": 2}}}


def dry_run(tmp_path: Path, cfg: dict | None) -> str:
    tmp_path.mkdir()
    extra = []
    if cfg is not None:
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        extra = ["--configfile", str(tmp_path / "cfg.yaml")]
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s",
                          str(workflow_config.REPO / "Snakefile"), "-d", str(tmp_path / "work"),
                          "-n", "-p", "all", *extra], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def job_counts(stdout: str) -> dict[str, int]:
    """The dry run's job table: rule name -> count."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["job", "count"])
    counts = {}
    for line in lines[start + 2:]:  # past the header and its rule
        if not line.strip():
            break  # the table ends at the first blank line
        name, count = line.split()
        counts[name] = int(count)
    return counts


def test_the_dry_run_samples_every_set_in_k_shards_and_gathers_it(tmp_path):
    sets_teacher, sets_student = 3 * 2, 3 * 1 * 2  # families x steps; families x methods x seeds
    # 33 prompts x 2 seeds: two 64-image batches, so two shards (one batch at most each)
    counts = job_counts(dry_run(tmp_path / "k2", {**TINY, "eval": {**TINY["eval"], "prompts": 33,
                                                                   "shards": 2}}))
    assert counts["sample_teacher_shard"] == 3 * 2  # a job per family and shard: all its steps
    assert counts["sample_student_shard"] == sets_student * 2
    assert counts["gather_samples"] == sets_teacher + sets_student
    assert "sample_teacher" not in counts and "sample_student" not in counts
    plain = job_counts(dry_run(tmp_path / "k1", TINY))
    assert plain["sample_teacher"] == 3 and plain["sample_student"] == sets_student
    assert not any("shard" in name or "gather" in name for name in plain)


def test_the_default_dry_run_has_no_shard_jobs(tmp_path):
    stdout = dry_run(tmp_path / "default", None)
    assert "--shard" not in stdout and " gather " not in stdout
    assert not any("shard" in name or "gather" in name for name in job_counts(stdout))


def test_a_shard_count_below_one_is_refused_by_the_config_check():
    cfg = workflow_config.load(workflow_config.DEFAULT)
    cfg["eval"]["shards"] = 0
    with pytest.raises(Exception, match="shards"):
        workflow_config.validate(cfg)


def test_a_two_shard_dag_writes_the_unsharded_sets_and_reruns_a_failed_shard_alone(tmp_path):
    """For real on the shipped SiT teacher: 54 prompts x 2 seeds = 2 batches of the DAG's 64."""
    cfg = {"families": ["sit"], "eval": {"prompts": 61, "seeds": [0, 1], "steps": [1, 2],
                                         "shards": 2}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    sets = [f"results/samples/sit/teacher/steps{s}" for s in (1, 2)]

    def snakemake(*args):
        out = subprocess.run([sys.executable, "-m", "snakemake", "-s",
                              str(workflow_config.REPO / "Snakefile"), "-d", str(work), "--cores",
                              "2", *args, *sets, "--configfile", str(tmp_path / "cfg.yaml")],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    snakemake()
    guidance = str(workflow_config.load(workflow_config.DEFAULT)["teachers"]["guidance"]["sit"])
    assert main(["sample", "--teacher", str(work / "results/teachers/sit"), "--prompts",
                 str(work / "results/prompts/sit.jsonl"), "--steps", "1", "2", "--seeds", "0", "1",
                 "--guidance", guidance, "--device", "cpu", "--out", str(tmp_path / "s1"),
                 str(tmp_path / "s2")]) == 0
    for steps, folder in zip((1, 2), sets):
        assert set_files(work / folder) == set_files(tmp_path / f"s{steps}")
    # shard 1 failed (Snakemake removes a failed job's outputs): only it and the gathers rerun
    for folder in sets:
        shutil.rmtree(work / folder.replace("samples", "shards") / "shard1-of-2")
        shutil.rmtree(work / folder)
    rerun = job_counts(snakemake("-n"))
    assert rerun == {"sample_teacher_shard": 1, "gather_samples": 2, "total": 3}, rerun
