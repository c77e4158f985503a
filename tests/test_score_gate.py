"""`fewstep score` gates every sample set by content before any metric runs: each record's prompt
text and metadata must be the prompt file's row of its prompt id, the set-level fields come from
the manifest's header (never from one row), and the score file names the manifest it scored."""
import hashlib
import json

import numpy as np
import pytest

from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts
from fewstep.io import write_json, write_text
from fewstep.toy import world
from metrics.sampleset import MANIFEST, write_sample_set

SEEDS = (0, 1)


def _prompt_file(path, rows):
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sample_set(folder, rows):
    """A teacher set of toy renders, written as `fewstep sample` writes one (meta: prompt row)."""
    images = np.stack([world.render(r, s, 16)[0] for r in rows for s in SEEDS])
    records = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "seed": s, "family": "sdxl",
                "method": "teacher", "nfe": 4, "steps": 2, "guidance": 2.0, "meta": r}
               for r in rows for s in SEEDS]
    write_sample_set(folder, images, records)
    write_json(folder / "provenance.json", {"timing": {"latency_s": 0.01}})
    return folder


def _score(samples, prompts, out):
    return main(["score", "--samples", str(samples), "--prompts", str(prompts), "--seeds",
                 *map(str, SEEDS), "--resolution", "16", "--metrics", "toy_hps",
                 "--resamples", "20", "--out", str(out)])


@pytest.fixture
def rows():
    return eval_prompts("sdxl", 3)


def test_the_score_file_takes_the_header_fields_and_names_the_manifest(tmp_path, rows):
    samples = _sample_set(tmp_path / "set", rows)
    assert _score(samples, _prompt_file(tmp_path / "p.jsonl", rows), tmp_path / "s.json") == 0
    score = json.loads((tmp_path / "s.json").read_text())
    assert (score["family"], score["method"], score["nfe"], score["steps"], score["guidance"]) == (
        "sdxl", "teacher", 4, 2, 2.0)
    manifest = (samples / MANIFEST).read_bytes()
    assert score["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()


def test_a_set_sampled_from_other_prompt_text_is_refused(tmp_path, rows, capsys):
    """Probe (e): same prompt ids and seeds, but the prompt file says something else for one id."""
    samples = _sample_set(tmp_path / "set", rows)
    edited = [dict(r) for r in rows]
    edited[1]["prompt"] = "three green triangles"
    capsys.readouterr()
    assert _score(samples, _prompt_file(tmp_path / "p.jsonl", edited), tmp_path / "s.json") == 2
    err = capsys.readouterr().err
    assert rows[1]["prompt_id"] in err and "prompt file" in err and "resample" in err
    assert not (tmp_path / "s.json").exists()
    edited = [dict(r) for r in rows]
    edited[2]["note"] = "metadata the set was not sampled with"
    assert _score(samples, _prompt_file(tmp_path / "q.jsonl", edited), tmp_path / "s.json") == 2
    assert rows[2]["prompt_id"] in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_a_first_row_with_another_nfe_is_refused_not_reported(tmp_path, rows, capsys):
    """Probe (b) through `fewstep score`: the first image row claims NFE 8 in an NFE 4 set."""
    samples = _sample_set(tmp_path / "set", rows)
    lines = [json.loads(line) for line in (samples / MANIFEST).read_text().splitlines()]
    first = next(x for x in lines if "prompt_id" in x)
    first["nfe"] = 8
    (samples / MANIFEST).write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
    capsys.readouterr()
    assert _score(samples, _prompt_file(tmp_path / "p.jsonl", rows), tmp_path / "s.json") == 2
    assert "nfe=8" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
