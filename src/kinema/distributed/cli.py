"""CLI pieces for scale-out: ``kinema generate --devices N`` (and under torchrun), and
``kinema batch``. :mod:`kinema.cli` wires them in; this module holds no argument logic of the
single-process path."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_generate_options(p: argparse.ArgumentParser) -> None:
    """The multi-process options of ``kinema generate``."""
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs) for one video")
    p.add_argument("--parallel", default="auto", help="auto, ulysses or ring (with --devices)")
    p.add_argument(
        "--no-cfg-parallel", dest="cfg_parallel", action="store_false",
        help="do not split the guidance branches over two halves of the devices",
    )  # fmt: skip
    p.add_argument("--decode-tile", type=int, default=None, help="split the VAE decode by tiles")


def guided(args: argparse.Namespace) -> bool:
    """Whether the request uses classifier-free guidance (guidance > 1, the given one or the
    model's): without it there is no second branch for CFG-parallel to give half the ranks."""
    from kinema.configs import SamplingDefaults
    from kinema.loading import folder_defaults

    given = getattr(args, "guidance", None)
    if given is None:
        given = (folder_defaults(args.model) or SamplingDefaults()).guidance
    return given > 1


def world_size() -> int:
    """Processes of the torchrun job this process belongs to (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed_generate(args: argparse.Namespace) -> int | None:
    """Handle ``kinema generate`` when it is multi-process; ``None`` means: run it normally.

    Under torchrun (WORLD_SIZE > 1) every rank runs the parallel pipeline and rank 0 writes;
    outside it, ``--devices N > 1`` re-launches this command under torchrun with N processes.
    """
    devices = getattr(args, "devices", 1)
    if devices < 1:
        raise ValueError(f"--devices {devices} must be >= 1")
    tile = getattr(args, "decode_tile", None)
    if tile is not None and devices == 1 and world_size() == 1:
        raise ValueError("--decode-tile shares the VAE decode's tiles across --devices; one "
                         "process tiles on its own where a decode would not fit")  # fmt: skip
    if tile is not None and (tile < 64 or tile % 32):
        raise ValueError(f"--decode-tile {tile} must be a multiple of 32 pixels, at least 64 "
                         "(tiles overlap by a quarter, a multiple of the VAE's 8)")  # fmt: skip
    if world_size() > 1:
        return run_parallel_generate(args)
    if devices > 1:
        return launch_torchrun(devices, list(getattr(args, "argv", None) or sys.argv[1:]))
    return None


def launch_torchrun(devices: int, argv: list[str]) -> int:
    """Run ``python -m kinema ARGV`` as ``devices`` processes, as ``torchrun --standalone``
    does, and return the exit code: a rank's bad input (exit 2, one line from rank 0) is exit
    2 here too, without the launcher's log and traceback; any other failure 1."""
    import logging
    import uuid

    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from kinema.cli import EXIT_BAD_INPUT

    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise ValueError(f"--devices {devices} > {torch.cuda.device_count()} visible GPUs")
    cores = os.cpu_count() or 1
    if not torch.cuda.is_available() and devices > cores:
        raise ValueError(f"--devices {devices} > {cores} CPU cores here (no CUDA GPU)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // devices)))  # the ranks'
    for name in list(logging.root.manager.loggerDict):  # the launcher's log: not the user's
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
    )  # fmt: skip
    try:
        elastic_launch(config, sys.executable)("-m", "kinema", *argv)
    except SignalException:  # Ctrl-C (or a kill): passed on to the ranks, rank 0 says so
        return 130
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        return EXIT_BAD_INPUT if EXIT_BAD_INPUT in codes else 1
    return 0


def check_one_process_options(args: argparse.Namespace) -> None:
    """Refuse the options that work in one process only, with --devices N (checked before
    the launch too: a rank failing first could have its partner killed before it said why)."""
    if getattr(args, "lora", None):
        raise ValueError("--lora runs in one process; leave out --devices")
    if getattr(args, "offload", "none") != "none":
        raise ValueError("--offload works in one process; drop --devices or --offload")
    if getattr(args, "compile", False):
        raise ValueError("--compile works in one process; drop --devices or --compile")


def run_parallel_generate(args: argparse.Namespace) -> int:
    """One rank of a torchrun ``kinema generate``: rank 0 shows progress and writes the file."""
    import torch.distributed as dist

    from kinema.cli import default_output, from_output_check, progress_bar, request_from_args
    from kinema.distributed.generate import generate, load_parallel

    from_output_check(args.output)
    check_one_process_options(args)
    tile = None
    if getattr(args, "decode_tile", None):
        from kinema.models.vae import TileSpec

        tile = TileSpec(args.decode_tile, args.decode_tile // 4)
    pipe, mesh = load_parallel(args.model, mode=getattr(args, "parallel", "auto"),
                               cfg_parallel=getattr(args, "cfg_parallel", True)
                               and guided(args), dtype=args.dtype, decode_tile=tile)  # fmt: skip
    request = request_from_args(args, pipe)
    out = args.output or default_output(args.prompt, args.seed)
    with progress_bar(args.quiet or mesh.rank != 0) as progress:
        saved = generate(pipe, mesh, request, out, progress)
    if mesh.rank == 0:
        total = saved.info["timings"]["total"]
        c = mesh.config
        print(f"wrote {out} ({saved.frames} frames, {total:.1f} s, {c.world} processes: cfg "
              f"{c.cfg} x ulysses {c.ulysses} x ring {c.ring})", file=sys.stderr)  # fmt: skip
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# kinema batch
# ---------------------------------------------------------------------------------------------


def add_batch(subparsers: Any) -> None:
    """``kinema batch REQUESTS.jsonl --out DIR [--ray [ADDRESS]]``."""
    p = subparsers.add_parser("batch", help="run a file of requests (JSON lines), resumably")
    p.add_argument("requests", nargs="?", default=None,
                   help="JSON lines file: one request per line (API fields)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (finished outputs are skipped)")
    p.add_argument("--model", default=None, help="model folder or name (default: kinema-tiny)")
    p.add_argument("--format", default="mp4", help="output format: mp4, gif or webp")
    p.add_argument("--device", default=None, help="local run: cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: per device)")
    p.add_argument(
        "--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
        help="spread over a Ray cluster (default address: auto; 'local' starts one)",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: GPUs or CPUs)")
    p.add_argument(
        "--compile", action="store_true",
        help="fused QKV + torch.compile per DiT block in every worker (the same videos)",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    """Run the batch; exit code 0 when every request finished, 1 when some failed."""
    from pathlib import Path

    from kinema.batch import BatchOptions, run

    if args.requests is None and args.ray is not None and Path(args.ray).is_file():
        args.requests, args.ray = args.ray, "auto"  # `--ray requests.jsonl`: --ray took it
    if args.requests is None:
        raise ValueError("give the requests file: kinema batch REQUESTS.jsonl --out DIR")
    options = BatchOptions(model=args.model, device=args.device, dtype=args.dtype,
                           format=args.format, ray=args.ray, workers=args.workers,
                           compile=args.compile)  # fmt: skip
    summary = run(args.requests, args.out, options, show_progress=not args.quiet)
    print(summary.line(), file=sys.stderr)
    return 0 if summary.failed == 0 else 1
