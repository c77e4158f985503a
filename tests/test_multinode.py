"""Multi-node training (distill.nodes): the srun/torchrun command and the SLURM resources the train
rule gets, the default commands unchanged, bad input refused, and the c10d rendezvous of two
node launchers forming one 2-node x 2-rank gloo world on this machine."""
import copy
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from fewstep import config as workflow_config
from fewstep import planning
from fewstep.errors import FewstepError
from dry_run import dry_run  # tests/dry_run.py
from test_slurm import TINY as SLURM_TINY

DEFAULT = workflow_config.load(workflow_config.DEFAULT)
# test_slurm's tiny config with one rank a node (it runs two ranks in one allocation)
TINY = {**SLURM_TINY, "distill": {k: v for k, v in SLURM_TINY["distill"].items()
                                  if k != "processes"}}


def distill(cfg: dict, **values) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["distill"].update(values)
    return cfg


# -- the command and the resources (pure) ----------------------------------------------------------
def test_one_node_keeps_todays_launcher_and_resources():
    assert planning.train_launch(DEFAULT, "py") == "py -m fewstep"
    assert planning.train_resources(DEFAULT) == {"gpu": 1}
    assert planning.train_guard(DEFAULT) == ""
    four = distill(DEFAULT, processes=4, nodes=1)
    assert planning.train_launch(four, "py") == (
        "py -m torch.distributed.run --standalone --signals-to-handle "
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 240 --nproc_per_node 4 -m fewstep")
    assert planning.train_resources(four) == {"gpu": 4}


def test_several_nodes_are_srun_running_one_torchrun_per_node():
    cfg = distill(DEFAULT, nodes=8, processes=8)
    launch = planning.train_launch(cfg, "/opt/my env/python")
    words = shlex.split(launch)
    assert words[:8] == ["srun", "--nodes", "8", "--ntasks", "8", "--ntasks-per-node", "1",
                         "--kill-on-bad-exit=1"]
    assert words[8:10] == ["bash", "-c"] and words[11:] == ["torchrun", "-m", "fewstep"]
    script = words[10]
    assert script.startswith('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) && '
                             "port=$((29500 + SLURM_JOB_ID % 2000)) && ")
    # the interpreter path (a config-derived string) stays one quoted word inside the script;
    # SIGUSR1 (the profile's warning before the time limit) is forwarded to the ranks, which get
    # STOP_GRACE_S to save
    assert "exec '/opt/my env/python' -m torch.distributed.run --nnodes 8 --nproc_per_node 8 " \
           '--rdzv_backend c10d --rdzv_endpoint "$head:$port" --rdzv_id "$SLURM_JOB_ID" ' \
           "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 240 " \
           '"$@"' in script
    assert planning.train_resources(cfg) == {"nodes": 8, "tasks": 8, "tasks_per_gpu": 0,
                                             "gres": "gpu:8", "mpi": "srun"}
    assert planning.world_size(cfg) == 64


def test_the_rendezvous_port_comes_from_the_job_id_inside_the_task(tmp_path):
    """Two jobs sharing a head node get other ports; the port is worked out by the node's bash
    from $SLURM_JOB_ID (nothing from the config passes a shell twice)."""
    assert [planning.rdzv_port(i) for i in (0, 1, 1999, 2000, 4242)] == [29500, 29501, 31499,
                                                                         29500, 29742]
    assert all(1024 <= planning.rdzv_port(i) < 32768 for i in range(0, 10**6, 997))
    bin_dir = fake_scontrol(tmp_path)
    for job_id in (4242, 123456789):
        out = subprocess.run(["bash", "-c", planning.node_launch("echo", 2, 2) + " -m fewstep"],
                             capture_output=True, text=True, timeout=30, env={
                                 **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                 "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "n[1-2]"})
        assert out.returncode == 0, out.stderr
        words = out.stdout.split()
        assert words[words.index("--rdzv_endpoint") + 1] == f"127.0.0.1:{planning.rdzv_port(job_id)}"
        assert words[-2:] == ["-m", "fewstep"]


def test_a_multinode_job_outside_slurm_stops_naming_distill_nodes(tmp_path):
    guard = planning.train_guard(distill(DEFAULT, nodes=2))
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    out = subprocess.run(["bash", "-c", guard + "echo started"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 2 and "started" not in out.stdout
    assert "distill.nodes = 2" in out.stderr and "--profile slurm" in out.stderr
    inside = subprocess.run(["bash", "-c", guard + "echo started"], capture_output=True,
                            text=True, env={**env, "SLURM_JOB_ID": "7"}, timeout=30)
    assert inside.returncode == 0 and inside.stdout == "started\n"


def test_a_global_batch_nodes_times_processes_do_not_divide_names_both():
    cfg = distill(DEFAULT, methods=["dmd"], nodes=3, processes=2)
    cfg["distill"]["overrides"]["dmd"] = {"global_batch": 8}
    with pytest.raises(FewstepError, match=r"global_batch = 8.*world size 6.*"
                                           r"distill\.nodes 3 x distill\.processes 2"):
        planning.run_options(cfg, "dmd")


def test_config_validation_divides_the_global_batch_by_nodes_times_processes():
    """At config load (so `snakemake -n` refuses it before any job), not at the train job:
    8 over 2 processes divides, over 3 nodes x 2 processes it does not."""
    cfg = distill(DEFAULT, methods=["dmd"], nodes=3, processes=2)
    cfg["distill"]["overrides"]["dmd"] = {"global_batch": 8}
    with pytest.raises(workflow_config.ConfigError,
                       match=r"global_batch = 8 is not divisible by the world size 6.*"
                             r"distill/nodes 3 x distill/processes 2") as err:
        workflow_config.validate(cfg)
    assert "distill/overrides/dmd" in str(err.value)
    workflow_config.validate(distill(cfg, nodes=2))  # 8 / (2 x 2) divides
    workflow_config.validate(distill(cfg, nodes=1))  # 8 / 2 divides


def test_the_schema_refuses_zero_nodes():
    cfg = distill(DEFAULT, nodes=0)
    with pytest.raises(workflow_config.ConfigError, match="nodes"):
        workflow_config.validate(cfg)


class Resources(dict):
    __getattr__ = dict.__getitem__


def test_the_slurm_plugin_turns_the_resources_into_one_job_of_8_nodes_with_8_gpus_each():
    """The plugin's own sbatch builder (snakemake-executor-plugin-slurm 2.8.0) on the train rule's
    resources and the profile's train entry: one task per node, GPUs per node (gres), no
    --ntasks-per-gpu; mpi makes its jobstep run the command as is (no `srun -n1` around it)."""
    from types import SimpleNamespace
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    res = Resources(planning.train_resources(distill(DEFAULT, nodes=8, processes=8)),
                    runtime=720, mem_mb=8000, slurm_extra="'--signal=USR1@300'")
    job = SimpleNamespace(resources=res, threads=8, name="train", is_group=lambda: False)
    params = dict(run_uuid="u", slurm_logfile="l", comment_str="c", account="", partition="",
                  workdir="/w")
    sbatch = submit.get_submit_command(job, params) + set_gres_string(job)
    assert " --nodes=8 --ntasks=8 " in sbatch and sbatch.endswith(" --gres=gpu:8")
    assert "--ntasks-per-gpu" not in sbatch and "--gpus=" not in sbatch
    assert "'--signal=USR1@300'" in sbatch


# -- the dry run --------------------------------------------------------------------------------------
def _train_jobs(stdout: str) -> list[str]:
    """Each train job's block of the dry run (its rule line to its shell command)."""
    blocks = stdout.split("\nrule ")
    return [b for b in blocks if b.startswith("train:")]


def test_the_dry_run_of_8_nodes_x_8_gpus_shows_srun_torchrun_and_the_resources(tmp_path):
    base = _train_jobs(dry_run(tmp_path / "a", TINY))
    big = _train_jobs(dry_run(tmp_path / "b", distill(TINY, nodes=8, processes=8)))
    assert base and len(base) == len(big)
    print(big[0])  # the 8 x 8 command line, as generated (pytest -s shows it)
    for job in big:
        assert "nodes=8" in job and "tasks=8" in job and "gres=gpu:8" in job and "mpi=srun" in job
        assert "srun --nodes 8 --ntasks 8 --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c" in job
        assert "--nnodes 8 --nproc_per_node 8 --rdzv_backend c10d" in job
        assert ' torchrun -m fewstep train --method dummy' in job
    for job in base:  # one node: today's command, byte for byte
        assert "srun" not in job and "resources: tmpdir=/tmp, gpu=1\n" in job
        assert f"Shell command: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 {sys.executable} -m fewstep " \
               "train --method dummy" in job


# -- the rendezvous -------------------------------------------------------------------------------------
WORLD = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    with open(os.path.join(sys.argv[1], f"rank{rank}"), "w") as f:
        f.write(f"{world} {t.item()} {os.environ['LOCAL_RANK']} {os.environ['GROUP_RANK']}")
    if sys.argv[2:] == ["die"] and rank == 3:
        os._exit(9)
    dist.barrier()
    dist.destroy_process_group()
""")


def free_port_job_id() -> int:
    """A job id whose rendezvous port (planning.rdzv_port) is free on this machine now."""
    for job_id in range(4242042, 4242042 + planning.RDZV_PORTS):  # from 29542: not the default
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", planning.rdzv_port(job_id)))
            except OSError:
                continue
        return job_id
    raise AssertionError("every port of the rendezvous range is taken")


def fake_scontrol(tmp_path):
    """A folder with an `scontrol` that names this machine as the allocation's first node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir


def _launch_nodes(tmp_path, *script_args):
    """The generated per-node command (what srun runs on each node), started twice here, with a
    fake `scontrol`; the rendezvous port is the one the command derives from the job id."""
    bin_dir = fake_scontrol(tmp_path)
    (tmp_path / "world.py").write_text(WORLD)
    node = planning.node_launch(sys.executable, 2, 2)
    cmd = f"{node} {tmp_path / 'world.py'} {tmp_path} " + " ".join(script_args)
    job_id = free_port_job_id()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": str(job_id),
           "SLURM_JOB_NODELIST": "node[1-2]", "OMP_NUM_THREADS": "1",
           "LOGLEVEL": "INFO"}  # torchrun logs its launch config, the rendezvous endpoint too
    return [subprocess.Popen(["bash", "-c", cmd], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for _ in range(2)], planning.rdzv_port(job_id)


def test_two_node_launchers_form_one_four_rank_world(tmp_path):
    nodes, port = _launch_nodes(tmp_path)
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(logs)[-4000:]
    for log in logs:  # both agents met on the port derived from the job id
        assert re.search(rf"rdzv_endpoint\s*: 127\.0\.0\.1:{port}\n", log), log[-4000:]
    seen = {r: (tmp_path / f"rank{r}").read_text().split() for r in range(4)}
    assert all(v[:2] == ["4", "6.0"] for v in seen.values())  # world 4, 0+1+2+3
    assert sorted((v[3], v[2]) for v in seen.values()) == [("0", "0"), ("0", "1"), ("1", "0"),
                                                            ("1", "1")]


DEAD_RANK_TIMEOUT_S = 120  # torchrun's agent notices a dead rank and stops both nodes well within


def test_a_dead_rank_ends_both_nodes_within_the_timeout(tmp_path):
    start = time.monotonic()
    nodes, _ = _launch_nodes(tmp_path, "die")
    try:
        codes = [p.wait(timeout=DEAD_RANK_TIMEOUT_S) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert all(c != 0 for c in codes), codes
    print(f"both nodes ended {time.monotonic() - start:.1f} s after the start")  # 9 s here (2 cores)
