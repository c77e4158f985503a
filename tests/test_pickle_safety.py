"""No full unpickling anywhere: every torch checkpoint is read with the tensor-only loader, and a
file that needs more is converted once, by a person who trusts it, with `fewstep weights convert
--trust-pickle` (which still never runs a global it was not shown, nor a dangerous one)."""
import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main

REPO = Path(__file__).resolve().parent.parent

# built from pieces so that this file does not match its own patterns
UNSAFE = [re.compile(p) for p in ("weights_only" + r"\s*=\s*" + "Fal" + "se",
                                  r"\bpickle\s*\.\s*(load|loads|Unpickler)\b" + "",
                                  r"\bdill\s*\.\s*load" + "", r"allow_pickle" + r"\s*=\s*True")]
TORCH_LOAD = re.compile(r"\btorch\s*\.\s*" + "load" + r"\s*\(")
SAFE_FLAG = re.compile("weights_only" + r"\s*=\s*True")


def tracked_sources() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py", "*.smk", "Snakefile"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def call_text(text: str, start: int) -> str:
    """The argument text of the call whose '(' ends at `start` (balanced parentheses)."""
    depth, i = 1, start
    while depth and i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start:i]


def unsafe_loads(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    found = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for pattern in UNSAFE for m in pattern.finditer(text)]
    for m in TORCH_LOAD.finditer(text):
        if not SAFE_FLAG.search(call_text(text, m.end())):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{name}:{line}: torch.load without weights_only=True")
    return found


def test_no_tracked_source_unpickles_fully():
    sources = tracked_sources()
    assert any(p.name == "hpsv2.py" for p in sources)  # the scan sees the tree
    found = [hit for path in sources for hit in unsafe_loads(path)]
    assert not found, "full unpickling can run code from a crafted file:\n" + "\n".join(found)


def test_the_scan_catches_what_it_names(tmp_path):
    probe = tmp_path / "probe.py"
    for snippet in ("torch" + ".load(f,\n map_location='cpu')",
                    "torch" + ".load(f, weights_only=" + "False)",
                    "torch" + ".load(open(f), map_location=dev)  # weights_only=True later",
                    "import pickle; pickle" + ".loads(b)"):
        probe.write_text(snippet)
        assert unsafe_loads(probe), snippet
    probe.write_text("torch" + ".load(f,\n  map_location='cpu', weights_only=True)")
    assert not unsafe_loads(probe)


def test_convert_needs_the_trust_flag_and_writes_tensors(tmp_path, capsys):
    """A checkpoint holding a non-tensor object (like SiT's train.py `args`) converts once the
    user names it with --trust-pickle; the globals trusted are printed."""
    src = tmp_path / "ckpt.pt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, src)
    assert main(["weights", "convert", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--trust-pickle FILE" in capsys.readouterr().err
    out = tmp_path / "ckpt.safetensors"
    assert main(["weights", "convert", "--trust-pickle", str(src), "--out", str(out)]) == 0
    assert "argparse.Namespace" in capsys.readouterr().out
    got = load_file(str(out))
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_convert_refuses_a_global_that_runs_commands_even_when_trusted(tmp_path, capsys):
    marker = tmp_path / "the-pickle-ran"
    src = tmp_path / "crafted.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _RunsCode(marker)}, src)
    code = main(["weights", "convert", "--trust-pickle", str(src), "--out",
                 str(tmp_path / "out.safetensors")])
    assert code == 2 and "posix.mkdir" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_convert_picks_the_state_dict_and_names_non_tensors(tmp_path, capsys):
    src = tmp_path / "mixed.pt"
    torch.save({"model": {"w": torch.ones(2), "step": 3}}, src)
    code = main(["weights", "convert", "--trust-pickle", str(src), "--key", "model",
                 "--out", str(tmp_path / "out.safetensors")])
    assert code == 2 and "not tensors: ['step']" in capsys.readouterr().err
    torch.save({"ema": {"w": torch.ones(2)}, "opt": {"x": torch.zeros(1)}}, src)
    assert main(["weights", "convert", "--trust-pickle", str(src), "--out",
                 str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--key" in err and "'ema'" in err and "'opt'" in err
    assert main(["weights", "convert", "--trust-pickle", str(src), "--key", "ema", "--out",
                 str(tmp_path / "out.safetensors")]) == 0
    assert list(load_file(str(tmp_path / "out.safetensors"))) == ["w"]
