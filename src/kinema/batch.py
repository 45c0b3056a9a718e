"""``kinema batch``: many videos from a JSON-lines file, resumably, locally or over Ray.

Each line is one request with the API's fields (:class:`~kinema.pipeline.Request` fields, plus
``id``, ``size`` "WxH", ``seconds`` and ``at``: timed prompts as "SECONDS:PROMPT" strings, as
the HTTP API and the CLI's ``--at`` take them). Outputs go to ``OUT/ID.FORMAT`` with the
``OUT/ID.json`` sidecar written last, so a request is finished exactly when its sidecar exists:
a rerun skips it. A request that fails is recorded in ``OUT/ID.error.json`` (retried on the
next run) and the batch goes on; ``OUT/batch.log.jsonl`` gets one line per outcome.

Each video is written window by window as it is made (:meth:`~kinema.pipeline.Pipeline.save`).
With Ray, one :class:`Worker` actor per GPU (or per CPU on a CPU cluster) loads the model once
and encodes requests into a temporary file of its own, then sends the encoded bytes (not raw
frames); the driver alone writes outputs, so each is written once. An actor that dies is
restarted by Ray and its request is handed out again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinema import timeline
from kinema.io.paths import check_folder
from kinema.memory import check_fits, free_bytes
from kinema.pipeline import INTEGER_FIELDS, NUMBER_FIELDS, Request, SavedVideo

EXTRA_FIELDS = {"id", "size", "seconds", "model", "at", "input_reference"}  # the API's names
REQUEST_FIELDS = {f.name for f in dataclasses.fields(Request)}
FORMATS = ("mp4", "gif", "webp")
MAX_WORKER_DEATHS = 3  # a request whose worker died this often is recorded as failed
MAX_PROBES = 1500  # a dead actor not answering after this many tries (>= 5 min) is given up

OnResult = Callable[[str, str], None]  # (request id, "done" | "failed")


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs."""

    model: str | None = None  # model folder or name (None: the built-in kinema-tiny)
    device: str | None = None  # local runs only; Ray actors take their GPU or the CPU
    dtype: str | None = None  # fp32, bf16 or fp16 (None: the device's default)
    format: str = "mp4"  # output container: mp4, gif or webp
    ray: str | None = None  # Ray address ("auto", "local", "ray://host:port"); None: local
    workers: int | None = None  # Ray actors (None: one per GPU, else one per CPU)
    compile: bool = False  # fused QKV + torch.compile per DiT block in every worker

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers {self.workers} must be >= 1")
        if self.workers is not None and self.ray is None:
            raise ValueError(
                f"workers {self.workers}: workers are Ray actors; give ray too "
                "(--ray local starts Ray on this machine), or leave workers out"
            )
        if self.device is not None and self.ray is not None:
            raise ValueError(
                f"device {self.device!r} is for a local run; Ray actors take their own GPU "
                "(or the CPU): leave device out"
            )


@dataclass(frozen=True)
class Item:
    """One line of the requests file: its id, its JSON fields, or why it cannot run."""

    id: str
    fields: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True)
class Summary:
    """What a batch run did."""

    total: int
    skipped: int
    done: int
    failed: int

    def line(self) -> str:
        return (f"batch: {self.done} done, {self.skipped} already finished, "
                f"{self.failed} failed, of {self.total}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reading requests
# ---------------------------------------------------------------------------------------------


def parse_line(text: str, line_no: int) -> Item:
    """One JSON line -> :class:`Item` (with ``error`` set when the line is not a request)."""
    fallback, unread = f"{line_no:05d}", f"line{line_no:05d}"  # unread: no id to take
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        return Item(unread, {}, f"line {line_no}: not JSON ({err.msg})")
    if not isinstance(fields, dict):
        return Item(unread, {}, f"line {line_no}: expected a JSON object")
    rid = str(fields.get("id", fallback))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", rid):
        return Item(unread, fields, f"line {line_no}: id {rid!r} must match [A-Za-z0-9._-]+")
    if rid.endswith(".error"):
        return Item(unread, fields, f"line {line_no}: id {rid!r} ends with .error, the "
                    "suffix of the error records")  # fmt: skip
    unknown = sorted(set(fields) - REQUEST_FIELDS - EXTRA_FIELDS)
    if unknown:
        valid = ", ".join(sorted(REQUEST_FIELDS | EXTRA_FIELDS))
        return Item(rid, fields, f"unknown field(s) {unknown}; valid: {valid}")
    if not isinstance(fields.get("prompt"), str):
        return Item(rid, fields, "prompt (a string) is required")
    return Item(rid, fields)


def read_requests(path: str | Path) -> list[Item]:
    """Every non-blank line of a JSON-lines file; a repeated id makes the later one fail."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"requests file {str(path)!r} is a folder: give a JSON-lines file")
    if not path.is_file():
        raise ValueError(f"requests file {str(path)!r} not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM, as Notepad writes
    except UnicodeDecodeError as err:
        raise ValueError(f"requests file {str(path)!r} is not UTF-8 text ({err.reason})") from None
    items, seen = [], set()
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        item = parse_line(text, n)
        if item.id in seen:
            item = Item(f"{item.id}.line{n}", item.fields, f"duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if items and not any(i.fields for i in items):  # not one JSON object: not a requests file
        raise ValueError(f"requests file {str(path)!r} holds no JSON request (none of its "
                         f"{len(items)} lines is a JSON object); one request per line, e.g. "
                         '{"id": "a", "prompt": "a red ball"}')  # fmt: skip
    return items


NUMBER_TEXT_FIELDS = (*NUMBER_FIELDS, "cache", "contrast")


def seconds_of(value: Any) -> float:
    """``seconds`` as the API gives it ("2" or 2.5); ValueError naming it otherwise."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"seconds must be a number or a numeric string, got {value!r}")
    if isinstance(value, str) and not timeline.DECIMAL.fullmatch(value):
        raise ValueError(f"seconds {value!r} is not a number")
    return float(value)


def numbers_of(kw: dict[str, Any]) -> dict[str, Any]:
    """Numbers given as text, as the API (a form) takes them: "2" steps, "0.5" strength."""
    out = dict(kw)
    for name, value in kw.items():
        if not isinstance(value, str):
            continue
        numeric = name in INTEGER_FIELDS or name in NUMBER_TEXT_FIELDS
        if numeric and timeline.INTEGER.fullmatch(value):
            out[name] = int(value)
        elif name in NUMBER_TEXT_FIELDS and timeline.DECIMAL.fullmatch(value):
            out[name] = float(value)
    return out


def build_request(fields: dict[str, Any], pipe: Any) -> Request:
    """API fields -> :class:`Request` for ``pipe`` (``size`` and ``seconds`` resolved)."""
    from kinema.cli import parse_size

    kw = numbers_of({k: v for k, v in fields.items() if k in REQUEST_FIELDS})
    if "input_reference" in fields:  # the API's name of the start image (here: a path)
        if "image" in fields:
            raise ValueError("give image or input_reference, not both")
        kw["image"] = fields["input_reference"]
    if "size" in fields:
        try:
            kw["width"], kw["height"] = parse_size(str(fields["size"]))
        except argparse.ArgumentTypeError as err:
            raise ValueError(str(err)) from None
    if "seconds" in fields:
        if "frames" in fields:
            raise ValueError("give frames or seconds, not both")
        seconds = seconds_of(fields["seconds"])  # an extension's: new, at the source's rate
        kw["frames"], _ = pipe.frames_for(
            seconds, kw.get("fps"), kw.get("extend"), video=kw.get("video")
        )  # a restyle: its rate
    if "at" in fields:
        if "prompts" in fields:
            raise ValueError("give at or prompts, not both")
        at = fields["at"] if isinstance(fields["at"], list) else [fields["at"]]
        kw["prompts"] = [timeline.parse_timed(str(text)) for text in at]
    return Request(**kw)


# ---------------------------------------------------------------------------------------------
# Output folder: what is finished, recording outcomes
# ---------------------------------------------------------------------------------------------


def output_path(out: Path, rid: str, fmt: str) -> Path:
    return out / f"{rid}.{fmt}"


def is_finished(out: Path, item: Item, fmt: str) -> bool:
    """A request is finished when its video and its sidecar (written last) both exist, and the
    sidecar is of this request (a line edited, or a line-numbered one moved, is made again)."""
    sidecar = out / f"{item.id}.json"
    if not (output_path(out, item.id, fmt).exists() and sidecar.is_file()):
        return False
    made = read_json(sidecar).get("batch_request", item.fields)  # older sidecars: not kept
    return made == item.fields


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def foreign_output(out: Path, item: Item, fmt: str, logged: set[str]) -> str | None:
    """Why ``item`` may not write where it would: its video or sidecar name is taken by a
    file this batch folder's log never made (the user's own), else None."""
    if item.id in logged:
        return None
    taken = [p for p in (output_path(out, item.id, fmt), out / f"{item.id}.json") if p.exists()]
    if not taken:
        return None
    return (f"{taken[0]} exists and was not made by a batch here: move it away or give "
            "another --out")  # fmt: skip


def logged_ids(out: Path) -> set[str]:
    """Ids whose files a batch here began to write (``batch.log.jsonl``: started or done)."""
    log = out / "batch.log.jsonl"
    if not log.is_file():
        return set()
    ids = set()
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            if entry["status"] in ("started", "done"):
                ids.add(str(entry["id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return ids


def record(out: Path, rid: str, status: str, **extra: Any) -> None:
    """Append an outcome ("started", "done", "failed", or "requeued" after a worker died) to
    ``batch.log.jsonl``; ``ID.error.json`` exists exactly while the request's last outcome is
    a failure."""
    error_file = out / f"{rid}.error.json"
    entry = {"id": rid, "status": status, "time": round(time.time(), 3), **extra}
    if status == "failed":
        error_file.write_text(json.dumps(entry, indent=2) + "\n")
    elif status == "done":
        error_file.unlink(missing_ok=True)
    with (out / "batch.log.jsonl").open("a") as log:
        log.write(json.dumps(entry) + "\n")


def save_result(out: Path, item: Item, fmt: str, encoded: tuple[bytes, dict[str, Any]]) -> None:
    """Write a worker's encoded video and then its sidecar (the mark of a finished request)."""
    from kinema.io.video import write_file, write_sidecar

    data, info = encoded
    path = write_file(output_path(out, item.id, fmt), data)
    write_sidecar(path, {**info, "batch_id": item.id, "batch_request": item.fields})
    record(out, item.id, "done", seconds=info.get("timings", {}).get("total"))


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


class Worker:
    """Holds one loaded pipeline and renders requests with it (a Ray actor under ``--ray``)."""

    def __init__(
        self, model: str | None, device: str | None, dtype: str | None, compile: bool = False
    ) -> None:
        from kinema.loading import load

        self.model = model
        self.pipe = load(model, device=device, dtype=dtype, compile=compile)
        self.pipe.load_seconds = 0.0  # loaded once for the whole batch: no request's time
        self.memory = free_bytes(self.pipe.device)  # what a request may take, once loaded

    def ready(self) -> bool:
        """Answers once the model is loaded (the driver waits for every actor)."""
        return True

    def encode(self, fields: dict[str, Any], fmt: str) -> tuple[bytes, dict[str, Any]]:
        """One request's video, encoded as ``fmt`` window by window into a temporary file,
        as bytes with its sidecar info: what a Ray actor sends the driver (megabytes of mp4,
        not the raw frames, which for a minute of Wan's 832×480 are 1.15 GB)."""
        with tempfile.TemporaryDirectory(prefix="kinema-batch-") as tmp:
            saved = self.pipe.save(self.request(fields), Path(tmp) / f"video.{fmt}")
            return saved.path.read_bytes(), saved.info

    def save(self, fields: dict[str, Any], path: Path, info: dict[str, Any]) -> SavedVideo:
        """Make one request's video straight into ``path``, window by window (in-process)."""
        return self.pipe.save(self.request(fields), path, info=info)

    def request(self, fields: dict[str, Any]) -> Request:
        wanted = fields.get("model")
        if (
            wanted is not None
            and wanted not in (self.model, self.pipe.name)
            and not (self.model is not None and same_path(wanted, self.model))
        ):
            raise ValueError(f"model {wanted!r}: this batch runs {self.model or self.pipe.name!r}")
        request = build_request(fields, self.pipe)
        req = request.resolved(self.pipe.defaults)
        width, height = req.width, req.height
        if isinstance(req.extend, str | Path):  # an extension keeps its source's size
            from kinema.io.video import probe

            source = probe(req.extend)
            width, height = source.width, source.height
        check_fits(self.pipe, width, height, req.frames, self.memory, "this machine")
        return request


def same_path(a: str, b: str) -> bool:
    """Two spellings of one folder ("./mymodel", "mymodel", "~/m")."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def fail_all(out: Path, items: deque[Item], why: str, tick: OnResult) -> None:
    """Record every one of ``items`` as failed for the reason ``why``."""
    while items:
        item = items.popleft()
        record(out, item.id, "failed", error=why)
        tick(item.id, "failed")


def error_text(err: BaseException) -> str:
    """One line naming the error (the original exception for a Ray task error)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    if isinstance(cause, ValueError) and text:  # bad input: its message says it all
        return text[0]
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def run_local(items: list[Item], out: Path, opts: BatchOptions, tick: OnResult) -> None:
    """Render ``items`` one after another in this process."""
    worker = Worker(opts.model, opts.device, opts.dtype, opts.compile)
    for item in items:
        path = output_path(out, item.id, opts.format)
        try:
            saved = worker.save(item.fields, path,
                                {"batch_id": item.id, "batch_request": item.fields})  # fmt: skip
        except Exception as err:  # a failed request is recorded; the batch goes on
            record(out, item.id, "failed", error=error_text(err))
            tick(item.id, "failed")
            continue
        record(out, item.id, "done", seconds=saved.info["timings"]["total"])
        tick(item.id, "done")


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------


def connect_ray(address: str) -> bool:
    """Connect to (or, for "local", start) a Ray cluster; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    check_reachable(address)
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    except ConnectionError as err:
        raise ValueError(f"no Ray cluster at {address!r} ({err}); use --ray local") from err
    except Exception as err:  # Ray could not start here (its temp folder, ports, ...)
        raise ValueError(f"Ray did not start: {type(err).__name__}: {err}") from err
    return True


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address answers a TCP connection within ``timeout``
    seconds, else ValueError: Ray itself retries an unreachable one for minutes, silently."""
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if m is None:  # "auto", "local"
        return
    try:
        socket.create_connection((m[1], int(m[2])), timeout=timeout).close()
    except OSError as err:
        raise ValueError(f"no Ray cluster answers at {address} ({err.strerror or err}); start "
                         "one there, or use --ray local") from None  # fmt: skip


def check_model(opts: BatchOptions) -> None:
    """The model and dtype the actors will load exist (ValueError naming them otherwise)."""
    import torch

    from kinema.loading import resolve_dtype, resolve_model_path

    resolve_model_path(opts.model)
    resolve_dtype(opts.dtype, torch.device("cpu"))


def start_actors(opts: BatchOptions, wanted: int) -> list[Any]:
    """One model-holding actor per GPU (or CPU), at most ``wanted``; Ray restarts dead ones."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    have, unit = (gpus, "GPU") if gpus else (cpus, "CPU")
    if opts.workers is not None and opts.workers > have:  # the rest would wait forever
        raise ValueError(f"--workers {opts.workers}: each worker holds one {unit} and the Ray "
                         f"cluster has {have}; give --workers {have} or fewer")  # fmt: skip
    count = min(wanted, opts.workers or gpus or cpus)
    need = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    device = None if gpus else "cpu"
    cls = ray.remote(max_restarts=-1, max_task_retries=0, **need)(Worker)
    args = (opts.model, device, opts.dtype, opts.compile)
    return [cls.options(name=f"kinema-batch-{i}").remote(*args) for i in range(count)]


def run_ray(items: list[Item], out: Path, opts: BatchOptions, tick: OnResult) -> None:
    """Hand ``items`` to the actors as they free up; requeue a request whose actor died. An
    actor that died gets no work until it answers again (Ray restarts it, reloading the
    model): work sent to a restarting actor fails at once, and that is no request's fault."""
    import ray
    from ray.exceptions import ActorDiedError, RayActorError

    check_model(opts)  # here: in an actor a bad model is a Ray traceback
    started = connect_ray(opts.ray or "auto")
    actors = start_actors(opts, len(items))
    ray.get([a.ready.remote() for a in actors])  # models loaded: a load error surfaces here
    queue, idle = deque(items), deque(actors)
    running: dict[Any, tuple[Any, Item | None]] = {}  # None: a dead actor's readiness probe
    deaths: dict[str, int] = {}
    probes: dict[Any, int] = {}  # failed probes of each actor since it died
    try:
        while queue or running:
            while queue and idle:
                actor, item = idle.popleft(), queue.popleft()
                running[actor.encode.remote(item.fields, opts.format)] = (actor, item)
            if not running:  # every actor gave up restarting
                fail_all(out, queue, "no Ray worker is left (they died and did not restart)", tick)
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, item = running.pop(ref)
            try:
                encoded = ray.get(ref)
            except RayActorError as err:  # the actor died (or is still restarting)
                if item is None:  # a probe: still down; ask again unless it is gone for good
                    probes[actor] = probes.get(actor, 0) + 1
                    time.sleep(0.2)
                    if not isinstance(err, ActorDiedError) and probes[actor] < MAX_PROBES:
                        running[actor.ready.remote()] = (actor, None)
                    continue
                running[actor.ready.remote()] = (actor, None)  # work again once it answers
                deaths[item.id] = deaths.get(item.id, 0) + 1
                if deaths[item.id] < MAX_WORKER_DEATHS:
                    record(out, item.id, "requeued", error=f"worker died: {error_text(err)}")
                    queue.appendleft(item)
                    continue
                record(out, item.id, "failed", error=f"worker died: {error_text(err)}")
                tick(item.id, "failed")
                continue
            except Exception as err:  # the request itself failed
                idle.append(actor)
                record(out, item.id, "failed", error=error_text(err))
                tick(item.id, "failed")
                continue
            idle.append(actor)
            probes.pop(actor, None)
            if item is not None:
                save_result(out, item, opts.format, encoded)
                tick(item.id, "done")
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


class _Bar:
    """tqdm over the requests to do, counting done and failed; calls ``on_result`` too."""

    def __init__(self, total: int, show: bool, on_result: OnResult | None) -> None:
        self.counts = {"done": 0, "failed": 0}
        self.on_result, self.bar = on_result, None
        if show and total:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="batch", unit="video", file=sys.stderr)

    def __call__(self, rid: str, status: str) -> None:
        self.counts[status] += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.counts["failed"])
        if self.on_result is not None:
            self.on_result(rid, status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(
    requests: str | Path,
    out: str | Path,
    options: BatchOptions = BatchOptions(),
    *,
    show_progress: bool = True,
    on_result: OnResult | None = None,
) -> Summary:
    """Run every unfinished request of ``requests`` into ``out``; returns the counts."""
    items = read_requests(requests)
    out = check_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in items if not is_finished(out, i, options.format)]
    logged = logged_ids(out)
    todo = [i if i.error else Item(i.id, i.fields, foreign_output(out, i, options.format, logged))
            for i in todo]  # fmt: skip
    for item in (i for i in todo if i.error is None):
        record(out, item.id, "started")  # from now on its files are this batch's to replace
    bar = _Bar(len(todo), show_progress, on_result)
    for item in (i for i in todo if i.error is not None):
        record(out, item.id, "failed", error=item.error)
        bar(item.id, "failed")
    runnable = [i for i in todo if i.error is None]
    try:
        if runnable:
            (run_ray if options.ray else run_local)(runnable, out, options, bar)
    finally:
        bar.close()
    return Summary(len(items), len(items) - len(todo), bar.counts["done"], bar.counts["failed"])
