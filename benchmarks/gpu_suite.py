"""Every GPU figure the README quotes, and the 24 GB question, from one command (issue 28).

    python benchmarks/gpu_suite.py --out runs/gpu-suite            # on a GPU: about 5 minutes, at most 8
    python benchmarks/gpu_suite.py --out /tmp/smoke --smoke        # every step at tiny sizes on the CPU
    python benchmarks/gpu_suite.py --out runs/gpu-suite --only latency,memory   # rerun some steps

The steps, in this order, with their time on paper on one H100 (first compiles included; a GPU is lent for
minutes at a time, so each figure is measured once, with few repeats):
  1. environment     10 s  GPU, memory, torch, CUDA, bf16 support, CPU cores.
  2. latency         90 s  one image at T=250, eager and compiled (CUDA graphs), bf16 and fp32, median of 3.
                           Goal: at most 15 ms per image (the paper: 56 ms on an RTX 3090).
  3. sampling        60 s  images/s at T=250, batch 256, bf16, eager and compiled. Goal: at least 3,000.
  4. training        30 s  the trainer's own step (TrainStep, fused Adam, EMA) at the paper config, bf16,
                           batch 128, DDP on one GPU. Goal: at least 2,000 images/s. Also the DCG's share.
  5. loader          30 s  the shard loader on this machine's cores (224 px, workers = cores - 2) against
                           step 4's rate: does it keep up?
  6. memory          60 s  the 24 GB question: the estimate of benchmarks/memory.py, then under a 24 GiB cap
                           the peak at batches 16, 32, 64 and the largest batch that trains, bf16 and fp32, and
                           the train.batch_size x train.grad_accum an RTX 3090 user should set.
  7. multi_gpu      100 s  with 2+ GPUs: NCCL DDP images/s on all of them against step 4 (scaling
                           efficiency), and DeepSpeed ZeRO-2 against DDP. Skipped on one GPU.
That is about 280 s on one GPU and 380 s with several, plus 15 s of start-up: inside 8 minutes.

Each step is guarded: an error is recorded in the report and the next step runs. `--out` receives
gpu_report.json and gpu_report.md after every step, so a run stopped by a time limit keeps what it
finished. The report records each step's seconds next to its budget above.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import data as loader_benchmark
import latency
import memory
import torch
from suite_report import Skipped, as_markdown, attempt, figure, header, run_steps

from diffmic.accelerator import free_port
from diffmic.checkpoint import without_pretrained
from diffmic.config import load_config
from diffmic.data.loaders import available_cpus
from diffmic.engine.distributed import training_accelerator, training_precision
from diffmic.engine.optim import ExponentialMovingAverage, build_optimizer
from diffmic.engine.step import TrainStep
from diffmic.hardware import cpu_has_native_bf16
from diffmic.models import build_model

import sampling
import train_step
from timing import REPO_CONFIGS, cpu_description, model_for, synthetic_batch

PAPER_CONFIG = REPO_CONFIGS[latency.PAPER]
LATENCY_GOAL_MS = 15.0
SAMPLING_GOAL = 3000.0
TRAINING_GOAL = 2000.0
# The paper's batch (METHOD.md section 4) and the HAM10000 config's: what a 3090 user wants to reach.
GLOBAL_BATCHES = (32, 64)


@dataclass(frozen=True)
class Sizes:
    """How large each step's work is: the paper's on a GPU, tiny for the CPU smoke run."""

    overrides: dict = field(default_factory=dict)  # config overrides; none on a GPU: the paper config
    latency_steps: int = 250
    latency_repeats: int = 3
    sampling_batch: int = 256
    sampling_steps: int = 250
    sampling_repeats: int = 2
    train_batch: int = 128
    train_repeats: int = 5
    loader_images: int = 4096
    loader_photo: tuple[int, int] = (600, 450)  # HAM10000's
    loader_seconds: float = 3.0
    memory_batches: tuple[int, ...] = (16, 32, 64)
    memory_search: tuple[int, ...] = (96, 128, 192, 256, 384, 512)
    worker_timeout_s: int = 150


GPU_SIZES = Sizes()
# 32 px images give a 1x1 saliency map, hence one ROI tile; ResNet-18 trunks and a 32-wide denoiser. The
# sampling batch equals the latency one, so its compiled step is found in inductor's cache.
SMOKE_SIZES = Sizes(overrides={"data.image_size": 32, "model.dcg.k": 1, "model.dcg.backbone": "resnet18",
                               "model.dcg.local_backbone": "resnet18", "model.denoiser.feature_dim": 32},
                    latency_steps=3, latency_repeats=1, sampling_batch=1, sampling_steps=3, sampling_repeats=1,
                    train_batch=4, train_repeats=1, loader_images=24, loader_photo=(64, 48), loader_seconds=0.5,
                    worker_timeout_s=120)


@dataclass
class Suite:
    device: torch.device
    sizes: Sizes
    smoke: bool = False
    results: dict = field(default_factory=dict)  # step name -> its result, for later steps

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def goal_met(self, value: float, goal: float, at_most: bool = False) -> bool | None:
        """Judged on a GPU only: the goals are a GPU's, a CPU smoke run's numbers say nothing of them."""
        if not self.on_gpu or value is None:
            return None
        return value <= goal if at_most else value >= goal


def native_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


def bf16_or_fp32(device: torch.device) -> str:
    return "bf16" if native_bf16(device) else "fp32"


# --- 1. environment ----------------------------------------------------------------------------------
def environment(suite: Suite) -> dict:
    import accelerate

    details = {"torch": torch.__version__, "cuda": torch.version.cuda, "accelerate": accelerate.__version__,
               "cpu": cpu_description(), "bf16": native_bf16(suite.device)}
    figures = [figure("CPU cores", available_cpus())]
    if suite.on_gpu:
        properties = torch.cuda.get_device_properties(suite.device)
        details.update({"gpu": properties.name, "capability": f"{properties.major}.{properties.minor}"})
        figures += [figure("GPUs", torch.cuda.device_count()),
                    figure("GPU memory", round(properties.total_memory / memory.GIB, 1), "GiB")]
    return {"figures": figures, "details": details}


# --- 2. latency --------------------------------------------------------------------------------------
def paper_model(suite: Suite):
    model, config = model_for(PAPER_CONFIG, suite.device, **suite.sizes.overrides)
    return model.eval(), config


def single_image_latency(suite: Suite) -> dict:
    model, config = paper_model(suite)
    sizes, figures, details, errors = suite.sizes, [], {}, {}
    for precision in ("bf16", "fp32"):
        if precision == "bf16" and not native_bf16(suite.device):
            details["bf16"] = "skipped: no native bf16 on this device"
            continue
        row = attempt(errors, precision, lambda: latency.measure(model, config, suite.device, 1, sizes.latency_steps,
                                                                 sizes.latency_repeats, precision == "bf16"))
        if row is None:
            continue
        details[precision] = row
        for mode, key in (("eager", "eager_ms"), ("--compile", "compiled_ms")):
            figures.append(figure(f"{precision} {mode}, T={sizes.latency_steps}", round(row[key], 2), "ms/image",
                                  f"<= {LATENCY_GOAL_MS:g}", suite.goal_met(row[key], LATENCY_GOAL_MS, at_most=True)))
    return {"figures": figures, "details": details, "errors": errors}


# --- 3. sampling -------------------------------------------------------------------------------------
def sampling_throughput(suite: Suite) -> dict:
    model, config = paper_model(suite)
    sizes, figures, details, errors = suite.sizes, [], {}, {}
    precision = bf16_or_fp32(suite.device)
    details["precision"] = precision

    def rate() -> dict:
        context = torch.autocast(suite.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        return sampling.measure(model, config, sizes.sampling_batch, sizes.sampling_steps, sizes.sampling_repeats,
                                suite.device, context)

    def compiled_rate() -> dict:
        model.compile_sampling(suite.device)
        try:
            return rate()
        finally:
            model.compiled_step = None

    for mode, measure in (("eager", rate), ("--compile", compiled_rate)):
        row = attempt(errors, mode, measure)
        if row is not None:
            details[mode] = row
            figures.append(figure(f"{precision} {mode}, T={sizes.sampling_steps}, batch {sizes.sampling_batch}",
                                  round(row["images_per_s"], 1), "images/s", f">= {SAMPLING_GOAL:g}",
                                  suite.goal_met(row["images_per_s"], SAMPLING_GOAL)))
    return {"figures": figures, "details": details, "errors": errors}


# --- 4. training -------------------------------------------------------------------------------------
def engine_rate(overrides: dict, batch_size: int, repeats: int, deepspeed: bool = False, parts: bool = True) -> dict:
    """Images/s of the trainer's own step (TrainStep through the Accelerator, then the EMA update, in the
    joint phase) at the paper config in bf16, on every process of this launch; with `parts`, also the DCG's
    share of a step, from the parts timed alone (train_step.parts) on this process."""
    settings = [f"{key}={value}" for key, value in overrides.items()]
    settings += [f"train.batch_size={batch_size}", "train.grad_accum=1", "train.mixed_precision=bf16"]
    settings += ["train.distributed=deepspeed"] if deepspeed else []
    config = load_config(PAPER_CONFIG, settings)
    accelerator = training_accelerator(config.train)
    torch.manual_seed(0)
    model = build_model(without_pretrained(config))
    model.check_values = accelerator.device.type == "cpu"  # as the trainer: value checks would sync a GPU
    model, optimizer = accelerator.prepare(model, build_optimizer(model, config.train))
    module = accelerator.unwrap_model(model)
    ema = ExponentialMovingAverage(module.denoiser, config.train.ema_rate)
    step = TrainStep(accelerator, model, module, optimizer, config.train)
    batch = synthetic_batch(batch_size, config.data.image_size, config.data.num_classes, accelerator.device)

    def one_step() -> None:
        step(batch, True, 1.0)
        ema.update(module.denoiser)

    seconds = train_step.seconds(one_step, repeats)
    precision = training_precision(accelerator)
    result = {"images_per_s": batch_size * accelerator.num_processes / seconds, "seconds_per_step": seconds,
              "processes": accelerator.num_processes, "distributed": accelerator.distributed_type.value,
              "precision": precision, "batch_per_process": batch_size}
    if parts:  # backward passes outside the engine: harmless to DDP between steps, not to ZeRO's hooks
        context = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        result["parts_s"] = train_step.parts(module, batch, repeats, context)
        result["dcg_share"] = result["parts_s"]["DCG (priors + CE update)"] / sum(result["parts_s"].values())
    accelerator.end_training()
    return result


@contextmanager
def one_process_group():
    """A process group of one (what `accelerate launch` sets for each process), so that Accelerate wraps
    the model in DDP on a single device, as a multi-GPU run does; the environment is restored after."""
    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in previous.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def training_throughput(suite: Suite) -> dict:
    sizes = suite.sizes
    with one_process_group():
        row = engine_rate(sizes.overrides, sizes.train_batch, sizes.train_repeats)
    name = f"{row['precision']} {row['distributed']} x{row['processes']}, batch {sizes.train_batch}"
    return {"figures": [figure(name, round(row["images_per_s"], 1), "images/s", f">= {TRAINING_GOAL:g}",
                               suite.goal_met(row["images_per_s"], TRAINING_GOAL)),
                        figure("DCG share of a step", round(100 * row["dcg_share"], 1), "%")],
            "details": row}


# --- 5. loader ---------------------------------------------------------------------------------------
def loader_throughput(suite: Suite) -> dict:
    sizes = suite.sizes
    workers = max(1, available_cpus() - 2)  # two cores stay with the training process
    image_size = load_config(PAPER_CONFIG, [f"{k}={v}" for k, v in sizes.overrides.items()]).data.image_size
    with tempfile.TemporaryDirectory(prefix="diffmic-gpu-suite-") as folder:
        sharded = loader_benchmark.make_shards(Path(folder), "ham10000-like", sizes.loader_images, *sizes.loader_photo,
                                               ".jpg", workers, size=image_size)
        data = loader_benchmark.training_data("ham10000-like", workers, image_size)
        rate = loader_benchmark.shard_images_per_second(sharded.manifest.folder, data, sizes.train_batch,
                                                        sizes.loader_seconds)
    figures = [figure(f"shard loader, {workers} workers, {image_size} px", round(rate, 1), "images/s")]
    step_rate = (suite.results.get("training") or {}).get("details", {}).get("images_per_s")
    if step_rate:
        ratio = rate / step_rate
        figures.append(figure("loader / training step rate", round(ratio, 2), "x", ">= 1 (keeps up)",
                              ratio >= 1 if suite.on_gpu else None))
    return {"figures": figures, "details": {"workers": workers, "images": sizes.loader_images,
                                            "training_images_per_s": step_rate}}


# --- 6. the 24 GB question ---------------------------------------------------------------------------
def peaks_and_largest(training, sizes: Sizes, device: torch.device, bf16: bool) -> dict:
    """The peak at each of the chosen batches and the largest batch that trains (None: out of memory)."""
    def peak(batch: int) -> float | None:
        return memory.peak_gib(training, batch, device, bf16)

    peaks = {batch: peak(batch) for batch in sizes.memory_batches}
    fitting = [batch for batch, gib in peaks.items() if gib is not None]
    largest = memory.largest_training_batch(lambda batch: peak(batch) is not None, max(fitting, default=0),
                                            list(sizes.memory_search))
    return {"peaks_gib": peaks, "largest": largest}


def measured_under_cap(suite: Suite) -> dict:
    """Peaks at the chosen batches and the largest batch that trains, per precision, with this process
    capped at the card's memory."""
    sizes, device = suite.sizes, suite.device
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory.CARD_GIB * memory.GIB / total), device)
    measured = {}
    try:
        for precision in ("bf16", "fp32"):
            measured[precision] = peaks_and_largest(memory.paper_training(device, sizes.overrides), sizes, device,
                                                    precision == "bf16")
            gc.collect()  # the model of this precision is gone before the next one is built
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return measured


def estimate_figures(estimate: dict) -> list[dict]:
    ceiling = memory.CARD_GIB - memory.ALLOWANCE_GIB
    figures = [figure(f"estimate {row['precision']} batch {row['batch']}", round(row["total"] / memory.GIB, 2), "GiB",
                      f"<= {ceiling:g}") for row in estimate["rows"]]
    return figures + [figure(f"estimate: largest {precision} batch", batch, "images")
                      for precision, batch in estimate["largest"].items()]


def measured_figures(measured: dict) -> list[dict]:
    figures = []
    for precision, row in measured.items():
        figures += [figure(f"measured {precision} batch {batch}", None if gib is None else round(gib, 2), "GiB",
                           f"<= {memory.CARD_GIB:g}", gib is not None) for batch, gib in row["peaks_gib"].items()]
        figures.append(figure(f"measured: largest {precision} batch under the cap", row["largest"], "images"))
    return figures


def recipe(largest: dict[str, int]) -> dict:
    """train.batch_size x train.grad_accum per global batch and precision, the micro-batch as large as fits."""
    return {target: {precision: memory.split_for_card(target, fitting) for precision, fitting in largest.items()}
            for target in GLOBAL_BATCHES}


def memory_question(suite: Suite) -> dict:
    estimate = memory.estimate(suite.device, list(suite.sizes.memory_batches), suite.sizes.overrides)
    details = {"estimate": estimate, "cap": "skipped: the per-process memory cap exists only on CUDA",
               "recipe_from": "the estimate"}
    figures, largest = estimate_figures(estimate), dict(estimate["largest"])
    if suite.on_gpu:
        details["cap"] = f"{memory.CARD_GIB:g} GiB (torch.cuda.set_per_process_memory_fraction)"
        details["measured"] = measured_under_cap(suite)
        details["recipe_from"] = "measured under the cap"
        figures += measured_figures(details["measured"])
        largest = {precision: row["largest"] for precision, row in details["measured"].items()}
    plan = recipe(largest)
    details["recipe"] = {f"global batch {target}": {precision: {"train.batch_size": size, "train.grad_accum": accum}
                                                    for precision, (size, accum) in by_precision.items()}
                         for target, by_precision in plan.items()}
    # The config trains in bf16; fp32 is the fallback of a card or user without it.
    figures += [figure(f"3090 recipe, global batch {target}, {precision}: train.batch_size", size,
                       f"images x grad_accum {accum}") for target, by_precision in plan.items()
                for precision, (size, accum) in by_precision.items()]
    return {"figures": figures, "details": details}


# --- 7. several GPUs ---------------------------------------------------------------------------------
def launched_rate(processes: int, sizes: Sizes, smoke: bool, deepspeed: bool, cpu: bool = False) -> dict:
    """engine_rate in `processes` processes started by `accelerate launch` as the README's DDP and ZeRO-2
    commands start them (NCCL on GPUs, gloo on CPUs)."""
    with tempfile.TemporaryDirectory(prefix="diffmic-gpu-suite-") as folder:
        report = Path(folder) / "rate.json"
        engine = ["--use_deepspeed", "--zero_stage", "2"] if deepspeed else ["--multi_gpu"]
        command = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), str(Path(__file__).resolve()),
                   "--train-worker", str(report)]
        command += (["--smoke"] if smoke else []) + (["--deepspeed"] if deepspeed else [])
        # On CPUs Accelerate needs its CPU flag for gloo processes, and DeepSpeed needs it off (it picks its
        # own CPU accelerator; the flag would turn DeepSpeed off).
        environment = dict(os.environ, ACCELERATE_USE_CPU="1") if cpu and not deepspeed else dict(os.environ)
        # Its own session, so that a timeout stops the workers the launcher started, not only the launcher.
        launch = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        try:
            _, errors = launch.communicate(timeout=sizes.worker_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.communicate()
            raise RuntimeError(f"{processes} processes still running after {sizes.worker_timeout_s} s: stopped") from None
        if launch.returncode != 0 or not report.is_file():
            raise RuntimeError(f"{processes} processes exited {launch.returncode}: {errors[-1500:]}")
        return json.loads(report.read_text())


def multi_gpu_scaling(suite: Suite, processes: int | None = None, cpu: bool = False) -> dict:
    processes = processes or (torch.cuda.device_count() if suite.on_gpu else 0)
    if processes < 2:
        raise Skipped(f"needs 2+ GPUs (found {processes})")
    errors, figures, details = {}, [], {}
    one = (suite.results.get("training") or {}).get("details", {}).get("images_per_s")
    for engine in ("ddp", "zero2"):
        row = attempt(errors, engine,
                      lambda: launched_rate(processes, suite.sizes, suite.smoke, engine == "zero2", cpu))
        if row is not None:
            details[engine] = row
            figures.append(figure(f"{engine} x{processes}, batch {row['batch_per_process']} per process",
                                  round(row["images_per_s"], 1), "images/s"))
    if "ddp" in details and one:
        figures.append(figure(f"DDP scaling efficiency 1 -> {processes}",
                              round(details["ddp"]["images_per_s"] / (processes * one), 3), "x"))
    if "ddp" in details and "zero2" in details:
        ratio = details["zero2"]["images_per_s"] / details["ddp"]["images_per_s"]
        figures.append(figure("ZeRO-2 / DDP", round(ratio, 3), "x"))
    return {"figures": figures, "details": details, "errors": errors}


STEPS = [("environment", environment, 10), ("latency", single_image_latency, 90),
         ("sampling", sampling_throughput, 60), ("training", training_throughput, 30),
         ("loader", loader_throughput, 30), ("memory", memory_question, 60), ("multi_gpu", multi_gpu_scaling, 100)]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_description()}"


def train_worker(args: argparse.Namespace) -> None:
    """One process of step 7, started by `accelerate launch`: the first writes the rate."""
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    row = engine_rate(sizes.overrides, sizes.train_batch, sizes.train_repeats, args.deepspeed, parts=False)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.train_worker).write_text(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_report.json and gpu_report.md")
    parser.add_argument("--smoke", action="store_true", help="every step at tiny sizes on the CPU")
    parser.add_argument("--only", default="", help=f"comma-separated steps of {', '.join(n for n, _, _ in STEPS)}")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)  # step 7's processes
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        return train_worker(args)
    if args.out is None:
        parser.error("--out is required")
    only = {name for name in args.only.split(",") if name}
    unknown = only - {name for name, _, _ in STEPS}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; the steps are {', '.join(n for n, _, _ in STEPS)}")
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA's first use: a smoke run is a CPU run, anywhere
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    suite = Suite(device, SMOKE_SIZES if args.smoke else GPU_SIZES, args.smoke)
    started = time.perf_counter()
    report = run_steps(STEPS, suite, args.out, header(device_name(device), args.smoke), only)
    failed = [name for name, entry in report["steps"].items() if "error" in entry]
    print(as_markdown(report))
    print(f"{time.perf_counter() - started:.0f} s; report in {args.out}" + (f"; failed: {failed}" if failed else ""))


if __name__ == "__main__":
    main()
