"""N processes on this machine from one command: `diffmic train --gpus 2`, or `--gpus 0 --tasks-per-node 2`
on the CPU (gloo). Accelerate's launch API starts them (torch's elastic launcher underneath), each running
`run_job`, the same function a Slurm task runs; the resolved arguments travel as a JSON file.

    python -m diffmic.launch.local SPEC.json     (what each process runs; not meant to be typed)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from ..errors import LaunchError


def check_gpus(processes: int) -> None:
    """More processes than GPUs is an error before anything starts."""
    import torch

    available = torch.cuda.device_count()
    if processes > available:
        raise LaunchError(f"--gpus {processes} asks for {processes} GPU process(es), but this machine has "
                          f"{available} GPU(s) visible; pass --gpus {available}" if available else
                          f"--gpus {processes} asks for GPU processes, but this machine has no GPU visible to "
                          f"torch; for CPU processes pass --gpus 0 --tasks-per-node {processes}")


def _json_value(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot send {type(value).__name__} to the worker processes")


def launch_arguments(processes: int, spec: Path, port: int) -> list[str]:
    """`accelerate launch` flags for N processes on one machine. --multi_gpu also on the CPU: there, with
    ACCELERATE_USE_CPU=1, it starts N gloo processes (`--cpu --num_processes N` starts one)."""
    return ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "diffmic.launch.local", str(spec)]


def launch_processes(kind: str, arguments: dict, run_dir: str | None, processes: int, cpu: bool,
                     progress: bool = False, report=print) -> None:
    """Runs the job in `processes` local processes and returns when all have ended; LaunchError if one failed
    (its traceback is above, in the processes' own output). Too few GPUs fail before anything is reported."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from ..accelerator import free_port

    if not cpu:
        check_gpus(processes)
    report(f"{kind}: {processes} local {'CPU' if cpu else 'GPU'} process(es)")
    with tempfile.TemporaryDirectory(prefix="diffmic-launch-") as folder:
        spec = Path(folder) / "job.json"
        spec.write_text(json.dumps({"kind": kind, "arguments": arguments, "run_dir": run_dir,
                                    "progress": progress}, default=_json_value))
        environment = {"ACCELERATE_USE_CPU": "1"} if cpu else {}
        # One thread pool per process, sharing the machine's cores, unless the user sized them.
        environment.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS",
                                                                 str(max(1, (os.cpu_count() or 1) // processes))))
        previous = {key: os.environ.get(key) for key in environment}
        os.environ.update(environment)
        try:
            launch_command(launch_command_parser().parse_args(launch_arguments(processes, spec, free_port())))
        except Exception as error:  # torch's ChildFailedError and the like: the child printed its own traceback
            raise LaunchError(f"{kind} with {processes} local process(es) failed: {type(error).__name__}; "
                              f"the failing process's error is above") from None
        finally:
            for key, value in previous.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def main(argv: list[str]) -> None:
    from .slurm import run_job

    spec = json.loads(Path(argv[0]).read_text())
    run_job(spec["kind"], spec["arguments"], spec["run_dir"], spec["progress"], announce=True)


if __name__ == "__main__":
    main(sys.argv[1:])
