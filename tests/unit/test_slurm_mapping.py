"""How a replica becomes a Slurm job, and how Slurm's text output is read: pure functions."""

from __future__ import annotations

from pathlib import Path

from controller.node_proxies import node_proxy_command
from controller.resources import ResourceRequest
from controller.slurm_cli import (
    SlurmError,
    SlurmOptions,
    batch_script,
    parse_scontrol_job,
    parse_squeue,
    sbatch_args,
)


def test_resources_map_to_the_job() -> None:
    request = ResourceRequest(
        num_cpus=1.5, num_gpus=2, memory_bytes=3 * 2**30 + 1, custom=(("nvme", 1.0),)
    )
    args = sbatch_args(
        request,
        SlurmOptions(partition="gpu", sbatch_options=("--time=1-0", "--account=ml")),
        name="serve-x:app#D#1",
        output="/logs/x_%j.out",
        exclude=["n2", "n1"],
    )
    assert args[:2] == ["sbatch", "--parsable"]
    for expected in (
        "--job-name=serve-x:app#D#1",
        "--cpus-per-task=2",
        "--gres=gpu:2,nvme:1",
        "--mem=3073M",
        "--partition=gpu",
        "--exclude=n1,n2",
        "--no-requeue",
        "--export=ALL",
    ):
        assert expected in args
    assert args[-2:] == ["--time=1-0", "--account=ml"]  # last: an operator's option wins


def test_defaults_ask_for_one_cpu_and_nothing_else() -> None:
    args = sbatch_args(ResourceRequest(num_cpus=0), SlurmOptions(), name="n", output="o")
    assert "--cpus-per-task=1" in args
    assert not [a for a in args if a.startswith(("--gres", "--mem", "--exclude", "--partition"))]


def test_the_batch_script_holds_no_token_and_names_the_node() -> None:
    script = batch_script(["/venv/bin/python", "-m", "replica", "--replica-id", "a#b#c d"])
    assert script.startswith("#!/bin/sh\n")
    assert 'export SERVE_NODE_ID="${SLURMD_NODENAME:-$(hostname)}"' in script
    assert "exec /venv/bin/python -m replica --replica-id 'a#b#c d'\n" in script
    assert "TOKEN" not in script


def test_squeue_and_scontrol_output_is_parsed() -> None:
    jobs = parse_squeue("12|RUNNING|n1|None|serve-x:a#b#1\n13|PENDING||Resources|serve-x:a|b\n")
    assert jobs["12"].node == "n1"
    assert jobs["13"].reason == "Resources"
    assert jobs["13"].name == "serve-x:a|b"
    line = "JobId=12 JobName=x JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0 RunTime=1"
    assert parse_scontrol_job(line) == ("FAILED", 1)
    assert parse_scontrol_job("JobId=9 JobState=CANCELLED ExitCode=0:15") == ("CANCELLED", -15)
    assert parse_scontrol_job("garbage") == ("UNKNOWN", None)


def test_a_node_proxy_binds_the_nodes_own_address_unless_told_a_wildcard_or_loopback() -> None:
    def host(flag: str) -> str:
        command = node_proxy_command(
            "10.0.0.5:7000", ["--http-host", flag, "--http-port", "0"], None, "n1"
        )
        return command[command.index("--http-host") + 1]

    assert host("10.0.0.5") == "auto"  # the controller's host: each node binds its own
    assert host("0.0.0.0") == "0.0.0.0"
    assert host("127.0.0.1") == "127.0.0.1"
    command = node_proxy_command("10.0.0.5:7000", [], Path("/logs"), "n1")
    assert command[-2:] == ["--log-file", "/logs/proxy_n1.log"]
    assert command[command.index("--controller") + 1] == "10.0.0.5:7000"


def test_only_a_cluster_manager_that_cannot_be_asked_is_a_transient_error() -> None:
    assert SlurmError(
        "sbatch failed: Batch job submission failed: Unable to contact slurm controller"
    ).transient
    assert SlurmError("squeue failed: slurm_load_jobs error: Socket timed out").transient
    assert SlurmError("sbatch did not answer within 30s").transient
    assert not SlurmError("sbatch failed: Invalid partition name specified").transient
    assert not SlurmError("sbatch failed: Requested node configuration is not available").transient
