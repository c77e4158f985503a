"""Sharded scoring: `fewstep score --partial` scores one shard folder (fewstep sample --shard I/K)
into a partial score file (per-image rows and feature vectors, the shard's identity, the scoring
arguments); `fewstep score-merge` checks the K partials against the gathered set and writes the
score file `fewstep score` writes on the whole set: same values, intervals, per-sample rows and
comparison with the teacher (set-level metrics computed from the merged features)."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts
from fewstep.toy.features import shipped_feature_net

SEEDS = ["0", "1"]
K = 3
METRICS = ["toy_fid", "toy_geneval", "toy_hps", "toy_imagereward", "toy_diversity", "toy_recall",
           "toy_precision"]   # workflows/config/default.yaml's metrics


def sample(work: Path, *extra) -> None:
    assert main(["sample", "--teacher", str(work / "teacher"), "--prompts", str(work / "p.jsonl"),
                 "--seeds", *SEEDS, "--batch", "3", "--guidance", "2.0", "--device", "cpu",
                 "--steps", "1", "2", *extra]) == 0


def shard_dirs(work: Path, steps: int) -> list[Path]:
    return [work / "shards" / f"s{steps}-{i}of{K}" for i in range(K)]


def score_args(work: Path, *extra) -> list[str]:
    return ["score", "--prompts", str(work / "p.jsonl"), "--seeds", *SEEDS, "--resolution", "16",
            "--metrics", *METRICS, "--feature-net", str(shipped_feature_net(16)),
            "--reference-images", "40", "--cache", str(work / "cache"), "--allow-blank",
            "--resamples", "40", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The toy SiT teacher at 1 and 2 steps (5 prompts x 2 seeds, batch 3: shards of jobs 0-2,
    3-5 and 6-9, so prompt 1's two seeds span shards 0 and 1), in 3 shards, gathered; the 2-step
    set scored whole as the teacher the 1-step set is compared with."""
    work = tmp_path_factory.mktemp("score_shards")
    assert main(["teacher", "install", "--family", "sit", "--resolution", "16", "--out",
                 str(work / "teacher")]) == 0
    (work / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_prompts("sit", 5)[:5]))
    for i in range(K):
        sample(work, "--shard", f"{i}/{K}", "--out", *(str(shard_dirs(work, s)[i]) for s in (1, 2)))
    for steps in (1, 2):
        assert main(["gather", "--shards", *map(str, shard_dirs(work, steps)), "--out",
                     str(work / f"s{steps}")]) == 0
    assert main(score_args(work, "--samples", str(work / "s2"), "--out",
                           str(work / "teacher2.json"))) == 0
    return work


def partials(work: Path, steps: int = 1, *extra, tag: str = "") -> list[Path]:
    outs = [work / "partials" / f"s{steps}{tag}-{i}.npz" for i in range(K)]
    assert main(score_args(work, "--partial", *extra, "--samples",
                           *map(str, shard_dirs(work, steps)), "--out", *map(str, outs))) == 0
    return outs


def merge(work: Path, parts, out: Path, steps: int = 1) -> int:
    return main(["score-merge", "--partials", *map(str, parts), "--samples",
                 str(work / f"s{steps}"), "--against", str(work / "teacher2.json"),
                 "--out", str(out)])


@pytest.fixture(scope="module")
def parts(work):
    return partials(work)


def comparable(path: Path) -> dict:
    """A score file less the one field that names itself (scoring_args.out)."""
    row = json.loads(path.read_text())
    row["scoring_args"].pop("out")
    return row


def leaves(value, path=""):
    """(path, leaf) of every number, string and flag of a JSON value."""
    if isinstance(value, dict):
        for k in sorted(value):
            yield from leaves(value[k], f"{path}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def assert_close(a: dict, b: dict) -> None:
    """Same structure and every non-float leaf equal; floats within rel 1e-5 / abs 1e-6.

    Why not bitwise: the toy nets (FID features, diversity features, the two reward slots) run
    in float32 on the CPU, whose convolution and matmul kernels block by batch size, so an image's
    output depends at float32 rounding on which images share its batch (measured here: features
    within 4e-7 relative, per-image scores within 2e-6), and a shard's batches are not the whole
    set's. Everything after the nets is the same float64 computation in the same order
    (test_merge_of_the_whole_sets_columns_is_bitwise); the largest deviation seen is 4e-6
    relative, on an interval bound near 0 of a paired difference."""
    la, lb = list(leaves(a)), list(leaves(b))
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        if isinstance(x, float) and isinstance(y, float):
            assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), (path, x, y)
        else:
            assert x == y, (path, x, y)


@pytest.fixture(scope="module")
def whole(work):
    out = work / "whole.json"
    assert main(score_args(work, "--samples", str(work / "s1"), "--against",
                           str(work / "teacher2.json"), "--out", str(out))) == 0
    return out


def test_merged_partials_equal_the_unsharded_score_file(work, parts, whole, tmp_path):
    merged = tmp_path / "merged.json"
    assert merge(work, parts, merged) == 0
    a, b = comparable(whole), comparable(merged)
    assert sorted(a["results"]) == sorted(METRICS)
    assert sorted(a["against_teacher"]["metrics"]) == sorted(METRICS)
    assert_close(a, b)
    # no net between the image and its rows: GenEval's detections and every number bitwise
    assert b["results"]["toy_geneval"] == a["results"]["toy_geneval"]
    assert b["against_teacher"]["metrics"]["toy_geneval"] == \
        a["against_teacher"]["metrics"]["toy_geneval"]
    # a prompt split between shards (prompt 1: seed 0 in shard 0, seed 1 in shard 1) gets the
    # diversity of its two images, which no shard alone holds
    rows = b["results"]["toy_diversity"]["per_sample"]
    assert rows[2]["score"] == rows[3]["score"] > 0


def test_merge_of_the_whole_sets_columns_is_bitwise(work, parts, whole, tmp_path):
    """Partials holding the whole set's image columns (as computed by the unsharded run, cut at
    the shard boundaries) merge into the unsharded score file bit for bit: the merge computes
    every statistic, interval and comparison in the same order from the same numbers."""
    from fewstep.scoring import read_partial, split_columns, write_partial
    from fewstep.registry import METRICS as REGISTRY
    from metrics.sampleset import load_sample_set
    from types import SimpleNamespace

    ss = load_sample_set(work / "s1", allow_blank=True)
    header0, _ = read_partial(parts[0])
    context = SimpleNamespace(**header0["scoring_args"], n_resamples=40, level=0.95, seed=0,
                              prompt_rows=[json.loads(l) for l in
                                           (work / "p.jsonl").read_text().splitlines()])
    arrays = {}
    for name in METRICS:
        metric = REGISTRY.get(name).from_options({}, context, name)
        arrays.update(split_columns(name, metric.image_columns(ss))[1])
    exact = []
    for i, part in enumerate(parts):
        header, _ = read_partial(part)
        lo, hi = header["shard"]["jobs"]
        exact.append(tmp_path / f"exact-{i}.npz")
        write_partial(exact[-1], header, {k: v[lo:hi] for k, v in arrays.items()})
    merged = tmp_path / "merged.json"
    assert merge(work, exact, merged) == 0
    assert comparable(merged) == comparable(whole)


def test_a_partial_records_its_shard_and_the_scoring_arguments(work, parts):
    from fewstep.scoring import read_partial

    header, arrays = read_partial(parts[1])
    assert header["shard"]["index"] == 1 and header["shard"]["count"] == K
    assert header["shard"]["jobs"] == [3, 6]
    assert header["scoring_args"]["resamples"] == 40
    assert [seed for _, seed in header["keys"]] == [1, 0, 1]   # jobs 3-5: prompt 1 seed 1, ...
    assert len(header["image_sha256"]) == 3
    assert arrays["toy_fid/features"].shape[0] == 3       # FID-like: per-image features
    assert "toy_diversity/features" in arrays              # diversity: from merged features
    assert len(header["metrics"]["toy_geneval"]["columns"]["rows"]) == 3


def refused(work, parts, capsys, steps: int = 1) -> str:
    out = work / "refused.json"
    assert merge(work, parts, out, steps) != 0
    assert not out.exists()
    return capsys.readouterr().err


def test_merge_refuses_a_missing_partial(work, parts, capsys):
    err = refused(work, parts[:2], capsys)
    assert "shard 2 of 3 is missing" in err


def test_merge_refuses_a_duplicate_partial(work, parts, capsys, tmp_path):
    copy = tmp_path / "copy.npz"
    shutil.copy(parts[0], copy)
    err = refused(work, [*parts, copy], capsys)
    assert "shard 0 of 3 is given twice" in err and str(copy) in err


def test_merge_refuses_a_partial_of_another_set(work, parts, capsys):
    other = partials(work, 2)
    err = refused(work, [parts[0], parts[1], other[2]], capsys)
    assert str(other[2]) in err and "another set" in err


def test_merge_refuses_partials_scored_with_other_arguments(work, parts, capsys):
    other = partials(work, 1, "--resamples", "41", tag="r41")
    err = refused(work, [parts[0], parts[1], other[2]], capsys)
    assert str(other[2]) in err and "resamples" in err and "41" in err


def test_merge_refuses_partials_of_another_gathered_set(work, parts, capsys):
    err = refused(work, parts, capsys, steps=2)
    assert "s2" in err and "image" in err


def test_merge_refuses_a_partial_whose_image_hashes_differ(work, parts, capsys, tmp_path):
    from fewstep.scoring import read_partial, write_partial

    header, arrays = read_partial(parts[1])
    header["image_sha256"][0] = "0" * 64
    bad = tmp_path / "bad.npz"
    write_partial(bad, header, arrays)
    err = refused(work, [parts[0], bad, parts[2]], capsys)
    assert str(bad) in err and "sha256" in err


def test_partial_refuses_a_folder_that_is_not_a_shard(work, capsys, tmp_path):
    out = tmp_path / "p.npz"
    assert main(score_args(work, "--partial", "--samples", str(work / "s1"), "--out",
                           str(out))) != 0
    assert "shard.json" in capsys.readouterr().err and not out.exists()


def test_partial_takes_no_teacher_comparison(work, capsys, tmp_path):
    out = tmp_path / "p.npz"
    assert main(score_args(work, "--partial", "--samples", str(shard_dirs(work, 1)[0]),
                           "--against", str(work / "teacher2.json"), "--out", str(out))) != 0
    assert "--against" in capsys.readouterr().err


def test_partial_arrays_are_float64_and_finite(parts):
    from fewstep.scoring import read_partial

    _, arrays = read_partial(parts[0])
    assert all(a.dtype == np.float64 and np.isfinite(a).all() for a in arrays.values())


def dry_run(tmp_path: Path, shards: int) -> str:
    import subprocess
    import sys

    import yaml

    from fewstep import config as workflow_config

    cfg = {"families": ["sit"], "eval": {"prompts": 61, "seeds": [0, 1], "steps": [1, 2],
                                         "shards": shards}}
    (tmp_path / f"cfg{shards}.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s",
                          str(workflow_config.REPO / "Snakefile"), "-d", str(tmp_path / "work"),
                          "-n", "-p", "all", "--configfile", str(tmp_path / f"cfg{shards}.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_the_dag_scores_k_shards_into_partials_and_merges_each_set(tmp_path):
    stdout = dry_run(tmp_path, 2)
    commands = [line for line in stdout.splitlines() if line.startswith("Shell command:")]
    partial = [c for c in commands if " score " in c and "--partial" in c]
    merges = [c for c in commands if " score-merge " in c]
    students = [c for c in merges if "/teacher/" not in c.split("--samples")[1].split()[0]]
    assert not [c for c in commands if " score " in c and "--partial" not in c]
    # a job per shard for the teacher (all its steps) and per student replicate and shard
    assert sum("results/shards/sit/teacher/" in c for c in partial) == 2
    assert len(merges) == 2 + len(students) and len(partial) == 2 + 2 * len(students)
    assert students and all("--against results/scores/sit/teacher/steps1.json" in c
                            for c in students)
    assert not any("--against" in c for c in partial)
    assert all(c.count(".npz") == 2 for c in students)   # the replicate's two partials
    plain = dry_run(tmp_path, 1)
    assert "--partial" not in plain and "score-merge" not in plain


def test_merge_refuses_a_file_that_is_not_a_partial(work, parts, capsys, tmp_path):
    bogus = tmp_path / "bogus.npz"
    bogus.write_text("{}")
    err = refused(work, [parts[0], parts[1], bogus], capsys)
    assert f"{bogus} is not a partial score file" in err


def test_merge_refuses_a_partial_scored_with_another_feature_net_file(work, parts, capsys,
                                                                     tmp_path):
    """The path is the same in every partial's arguments; the bytes behind it must be too."""
    from fewstep.scoring import read_partial, write_partial

    header, arrays = read_partial(parts[2])
    header["files_sha256"] = {"feature_net": "f" * 64}   # what another file's bytes would record
    bad = tmp_path / "other-net.npz"
    write_partial(bad, header, arrays)
    err = refused(work, [parts[0], parts[1], bad], capsys)
    assert str(bad) in err and "feature_net" in err and "sha256" in err
