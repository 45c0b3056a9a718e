"""The ``kinema`` command: arguments -> request -> pipeline; nothing else.

Bad input of any kind ends with one line on stderr (``kinema: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kinema import timeline
from kinema.errors import TrainingStopped
from kinema.memory import keep_freed_memory

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)


# A full, read-only or failing disk met while writing an output, checkpoint or cache.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def first_line(err: Exception) -> str:
    """The line a user needs: the message's first, or for an error raised in a DataLoader
    worker (re-raised as "Caught ValueError in DataLoader worker process 0. Original
    Traceback ...") the original error's own line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and "Original Traceback" in str(err):
        return lines[-1].removeprefix(f"{type(err).__name__}: ")
    return lines[0]


def fail(message: str) -> NoReturn:
    print(f"kinema: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' -> (832, 480)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 832x480")
    return int(m.group(1)), int(m.group(2))


def parse_fps(text: str) -> int | float:
    """'16' -> 16, '23.976' -> 23.976: frames per second (its range is checked with the
    request's other values)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"fps {text!r} must be a number >= 1, e.g. 16 or 23.976")
    return int(value) if value.is_integer() else value


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="make a video from a text prompt")
    p.add_argument("prompt", help="what the video shows")
    p.add_argument("-o", "--output", default=None, help="output file: .mp4 .gif .webp or "
                   "folder/ (default: outputs/<prompt words>-<seed>.mp4)")  # fmt: skip
    p.add_argument("--model", default=None, help="model folder or name (default: kinema-tiny)")
    p.add_argument("--negative", default=None, help="negative prompt (used when guidance > 1)")
    add_shape_args(p)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (>= 1)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (>= 0)")
    p.add_argument("--shift", type=float, default=None, help="flow-matching schedule shift (> 0)")
    p.add_argument("--sampler", default=None, help="unipc or euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=None, help="start the clip from this image")
    p.add_argument("--last-image", default=None, help="end on this image (first-last-frame)")
    p.add_argument("--video", default=None, help="restyle this video (video-to-video)")
    p.add_argument("--strength", type=float, default=None, help="video-to-video noise, (0, 1]")
    p.add_argument("--cache", type=float, default=None, help="step-cache threshold, e.g. 0.2")
    p.add_argument(
        "--at", action="append", type=parse_timed, default=[], metavar="SECONDS:PROMPT",
        help="switch to PROMPT at SECONDS (repeatable)",
    )  # fmt: skip
    add_switch_arg(p)
    add_device_args(p)
    add_lora_arg(p)
    from kinema.distributed.cli import add_generate_options

    add_generate_options(p)
    p.set_defaults(run=run_generate)


def add_device_args(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    """--device, --dtype, --offload and --compile (and -q unless ``quiet`` is False)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: per device)")
    p.add_argument(
        "--offload", default="none", metavar="none|model|block",
        help="keep weights on the CPU, each part (model) or DiT block (block) on the device "
        "only while it works: for GPUs too small for the model",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the DiT's blocks: same video, faster steps after a warm-up of "
        "seconds (worth it for long or many clips)",
    )  # fmt: skip
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora", action="append", default=[], type=parse_lora, metavar="PATH[:STRENGTH]",
        help="merge a LoRA file (kinema, diffusers/PEFT or Wan layout) into the DiT; "
        "repeatable; strength 1 by default",
    )  # fmt: skip


def parse_lora(text: str) -> tuple[str, float]:
    """``--lora`` 'PATH[:STRENGTH]' -> (path, strength) (:func:`kinema.lora.parse_lora_arg`)."""
    from kinema.lora import parse_lora_arg

    try:
        return parse_lora_arg(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_switch_arg(p: argparse.ArgumentParser) -> None:
    from kinema.timeline import SWITCH_MODES

    p.add_argument(
        "--switch", choices=SWITCH_MODES, default="blend",
        help="how --at switches: blend (per frame, default) or cut (a window ends at the switch)",
    )  # fmt: skip
    p.add_argument(
        "--contrast", type=float, default=None,
        help="blend: guidance away from the neighbouring prompt (>= 0; 0 off; default 1)",
    )  # fmt: skip


def parse_timed(text: str) -> tuple[float, str]:
    """``--at`` 'SECONDS:PROMPT' -> (seconds, prompt) (:func:`kinema.timeline.parse_timed`)."""
    from kinema.timeline import parse_timed as parse

    try:  # argparse says "argument --at:" before it
        return parse(text, "")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).lstrip()) from err


def default_output(prompt: str, seed: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "video"
    return Path("outputs") / f"{slug}-{seed}.mp4"


def run_generate(args: argparse.Namespace) -> int:
    from kinema.distributed.cli import check_one_process_options, distributed_generate
    from kinema.loading import load

    if args.devices > 1:  # before any process is launched
        check_one_process_options(args)
    if (code := distributed_generate(args)) is not None:
        return code
    from_output_check(args.output)
    pipe = load(
        args.model, device=args.device, dtype=args.dtype, offload=args.offload,
        compile=args.compile, lora=args.lora,
    )  # fmt: skip
    request = request_from_args(args, pipe)
    return finish(pipe, request, args.output or default_output(args.prompt, args.seed), args)


def request_from_args(args: argparse.Namespace, pipe: Any) -> Any:
    """The :class:`~kinema.pipeline.Request` of ``kinema generate``'s arguments for ``pipe``
    (its defaults; a restyle's seconds are counted at its source's rate)."""
    from kinema.pipeline import Request

    fps = args.fps if args.fps is not None or args.video else pipe.defaults.fps  # 0: refused
    frames = args.frames
    if args.seconds is not None:  # (fps 0 is refused by the request, not divided by here)
        frames, _ = pipe.frames_for(args.seconds, args.fps or None, video=args.video)
    width, height = args.size or (None, None)
    return Request(
        prompt=args.prompt, negative_prompt=args.negative, width=width, height=height,
        frames=frames, fps=fps, steps=args.steps, guidance=args.guidance, shift=args.shift,
        sampler=args.sampler, seed=args.seed, prompts=tuple(args.at), switch=args.switch,
        contrast=args.contrast,
        image=args.image, last_image=args.last_image, video=args.video, strength=args.strength,
        cache=args.cache,
    )  # fmt: skip


def finish(pipe: Any, request: Any, output: str | Path, args: argparse.Namespace) -> int:
    """Run a request with a progress bar, writing the video (+ sidecar) as it is made: a long
    one is never whole in memory (:meth:`kinema.pipeline.Pipeline.save`)."""
    with progress_bar(args.quiet) as progress:
        saved = pipe.save(request, output, progress=progress)
    total = saved.info["timings"]["total"]
    frames = f"{saved.frames} frame{'s' * (saved.frames != 1)}"
    print(f"wrote {saved.path} ({frames}, {total:.1f} s)", file=sys.stderr)
    return 0


def from_output_check(output: str | None) -> None:
    """Refuse, before any work is done, an output extension we cannot write, a path that
    could not be written, and a folder of other files that PNG frames would replace."""
    from kinema.io.paths import check_frame_folder, check_output_name, check_writable, names_folder
    from kinema.io.video import check_sidecar

    if output is None:
        return
    check_output_name(output)
    check_writable(output)
    check_sidecar(output)
    if names_folder(output):  # frames: "v1.5/" is a folder, its ".5" no extension
        check_frame_folder(output)
        return
    suffix = Path(output).suffix.lower()
    if suffix and suffix not in (".mp4", ".gif", ".webp"):
        raise ValueError(
            f"output {output!r}: unknown extension {suffix!r}; valid: .mp4 .gif .webp or a folder/"
        )


class progress_bar:
    """A tqdm bar with ETA on stderr, as a ``progress(step, total)`` callback. At its total
    it says ``then`` (what still runs after the last step: the last decode and write) until
    the block ends."""

    def __init__(
        self, quiet: bool, desc: str = "denoise", unit: str = "step", then: str = "decoding"
    ) -> None:
        self.quiet, self.bar = quiet, None
        self.desc, self.unit, self.then = desc, unit, then

    def __enter__(self) -> Callable[[int, int], None] | None:
        self.entered = time.time()
        return None if self.quiet else self.update

    def update(self, step: int, total: int) -> None:
        if self.bar is None:  # made at the first step's end, when the total is known
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr)
            self.bar.start_t = self.bar.last_print_t = self.entered  # that step took time
        self.bar.update(step - self.bar.n)
        if step >= total and self.then:
            self.bar.set_postfix_str(self.then)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.close()


def add_extend(sub: Any) -> None:
    p = sub.add_parser("extend", help="continue a video by some seconds under a prompt")
    p.add_argument("video", help="the clip to continue")
    p.add_argument("--prompt", required=True, help="what happens next")
    p.add_argument("--seconds", type=float, required=True, help="seconds to add")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--negative", default=None)
    p.add_argument("--fps", type=parse_fps, default=None, help="default: the source's")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--at", action="append", type=parse_timed, default=[], metavar="SECONDS:PROMPT",
        help="switch to PROMPT at SECONDS after the start of the continuation",
    )  # fmt: skip
    add_switch_arg(p)
    add_device_args(p)
    add_lora_arg(p)
    p.set_defaults(run=run_extend)


def run_extend(args: argparse.Namespace) -> int:
    from kinema.loading import load
    from kinema.media import check_source, source_fps
    from kinema.pipeline import MEDIA_NAMES, Request

    from_output_check(args.output)
    check_source(args.video, MEDIA_NAMES["extend"])  # before the model loads
    pipe = load(
        args.model, device=args.device, dtype=args.dtype, offload=args.offload,
        compile=args.compile, lora=args.lora,
    )  # fmt: skip
    fps = args.fps if args.fps is not None else source_fps(args.video, pipe.defaults.fps)
    t = pipe.temporal_factor
    frames = timeline.new_frames(args.seconds, fps, t)
    request = Request(
        prompt=args.prompt, negative_prompt=args.negative, frames=frames, fps=fps,
        steps=args.steps, guidance=args.guidance, seed=args.seed, prompts=tuple(args.at),
        switch=args.switch, contrast=args.contrast, extend=args.video,
    )  # fmt: skip
    return finish(pipe, request, args.output, args)


# ---------------------------------------------------------------------------------------------
# info / convert
# ---------------------------------------------------------------------------------------------


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """--size, --frames or --seconds, --fps: a clip's shape (generate and info)."""
    p.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT, e.g. 128x128")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, default=None, help="frame count, 4k+1")
    length.add_argument("--seconds", type=float, default=None, help="duration in seconds")
    p.add_argument("--fps", type=parse_fps, default=None, help="frames per second, e.g. 16")


def add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="config, parameters and peak-memory estimate of a model")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: kinema-tiny)")
    add_shape_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> int:
    import dataclasses

    from kinema.loading import load
    from kinema.memory import (
        decode_tile,
        estimate_peak_bytes,
        free_bytes,
        process_bytes,
        vae_decode_bytes,
        work_bytes,
    )
    from kinema.pipeline import check_shape

    if args.fps is not None and not args.fps >= 1:  # checked with or without --seconds
        raise ValueError(f"fps {args.fps} must be >= 1")
    pipe = load(args.model, device="cpu", dtype="fp32")
    width, height = args.size or (pipe.defaults.width, pipe.defaults.height)
    frames = pipe.defaults.frames if args.frames is None else args.frames
    if args.seconds is not None:
        fps = pipe.defaults.fps if args.fps is None else args.fps
        frames = timeline.clip_frames(args.seconds, fps, pipe.temporal_factor)
    check_shape(width, height, frames, pipe.spatial_factor, pipe.temporal_factor)
    free, window = free_bytes("cpu"), min(frames, pipe.window_frames)  # decoded window by window
    v = pipe.vae.config  # fp32, as the pipeline decodes on a CPU: an fp16 cache
    info = {
        "name": pipe.name,
        "transformer": dataclasses.asdict(pipe.dit.config),
        "vae": {k: v for k, v in dataclasses.asdict(pipe.vae.config).items() if "latents" not in k},
        "parameters": {
            "transformer": sum(p.numel() for p in pipe.dit.parameters()),
            "vae": sum(p.numel() for p in pipe.vae.parameters()),
        },
        "defaults": dataclasses.asdict(pipe.defaults),
        "vocabulary": sorted(pipe.vocabulary) if pipe.vocabulary else None,  # None: open
        "request": {"width": width, "height": height, "frames": frames, "window_frames": window},
        "peak_memory_bytes": {  # on a GPU in each dtype, and on a CPU
            key: estimate_peak_bytes(pipe, width, height, frames, dtype_bytes=n, device=device)
            for key, n, device in (("fp32", 4, "cuda"), ("bf16", 2, "cuda"), ("cpu_fp32", 4, "cpu"))
        },
        # the whole process on this CPU: what it holds now, model loaded, plus the request
        "cpu_process_bytes": None
        if (now := process_bytes()) is None
        else now + work_bytes(pipe, width, height, frames, 4, "cpu"),
        "decode": {  # on this machine's CPU: untiled, or the tile the pipeline would take
            "untiled_bytes": vae_decode_bytes(v, width, height, window, cache_nbytes=2),
            "cpu_free_bytes": free,
            "cpu_tile": None if free is None else decode_tile(v, width, height, window, free, 2),
        },
    }
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def format_info(info: dict[str, Any]) -> str:
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    params = info["parameters"]
    req = info["request"]
    windowed = (
        f", made {req['window_frames']} at a time" if req["window_frames"] < req["frames"] else ""
    )
    lines = [
        f"model       {info['name']}",
        f"transformer {params['transformer'] / 1e6:.1f} M parameters, "
        f"{info['transformer']['num_layers']} layers, dim "
        f"{info['transformer']['num_heads'] * info['transformer']['head_dim']}",
        f"vae         {params['vae'] / 1e6:.1f} M parameters, z_dim {info['vae']['z_dim']}",
        f"defaults    {info['defaults']}",
        f"request     {req['width']}x{req['height']}, {req['frames']} frames{windowed}",
    ]
    where = {"fp32": "GPU fp32", "bf16": "GPU bf16", "cpu_fp32": "CPU fp32"}
    lines += [f"peak memory {where[k]}: ~{gib(v)}" for k, v in info["peak_memory_bytes"].items()]
    if info["cpu_process_bytes"] is not None:  # the above is the model's; this, all of it
        lines[-1] += f" (the whole process: ~{gib(info['cpu_process_bytes'])})"
    dec = info["decode"]
    if dec["cpu_free_bytes"] is not None:
        how = f"in {dec['cpu_tile']} px tiles" if dec["cpu_tile"] else "untiled"
        lines.append(f"vae decode  ~{gib(dec['untiled_bytes'])} untiled; this CPU has "
                     f"{gib(dec['cpu_free_bytes'])} free: {how}")  # fmt: skip
    if info["vocabulary"]:  # a model of a closed world reads only its training words
        lines.append(f"vocabulary  {' '.join(info['vocabulary'])}")
    return "\n".join(lines)


CALIBRATION_PROMPT = "a red circle moving right on a navy background"


def add_calibrate_cache(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate-cache", help="fit the step cache (--cache) to a model; saved in its folder"
    )
    p.add_argument("model", nargs="?", default=None, help="model folder (default: kinema-tiny)")
    p.add_argument("--prompt", default=CALIBRATION_PROMPT, help="prompt of the uncached run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="default (and what calibrates best): the model's; at least 4")  # fmt: skip
    p.add_argument("--device", default=None)
    p.set_defaults(run=run_calibrate_cache)


def run_calibrate_cache(args: argparse.Namespace) -> int:
    from kinema.loading import BUILTIN, load, resolve_model_path
    from kinema.sampling.cache import CALIBRATION_FILE, MIN_CALIBRATION_STEPS

    folder = resolve_model_path(args.model)
    if args.steps is not None and args.steps < MIN_CALIBRATION_STEPS:
        fail(f"--steps {args.steps}: calibration needs at least {MIN_CALIBRATION_STEPS} steps")
    if folder.resolve() == resolve_model_path(BUILTIN).resolve():  # however it is spelled
        fail(
            f"{BUILTIN} ships its calibration inside the installed package; to fit one of "
            f"your own, copy the model (kinema convert {BUILTIN} DIR), calibrate DIR"
        )
    if not os.access(folder, os.W_OK):
        fail(f"model folder {folder} is not writable: the calibration is saved there")
    pipe = load(folder, device=args.device)
    if args.steps is None and pipe.defaults.steps < MIN_CALIBRATION_STEPS:
        fail(
            f"this model samples in {pipe.defaults.steps} steps by default; calibration needs "
            f"at least {MIN_CALIBRATION_STEPS}: give --steps {MIN_CALIBRATION_STEPS} or more"
        )
    if args.steps is not None and args.steps < pipe.defaults.steps:
        warnings.warn(f"calibrating at {args.steps} steps, fewer than the model's "
                      f"{pipe.defaults.steps}: a request with more steps reads the calibration "
                      "between its few timesteps, and the cache follows the uncached video less "
                      "closely", stacklevel=1)  # fmt: skip
    calibration = pipe.calibrate_cache(args.prompt, seed=args.seed, steps=args.steps)
    calibration.save(folder / CALIBRATION_FILE)
    print(f"wrote {folder / CALIBRATION_FILE}: {calibration.summary()}", file=sys.stderr)
    return 0


def add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="write a model (kinema, diffusers or original Wan) in "
                       "kinema format, e.g. in another dtype")  # fmt: skip
    p.add_argument("source", help="model folder or name (kinema-tiny)")
    p.add_argument("dest", help="new folder (or an earlier conversion's, replaced)")
    p.add_argument("--dtype", default=None, help="store weights as fp32, bf16 or fp16")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from kinema.convert import convert

    out = convert(args.source, args.dest, dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="side-by-side speed/memory benchmark against diffusers")
    from kinema.bench import add_arguments

    add_arguments(p)
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from kinema.bench import run_cli

    return run_cli(args)


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="judge prompt adherence on held-out synthetic prompts")
    p.add_argument("--model", default=None, help="model folder (default: kinema-tiny)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--cache", type=float, default=None, help="step cache; default: the model's")
    p.add_argument("--quick", action="store_true", help="5 prompts per set instead of 10")
    p.add_argument(
        "--prompts", type=int, default=None,
        help="prompts per set (default 10); the held-out set has 59 at most: 59 judges all",
    )  # fmt: skip
    p.add_argument(
        "--beyond", action="store_true",
        help="also image-to-video, extension seams, long-video memory and timed prompts",
    )  # fmt: skip
    p.add_argument("--out", default="outputs/eval.json", help="JSON results")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: per device)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every verdict")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_lora_arg(p)
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from kinema.eval.run import evaluate, prompts_per_set, table, write_json
    from kinema.io.paths import check_writable
    from kinema.loading import load

    if args.seeds < 1:
        raise ValueError(f"seeds {args.seeds} must be >= 1")
    if Path(args.out).expanduser().is_dir():
        raise ValueError(
            f"--out {args.out} is a folder; give a file path, e.g. {args.out}/eval.json"
        )
    check_writable(args.out, "--out")
    prompts_per_set(args.prompts)  # bad input fails before the model loads
    pipe = load(args.model, device=args.device, dtype=args.dtype, lora=args.lora)
    given = {"steps": args.steps, "guidance": args.guidance, "cache": args.cache}
    # every clip of the eval, --beyond's too, samples with what was given
    pipe.defaults = dataclasses.replace(
        pipe.defaults, **{k: v for k, v in given.items() if v is not None}
    )
    log = (lambda line: print(line, file=sys.stderr)) if args.verbose else (lambda line: None)
    with progress_bar(args.quiet or args.verbose, "eval", "clip", then="") as progress:
        results = evaluate(pipe, seeds=args.seeds, quick=args.quick, log=log,
                           prompts=args.prompts, progress=progress)  # fmt: skip
    print(table(results))
    if args.beyond:
        from kinema.eval import beyond

        say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        results["beyond"] = beyond.evaluate_beyond(pipe, args.model, quick=args.quick, log=say)
        print("\n" + beyond.table(results["beyond"]))
    print(f"wrote {write_json(results, args.out)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train or fine-tune the DiT from a YAML/JSON config")
    p.add_argument("config", help="a TrainConfig file (see configs/kinema-tiny-dit.yaml)")
    p.add_argument("--export", default=None, help="after training, write the model folder here")
    p.set_defaults(run=run_train)
    v = sub.add_parser("train-vae", help="train the causal VAE from a YAML/JSON config")
    v.add_argument("config", help="a VAETrainConfig file (see configs/kinema-tiny-vae.yaml)")
    v.set_defaults(run=run_train_vae)


def run_train(args: argparse.Namespace) -> int:
    from kinema.io.paths import MODEL_ENTRIES
    from kinema.train import export, load_train_config, train_dit
    from kinema.train.loop import check_run_folders

    config = load_train_config(args.config)
    if args.export:  # refused now, not after the training
        check_run_folders(config.out_dir, args.export, None if config.lora else MODEL_ENTRIES,
                          config.data)  # fmt: skip
    train_dit(config)  # exports to export_dir (or out_dir/model) as it ends
    if args.export and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0 only
        print(f"wrote {export(config.out_dir, args.export)}", file=sys.stderr)
    return 0


def run_train_vae(args: argparse.Namespace) -> int:
    from kinema.train import load_vae_train_config, train_vae

    print(f"wrote {train_vae(load_vae_train_config(args.config))}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> Parser:
    from kinema import __version__

    parser = Parser(prog="kinema", description="kinema: open video generation")
    parser.add_argument("--version", action="version", version=f"kinema {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    from kinema.distributed.cli import add_batch
    from kinema.serve.cli import add_serve

    adders = (
        add_generate, add_extend, add_info, add_convert, add_train, add_eval, add_bench,
        add_calibrate_cache, add_serve, add_batch,
    )  # fmt: skip
    for add in adders:
        add(sub)
    return parser


def show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """Warnings as one line, ``kinema: warning: ...`` (no file name or source line)."""
    print(f"kinema: warning: {message}", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM, raised where the process was, so that temporary files are removed on the way
    out as on Ctrl-C (the default action left a half-written ``.NAME.tmp.mp4``). A
    BaseException, as KeyboardInterrupt is: no ``except Exception`` takes it for a failure."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting: a second one changes nothing
    raise Terminated


# Commands that run models, whose process reuses freed host memory (memory.keep_freed_memory);
# bench measures RSS and is left to glibc's defaults.
REUSE_MEMORY = {"generate", "extend", "eval", "train", "train-vae", "calibrate-cache", "serve",
                "batch", "convert"}  # fmt: skip


def writing(err: OSError, output: str | None) -> bool:
    """Whether ``err`` came from writing ``output``: the file, its hidden temporary file or
    folder beside it, or a frame in either (its folder removed or made unwritable mid-run; FFmpeg's
    errors name no file, so there: whether the output's folder is gone or unwritable)."""
    if not output:
        return False
    out = Path(output).expanduser().absolute()
    if not err.filename:  # FFmpeg's errors name no file: the output's folder is gone
        return not out.parent.is_dir() or not os.access(out.parent, os.W_OK)
    name = Path(os.fsdecode(err.filename)).expanduser().absolute()
    ours = lambda p: p == out or (p.parent == out.parent and p.name.startswith(f".{out.stem}."))
    return any(ours(p) for p in (name, *name.parents))  # a frame in it, in its temporary folder


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for --devices re-launch
    if argv is None and args.command in REUSE_MEMORY:  # the process's own command line, not a
        keep_freed_memory()  # caller's in-process call (tests): it sets glibc for the process
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # serve and
    try:  # train put their own in place while they run
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return args.run(args)
    except ValueError as err:  # bad input, incl. CheckpointError: one line, exit 2
        if int(os.environ.get("RANK", "0")) > 0:  # --devices N: rank 0 says it, once
            raise SystemExit(EXIT_BAD_INPUT) from None
        fail(first_line(err))
    except BrokenPipeError:  # `kinema info | head -1`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nor at exit's flush)
        return 141  # as a process killed by SIGPIPE, which a shell's pipefail reports
    except OSError as err:  # the disk, not the input: one line, exit 1
        named = (getattr(args, name, None) for name in ("output", "out", "dest"))
        output = next((path for path in named if path), None)  # -o, batch's --out, DEST
        if err.errno not in STORAGE_ERRORS and not writing(err, output):
            raise
        folder = Path(err.filename).parent if err.filename else None
        where = f" {output}" if output else f" in {folder}" if folder else ""
        print(f"kinema: error: cannot write{where}: {err.strerror}", file=sys.stderr)
        return 1
    except TrainingStopped as err:  # not the input: one line, exit 1
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"kinema: error: {err}", file=sys.stderr)
        return 1
    except Terminated:
        if int(os.environ.get("RANK", "0")) == 0:
            print("kinema: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # exiting: a second Ctrl-C changes nothing
        if int(os.environ.get("RANK", "0")) == 0:  # --devices N: rank 0 says it, once
            print("kinema: interrupted", file=sys.stderr)
        return 130
    finally:
        if before is not None:  # a caller's own (main() run in process, as tests do)
            signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    raise SystemExit(main())
