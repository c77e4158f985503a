"""A cell over its training seeds (fewstep aggregate, fewstep.cells): the replicates' score files
into the mean over seeds, the per-seed values and the two-level interval, paired with the teacher
and with another cell on the shared prompts and noise."""
import json

import numpy as np
import pytest

from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts
from fewstep.io import write_json, write_text
from fewstep.toy import world
from metrics.sampleset import write_sample_set

SEEDS = (0, 1)
METRICS = ("toy_hps", "toy_geneval")


def _set(folder, rows, method: str, offset: int, nfe: int = 4):
    """A sample set of toy renders; `offset` shifts the render noise (another 'training seed')."""
    images = np.stack([world.render(r, s + offset, 16)[0] for r in rows for s in SEEDS])
    records = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "seed": s, "family": "sdxl",
                "method": method, "nfe": nfe, "steps": nfe // 2, "guidance": 2.0, "meta": r}
               for r in rows for s in SEEDS]
    write_sample_set(folder, images, records)
    write_json(folder / "provenance.json", {"timing": {"latency_s": 0.01}})
    return folder


def _score(samples, prompts, out, against=()):
    args = ["score", "--samples", str(samples), "--prompts", str(prompts), "--seeds",
            *map(str, SEEDS), "--resolution", "16", "--metrics", *METRICS, "--allow-blank",
            "--resamples", "200", "--out", str(out)]
    assert main(args + (["--against", *map(str, against)] if against else [])) == 0
    return out


def _aggregate(files, seeds, teacher, out):
    assert main(["aggregate", "--replicates", *map(str, files), "--training-seeds",
                 *map(str, seeds), "--against", str(teacher), "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def world_sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cells")
    rows = eval_prompts("sdxl", 12)
    prompts = tmp / "p.jsonl"
    write_text(prompts, "".join(json.dumps(r) + "\n" for r in rows))
    teacher = _score(_set(tmp / "teacher", rows, "teacher", 0), prompts, tmp / "teacher.json")
    cells = {}
    for method, base in (("dmd", 10), ("amd", 20)):
        cells[method] = [_score(_set(tmp / f"{method}{k}", rows, method, base + k), prompts,
                                tmp / f"{method}-seed{k}.json", [teacher]) for k in range(3)]
    return tmp, teacher, cells


def test_one_replicate_is_its_own_score_file_with_the_seed_recorded(world_sets, tmp_path):
    _, teacher, cells = world_sets
    cell = _aggregate(cells["dmd"][:1], [0], teacher, tmp_path / "one.json")
    replicate = json.loads(cells["dmd"][0].read_text())
    assert cell["n_training_seeds"] == 1
    for name in METRICS:
        mine, theirs = cell["results"][name], replicate["results"][name]
        assert (mine["value"], mine["ci_low"], mine["ci_high"]) == \
            (theirs["value"], theirs["ci_low"], theirs["ci_high"])
        assert mine["details"]["per_seed"] == {"0": theirs["value"]}
        paired = cell["against_teacher"]["metrics"][name]
        assert paired["difference"] == replicate["against_teacher"]["metrics"][name]["difference"]
        assert paired["n_training_seeds"] == {"a": 1, "b": None}


def test_three_seeds_average_and_widen_with_the_spread_between_seeds(world_sets, tmp_path):
    _, teacher, cells = world_sets
    cell = _aggregate(cells["dmd"], [0, 1, 2], teacher, tmp_path / "three.json")
    reps = [json.loads(f.read_text()) for f in cells["dmd"]]
    assert [r["training_seed"] for r in cell["replicates"]] == [0, 1, 2]
    for name in METRICS:
        values = [r["results"][name]["value"] for r in reps]
        result = cell["results"][name]
        assert result["value"] == pytest.approx(np.mean(values))
        assert result["details"]["per_seed"] == pytest.approx(dict(zip("012", values)))
        assert result["details"]["n_training_seeds"] == 3
        assert result["ci_low"] <= result["value"] <= result["ci_high"]
        paired = cell["against_teacher"]["metrics"][name]
        teacher_value = json.loads(teacher.read_text())["results"][name]["value"]
        assert paired["difference"] == pytest.approx(np.mean(values) - teacher_value)
        assert paired["n_training_seeds"] == {"a": 3, "b": None} and "p_value" in paired


def test_two_cells_are_paired_over_their_seeds(world_sets, tmp_path):
    from fewstep.pairing import paired

    _, teacher, cells = world_sets
    a = _aggregate(cells["dmd"], [0, 1, 2], teacher, tmp_path / "a.json")
    b = _aggregate(cells["amd"], [0, 1, 2], teacher, tmp_path / "b.json")
    out = paired("toy_hps", a, b)
    assert out["difference"] == pytest.approx(a["results"]["toy_hps"]["value"]
                                              - b["results"]["toy_hps"]["value"])
    assert out["n_training_seeds"] == {"a": 3, "b": 3}


def test_replicates_of_different_cells_or_repeated_seeds_are_refused(world_sets, tmp_path, capsys):
    _, teacher, cells = world_sets
    rc = main(["aggregate", "--replicates", str(cells["dmd"][0]), str(cells["amd"][0]),
               "--training-seeds", "0", "1", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "not one cell" in capsys.readouterr().err
    rc = main(["aggregate", "--replicates", *map(str, cells["dmd"][:2]),
               "--training-seeds", "4", "4", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "repeat" in capsys.readouterr().err
    rc = main(["aggregate", "--replicates", str(cells["dmd"][0]),
               "--training-seeds", "x", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "not a seed" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
