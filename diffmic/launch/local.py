"""N processes on this machine from one command: `diffmic train --gpus 2`, or `--gpus 0 --tasks-per-node 2`
on the CPU (gloo). Accelerate's launch API starts them (torch's elastic launcher underneath), each running
the job (diffmic.launch.job) the command resolved, as a Slurm task does; the job travels as its JSON file.
"""

from __future__ import annotations

import os

from ..errors import LaunchError
from .job import Job, job_command, job_file


def check_gpus(processes: int) -> None:
    """More processes than GPUs is an error before anything starts."""
    import torch

    available = torch.cuda.device_count()
    if processes > available:
        raise LaunchError(f"--gpus {processes} asks for {processes} GPU process(es), but this machine has "
                          f"{available} GPU(s) visible; pass --gpus {available}" if available else
                          f"--gpus {processes} asks for GPU processes, but this machine has no GPU visible to "
                          f"torch; for CPU processes pass --gpus 0 --tasks-per-node {processes}")


def launch_arguments(processes: int, command: list[str], port: int) -> list[str]:
    """`accelerate launch` flags for N processes on one machine running `python COMMAND`. --multi_gpu also on the
    CPU: there, with ACCELERATE_USE_CPU=1, it starts N gloo processes (`--cpu --num_processes N` starts one)."""
    return ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), *command]


def launch_processes(job: Job, processes: int, cpu: bool, progress: bool = False, report=print) -> None:
    """Runs the job in `processes` local processes and returns when all have ended; LaunchError if one failed
    (its error is above, in the processes' own output). Too few GPUs fail before anything is reported."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from ..accelerator import free_port

    if not cpu:
        check_gpus(processes)
    report(f"{job.kind}: {processes} local {'CPU' if cpu else 'GPU'} process(es)")
    with job_file(job) as spec:
        environment = {"ACCELERATE_USE_CPU": "1"} if cpu else {}
        # One thread pool per process, sharing the machine's cores, unless the user sized them.
        environment.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS",
                                                                 str(max(1, (os.cpu_count() or 1) // processes))))
        previous = {key: os.environ.get(key) for key in environment}
        os.environ.update(environment)
        try:
            arguments = launch_arguments(processes, job_command(spec, progress), free_port())
            launch_command(launch_command_parser().parse_args(arguments))
        except Exception as error:  # torch's ChildFailedError and the like: the child printed its own error
            raise LaunchError(f"{job.kind} with {processes} local process(es) failed: {type(error).__name__}; "
                              f"the failing process's error is above") from None
        finally:
            for key, value in previous.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
