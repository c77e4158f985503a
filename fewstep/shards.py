"""Shard folders of a sample set (`fewstep sample --shard I/K`) and their gather.

A shard folder is a sample set of one contiguous, batch-aligned slice of a set's (prompt, seed)
jobs, its images named by their index in the whole set, plus shard.json: {"index", "count",
"jobs": [lo, hi], "set": the set's identity (every field that makes the set: family, method,
steps, nfe, guidance, sampler, teacher and student hashes, prompt-set hash, seeds, batch, jobs)}.
Gathering checks that the folders are exactly the K shards of one set, every image against its
hash, and every (prompt, seed) pair of the set once; then writes the set the unsharded
`fewstep sample` writes, byte for byte (manifest and PNGs; provenance.json lists the shards').
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fewstep.errors import FewstepError
from fewstep.io import atomic_path
from fewstep.sampling import shard_span
from metrics.sampleset import (MANIFEST, SET_KEYS, SHARD_FILE, SampleSetError, default_image_name,
                               load_sample_set, manifest_text, parse_manifest, prompt_set_sha256)

SHARD_FORMAT = 1
RESAMPLE_SHARD = ("sample that shard again (`fewstep sample ... --shard I/K --out <folder>`; in the "
                  "DAG: delete the folder and rerun its shard job)")


class GatherError(FewstepError):
    """Shard folders that do not make one sample set; the message names every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"gather refused ({len(problems)} problem(s)):\n"
                         + "\n".join(f"  - {p}" for p in problems))


def check(problems: list[str]) -> None:
    if problems:
        raise GatherError(problems)


def read_shard_info(folder: Path) -> tuple[dict | None, list[str]]:
    """shard.json of a folder, or the problem that makes it no shard folder."""
    path = folder / SHARD_FILE
    if not folder.is_dir():
        return None, [f"{folder} is not a folder"]
    if not path.is_file():
        return None, [f"{folder} is not a shard folder: it has no {SHARD_FILE} (shard folders are "
                      "written by `fewstep sample ... --shard I/K`; a whole set needs no gather)"]
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [f"{path} is not valid JSON ({err}); {RESAMPLE_SHARD}"]
    types = {"fewstep_shard": int, "index": int, "count": int, "jobs": list, "set": dict}
    if not isinstance(info, dict) or any(not isinstance(info.get(k), t) for k, t in types.items()):
        return None, [f"{path} needs {', '.join(types)} (an integer, integers, a list, an "
                      f"object); {RESAMPLE_SHARD}"]
    if info["fewstep_shard"] != SHARD_FORMAT:
        return None, [f"{path} has shard format {info['fewstep_shard']!r}, this fewstep reads "
                      f"{SHARD_FORMAT}; {RESAMPLE_SHARD}"]
    return info, []


def identity_problems(infos: dict[Path, dict]) -> list[str]:
    """Every shard against the first: the same set, cut into the same number of shards."""
    (first, ref), *others = infos.items()
    problems = []
    for folder, info in others:
        keys = [k for k in sorted(set(ref["set"]) | set(info["set"]))
                if info["set"].get(k) != ref["set"].get(k)]
        if keys:
            def fields(ident):
                return ", ".join(f"{k}={ident.get(k)!r}" for k in keys)
            problems.append(f"{folder} is a shard of another set: its {fields(info['set'])} are "
                            f"not {first}'s {fields(ref['set'])}; gather only the shards of one "
                            "set")
        elif info["count"] != ref["count"]:
            problems.append(f"{folder} is shard {info['index']} of {info['count']} but {first} is "
                            f"of {ref['count']}: sample every shard of the set with the same K")
    return problems


def index_problems(infos: dict[Path, dict]) -> list[str]:
    """Each index 0..K-1 exactly once."""
    count = next(iter(infos.values()))["count"]
    by_index: dict[int, list[Path]] = {}
    for folder, info in infos.items():
        by_index.setdefault(info["index"], []).append(folder)
    problems = [f"shard {i} of {count} is missing: sample it with the set's `fewstep sample` "
                f"options and --shard {i}/{count}, and give its folder to --shards"
                for i in range(count) if i not in by_index]
    problems += [f"shard {i} of {count} is given twice or more: {', '.join(map(str, folders))}; "
                 "give each shard once" for i, folders in sorted(by_index.items())
                 if len(folders) > 1]
    problems += [f"{folders[0]} says it is shard {i} of {count}, outside 0..{count - 1}; "
                 f"{RESAMPLE_SHARD}" for i, folders in by_index.items()
                 if not (isinstance(i, int) and 0 <= i < count)]
    return problems


def shard_content_problems(folder: Path, info: dict):
    """(the shard's validated SampleSet or None, problems): its images against their hashes, its
    jobs the slice its index names, its rows that slice's images, its header the set's fields."""
    ident = info["set"]
    try:
        samples = load_sample_set(folder, allow_blank=True)  # blankness is scoring's check
    except SampleSetError as err:
        return None, [f"shard folder {folder}: {p}" for p in err.problems] + [
            f"shard folder {folder}: {RESAMPLE_SHARD}"]
    try:
        lo, hi = shard_span(ident["jobs"], ident["batch"], info["index"], info["count"])
    except (FewstepError, KeyError, TypeError) as err:
        return None, [f"{folder}: its {SHARD_FILE} names no shard of its set ({err}); "
                      f"{RESAMPLE_SHARD}"]
    problems = []
    if info["jobs"] != [lo, hi]:
        problems.append(f"{folder}: jobs {info['jobs']} are not shard {info['index']} of "
                        f"{info['count']}'s [{lo}, {hi}]; {RESAMPLE_SHARD}")
    if [r["path"] for r in samples.records] != [default_image_name(j) for j in range(lo, hi)]:
        problems.append(f"{folder}: its images are not those of jobs {lo}..{hi - 1} "
                        f"({default_image_name(lo)} ... in order); {RESAMPLE_SHARD}")
    problems += [f"{folder}: its manifest's {k}={samples.header.get(k)!r} is not its "
                 f"{SHARD_FILE}'s {ident.get(k)!r}; {RESAMPLE_SHARD}"
                 for k in SET_KEYS if samples.header.get(k) != ident.get(k)]
    return samples, problems


def coverage_problems(records: list[dict], where: list[Path], ident: dict) -> list[str]:
    """Every (prompt_id, seed) pair of the set exactly once, in the set's prompt-major order, and
    the prompts those of the set (its prompt-set hash)."""
    seen: dict[tuple, Path] = {}
    problems = []
    for record, folder in zip(records, where):
        key = (record["prompt_id"], record["seed"])
        if key in seen:
            problems.append(f"(prompt_id, seed) {key} is in {seen[key]} and again in {folder}")
        seen.setdefault(key, folder)
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in records))
    grid = [(p, s) for p in prompt_ids for s in ident["seeds"]]
    problems += [f"(prompt_id, seed) {k} of the set is in no shard" for k in grid if k not in seen]
    if not problems and list(seen) != grid:
        problems.append("the shards' (prompt, seed) pairs are not in the set's prompt-major order")
    if prompt_set_sha256(records) != ident["prompt_set_sha256"]:
        problems.append("the shards' prompts are not the set's prompt set (prompt_set_sha256 "
                        "differs): a prompt's images are missing or from another prompt file")
    return problems


def read_shards(folders) -> tuple[dict, list]:
    """(the set's identity, [(folder, shard info, SampleSet)] in index order), after every check."""
    folders = [Path(f) for f in folders]
    infos, problems = {}, []
    for folder in folders:
        info, found = read_shard_info(folder)
        problems += found
        if folder in infos:
            problems.append(f"{folder} is given twice to --shards; give each shard folder once")
        elif info is not None:
            infos[folder] = info
    check(problems or ([] if infos else ["no shard folder given"]))
    check(identity_problems(infos))
    check(index_problems(infos))
    shards = []
    for folder, info in sorted(infos.items(), key=lambda kv: kv[1]["index"]):
        samples, found = shard_content_problems(folder, info)
        problems += found
        shards.append((folder, info, samples))
    check(problems)
    records = [r for _, _, s in shards for r in s.records]
    where = [f for f, _, s in shards for _ in s.records]
    ident = next(iter(infos.values()))["set"]
    check(coverage_problems(records, where, ident))
    return ident, shards


def copy_images(shards, folder: Path) -> list[str]:
    """Each shard's PNGs into `folder`, each checked against its manifest hash as it is copied
    (the bytes written are the bytes verified); returns the hashes in set order."""
    hashes = []
    for shard_folder, _, _ in shards:
        for row in parse_manifest(shard_folder).rows:
            data = (shard_folder / row["path"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != row["image_sha256"]:
                raise GatherError([f"{shard_folder / row['path']} changed while gathering "
                                   f"(sha256 differs from its manifest); {RESAMPLE_SHARD}"])
            (folder / row["path"]).write_bytes(data)
            hashes.append(row["image_sha256"])
    return hashes


def gather(folders, out, config: dict | None = None) -> dict:
    """Merge the shard folders into the sample set `out`, atomically; returns the set identity."""
    from fewstep.provenance import record

    ident, shards = read_shards(folders)
    records = [r for _, _, s in shards for r in s.records]
    with atomic_path(out) as tmp:
        tmp.mkdir()
        hashes = copy_images(shards, tmp)
        (tmp / MANIFEST).write_text(manifest_text(records, hashes))
        load_sample_set(tmp, allow_blank=True)  # the merged set reads back whole before it counts
        provenances = [read_provenance(f) for f, _, _ in shards]
        record(tmp / "provenance.json", config or {}, seeds=ident["seeds"], gathered=ident,
               shards=[{"folder": str(f), "shard": info, "provenance": prov}
                       for (f, info, _), prov in zip(shards, provenances)])
    return ident


def read_provenance(folder: Path):
    path = folder / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else None
