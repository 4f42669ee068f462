"""A local page for Stable Audio Open: type a prompt, listen, keep what you like.

    python app.py --model PATH_OR_REPO      # then open http://127.0.0.1:7860

The model is loaded once. Generations run one at a time, in order, in a thread of their
own; the page (web/) asks for them and follows them with JSON. The standard library
serves it all: the page, its two static files, and the results this run wrote (under
--output-dir, never overwritten) — nothing else."""

import argparse
import json
import math
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import soundfile as sf

from stable_audio import DEFAULTS, ArgumentError, Settings, StableAudio, load_config
from stable_audio.audio import FORMATS, read_audio, resample, set_level, write_audio
from stable_audio.cli import (
    add_lora_arguments,
    add_model_arguments,
    dtype,
    first_line,
    lora_settings,
    number,
    one_line_errors,
    parse_range,
    parser,
)
from stable_audio.files import check_writable, interruptible, written
from stable_audio.sampler import samplers_for
from stable_audio.spectrogram import write_spectrogram

WEB = Path(__file__).parent / "web"
PAGE = {  # every path the page is served from: nothing else on disk is reachable
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
CONTENT_TYPES = {
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}
MODES = {
    "variation": "init_audio",
    "inpaint": "inpaint_audio",
    "continue": "continue_audio",
}
MAX_JSON = 1_000_000  # bytes of a request's settings (uploads: --max-upload-mb)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
STOP_WAIT = 60  # seconds: a step of the largest model, its decoding and its files


class Cancelled(Exception):
    pass


def field(data: dict, name: str, kind=float):
    """The form's `name` as `kind` (None when empty: the model's default), or an
    ArgumentError naming the field."""
    value = data.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    refusal = ArgumentError(
        f"{name} must be {'a whole number' if kind is int else 'a number'}, not"
        f" {value!r}.",
        name,
    )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise refusal
    try:
        parsed = (
            float(value)
            if kind is float
            else int(value.strip() if isinstance(value, str) else value)
        )
    except (ValueError, OverflowError):
        raise refusal from None
    if kind is int and isinstance(value, float) and value != parsed:
        raise refusal
    if not math.isfinite(parsed):  # "inf", "nan", 1e400, Infinity: as Settings says it
        raise ArgumentError(f"{name} must be a finite number.", name)
    return parsed


def text(data: dict, name: str) -> str:
    value = data.get(name) or ""
    if not isinstance(value, str):
        raise ArgumentError(f"{name} must be text.", name)
    return value


def ranges(value) -> list:
    """'10:15, 30:32' as [(10, 15), (30, 32)]."""
    if not isinstance(value, str):
        raise ArgumentError(
            "inpaint ranges must be text, START:END in seconds, e.g. 10:15, 30:32.",
            "inpaint_ranges",
        )
    try:
        return [parse_range(part) for part in filter(None, re.split(r"[,\s]+", value))]
    except (
        argparse.ArgumentTypeError
    ) as e:  # txt2audio's --inpaint-range, one range at a time
        raise ArgumentError(str(e), "inpaint_ranges") from None


class Studio:
    """The model, the queue of generations and what they wrote. Its worker thread loads
    the model and is the only one to run MLX (whose streams belong to the thread that
    made them); request threads only check, read and queue, under `lock`."""

    def __init__(self, name: str, output_dir: Path, compile: bool, max_upload: int):
        self.name, self.output_dir, self.compile, self.max_upload = (
            name,
            output_dir,
            compile,
            max_upload,
        )
        self.pipe = self.load_error = self.running = None  # running: the worker's job
        self.ready = threading.Event()
        self.stopping = False  # set by stop(): the worker takes no other job
        self.uploads_dir = tempfile.TemporaryDirectory(prefix="stable-audio-uploads-")
        self.uploads = {}  # id -> {path, name, seconds, ...}
        self.jobs, self.pending, self.history = {}, deque(), []
        self.files = (
            {}
        )  # name -> path: all that /results/ serves, each a file this run wrote
        self.lock = threading.Condition()

    def start(self, load):
        """Run `load()` (which returns the StableAudio) and then the queue, in the
        worker thread; once `ready` is set, `load_error` holds what loading raised, if
        anything.
        """
        threading.Thread(target=self._work, args=(load,), daemon=True).start()

    def stop(self, wait: float) -> bool:
        """Stop the work before the process ends: a generation still sampling stops at
        its next step (writing nothing), the results of one being written are finished,
        no other starts; whether the worker was idle within `wait` seconds. The worker
        stays, idle: a thread that ran MLX is not ended while the process exits."""
        with self.lock:
            self.stopping = True
            for job in self.jobs.values():
                job["cancel"].set()
            return self.lock.wait_for(lambda: self.running is None, wait)

    def longest(self) -> float:
        """The longest seconds_total the model takes (at least its window)."""
        window = self.pipe.window_seconds
        numbers = self.pipe.config.conditioner.numbers
        return max(numbers.get("seconds_total", (0, window))[1], window)

    def info(self) -> dict:
        config = self.pipe.config
        objective = config.dit.objective
        return {
            "model": self.name,
            "sample_rate": config.sample_rate,
            "window": self.pipe.window_seconds,
            "longest": self.longest(),
            "samplers": list(samplers_for(objective)),
            "defaults": DEFAULTS[objective],
            "formats": [f[1:] for f in FORMATS],
            "max_upload": self.max_upload,
            "adapters": self.pipe.adapters,
            "output_dir": str(self.output_dir),
        }

    # --- requests

    def upload(self, body: bytes, filename: str) -> dict:
        """Keep an uploaded file if the model can use it: soundfile reads it, its
        samples are finite and its rate can be resampled; else an ArgumentError. Only
        what the model could use is decoded; the rest is described by the header."""
        suffix = "".join(
            c for c in Path(filename).suffix[:8] if c.isalnum() or c == "."
        )
        upload_id = uuid.uuid4().hex
        path = Path(self.uploads_dir.name) / f"{upload_id}{suffix}"
        path.write_bytes(body)
        try:
            rate, samples = read_audio(str(path), self.longest())
            if not np.isfinite(samples).all():
                raise ValueError(f"{filename!r} holds NaN or infinite samples.")
            resample(samples[:, :1], rate, self.pipe.sample_rate)  # a rate it refuses
            frames = sf.info(str(path)).frames
        except (ValueError, RuntimeError) as e:  # named as it was sent, not as kept
            path.unlink()
            raise ArgumentError(str(e).replace(str(path), filename), "upload") from None
        entry = {
            "path": str(path),
            "name": filename,
            "seconds": frames / rate,
            "sample_rate": rate,
            "channels": samples.shape[0],
        }
        with self.lock:
            self.uploads[upload_id] = entry
        return {"id": upload_id, **{k: v for k, v in entry.items() if k != "path"}}

    def parse(self, data: dict) -> tuple:
        """(the Settings to generate, the upload, the format; the settings to show) from
        the page's form, checked as generate() checks them: an ArgumentError names the
        field at fault."""
        if not isinstance(data, dict):
            raise ArgumentError(
                "The request must be a JSON object of the form's fields."
            )
        mode = data.get("mode") or "text"
        if mode not in ("text", *MODES):
            modes = ", ".join(("text", *MODES))
            raise ArgumentError(
                f"Unknown mode {mode!r}; choose one of {modes}.", "mode"
            )
        audio_format = data.get("format") or "wav"
        if "." + str(audio_format) not in FORMATS:
            formats = ", ".join(f[1:] for f in FORMATS)
            message = f"Unknown format {audio_format!r}; choose one of {formats}."
            raise ArgumentError(message, "format")
        upload = None
        if mode != "text":
            with self.lock:
                upload = self.uploads.get(str(data.get("upload")))
            if upload is None:
                verb = "vary" if mode == "variation" else mode
                raise ArgumentError(f"Choose an audio file to {verb}.", "upload")
        given = self._fields(data, mode)
        if not given["prompt"].strip():
            raise ArgumentError(
                "Type a prompt: what the audio should sound like.", "prompt"
            )
        if given.get("sampler") is not None and not isinstance(given["sampler"], str):
            raise ArgumentError("sampler must be a name.", "sampler")
        given = {k: v for k, v in given.items() if v is not None}
        shown = dict(given, seed=None, mode=mode, format=audio_format)
        if upload:  # check() reads what it uses of the file (the job keeps that)
            given[MODES[mode]] = upload["path"]
            shown["upload"] = upload["name"]
        try:
            s = Settings(**given, compile=self.compile).check(self.pipe.config)
        except ArgumentError as e:  # the file is the upload, by the name it was sent
            if e.argument not in MODES.values():
                raise
            message = str(e).replace(upload["path"], upload["name"])
            raise ArgumentError(message, "upload") from None
        shown["seed"] = s.seed
        return (s, audio_format), shown

    @staticmethod
    def _fields(data: dict, mode: str) -> dict:
        """The form's fields as Settings' (None: not given)."""
        given = dict(
            prompt=text(data, "prompt"),
            negative_prompt=text(data, "negative_prompt") or None,
            seconds_total=field(data, "seconds_total"),
            steps=field(data, "steps", int),
            cfg_scale=field(data, "cfg_scale"),
            sampler=data.get("sampler") or None,
            seed=field(data, "seed", int),
            batch_size=field(data, "batch_size", int),
            overlap=field(data, "overlap"),
            loop=data.get("loop") is True,
            bpm=field(data, "bpm"),
            bars=field(data, "bars", int),
            beats_per_bar=field(data, "beats_per_bar", int),
        )
        if mode == "variation":
            given["init_noise_level"] = field(data, "init_noise_level")
        if mode == "inpaint":
            given["inpaint_ranges"] = ranges(data.get("inpaint_ranges") or "")
        return given

    def submit(self, data: dict) -> dict:
        request, shown = self.parse(data)
        job = {
            "id": uuid.uuid4().hex[:12],
            "state": "queued",
            "step": 0,
            "total": 0,
            "results": [],
            "error": None,
            "field": None,
            "settings": shown,
            "request": request,
            "cancel": threading.Event(),
        }
        with self.lock:
            self.jobs[job["id"]] = job
            self.pending.append(job)
            self.lock.notify_all()
        return self.status(job["id"])

    def status(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            position = next((i + 1 for i, j in enumerate(self.pending) if j is job), 0)
            return {k: v for k, v in job.items() if k not in ("request", "cancel")} | {
                "position": position
            }

    def cancel(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job["state"] == "queued":
                self.pending.remove(job)
                job["state"] = "cancelled"
            job["cancel"].set()  # a running one stops after its current step
        return self.status(job_id)

    # --- the worker

    def _work(self, load):
        try:
            self.pipe = load()
        except BaseException as e:
            self.load_error = e
            return
        finally:
            self.ready.set()
        while True:
            with self.lock:
                while not self.pending or self.stopping:
                    self.lock.wait()
                job = self.running = self.pending.popleft()
                job["state"] = "running"
            try:
                results = self._generate(job)
                state, error, argument = "done", None, None
            except Cancelled:
                results, state, error, argument = [], "cancelled", None, None
            except (ValueError, OSError, FloatingPointError) as e:
                results, state, error, argument = (
                    [],
                    "failed",
                    str(e),
                    getattr(e, "argument", None),
                )
            except (
                RuntimeError,
                MemoryError,
            ) as e:  # MLX's own failures: out of memory, most likely
                results, state, error, argument = (
                    [],
                    "failed",
                    (
                        f"MLX failed ({first_line(e)}); if memory ran out, try"
                        " --quantize 8 or fewer audios."
                    ),
                    None,
                )
            except Exception as e:  # never let one generation end the server
                results, state, error, argument = (
                    [],
                    "failed",
                    f"Generation failed: {type(e).__name__}: {first_line(e)}",
                    None,
                )
            with self.lock:
                job.update(state=state, error=error, field=argument, results=results)
                self.history[:0] = results
                self.running = None
                self.lock.notify_all()  # stop() may be waiting for it

    def _generate(self, job) -> list:
        s, audio_format = job["request"]

        def progress(done, total):
            with self.lock:
                job.update(step=done, total=total)
            if job["cancel"].is_set():
                raise Cancelled

        audio = np.array(self.pipe.generate(settings=s, progress=progress))
        results = []
        for i, item in enumerate(audio):
            stem = self._free_stem(s.seed, i if len(audio) > 1 else None)
            path = self.output_dir / f"{stem}.{audio_format}"
            write_audio(path, set_level(item, "peak"), self.pipe.sample_rate)
            picture = path.with_suffix(".svg")  # with its axes, as txt2audio's
            write_spectrogram(picture, item, self.pipe.sample_rate)
            settings = {**job["settings"], "index": i, "file": path.name}
            with written(path.with_suffix(".json")) as tmp:
                tmp.write_text(json.dumps(settings, indent=1))
            with self.lock:
                for p in (path, picture, path.with_suffix(".json")):
                    self.files[p.name] = p
            results.append(
                {
                    "audio": f"/results/{path.name}",
                    "spectrogram": f"/results/{picture.name}",
                    "name": path.name,
                    "seconds": item.shape[-1] / self.pipe.sample_rate,
                    "sample_rate": self.pipe.sample_rate,
                    "seed": s.seed,
                    "settings": settings,
                }
            )
        return results

    def _free_stem(self, seed: int, index: int) -> str:
        """A name no file in the output folder has: time, seed, and the batch index."""
        stem = (
            time.strftime("%Y%m%d-%H%M%S")
            + f"-seed{seed}"
            + ("" if index is None else f"-{index}")
        )
        taken = {p.stem for p in self.output_dir.iterdir()}
        candidate, n = stem, 1
        while candidate in taken:
            n += 1
            candidate = f"{stem}-{n}"
        return candidate


class Handler(BaseHTTPRequestHandler):
    server_version = "stable-audio-mlx"
    studio: Studio = None  # set by main
    allowed_hosts = (
        None  # Host headers accepted when serving on loopback (against DNS rebinding)
    )

    def log_message(self, format, *args):  # quiet: the page shows what happens
        pass

    def _send(self, status, body: bytes, content_type: str, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status=HTTPStatus.OK):
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status, message: str, argument: str = None):
        self._json({"error": message, "field": argument}, status)

    def _host_ok(self) -> bool:
        if (
            self.allowed_hosts is None
            or self.headers.get("Host", "").lower() in self.allowed_hosts
        ):
            return True
        self._error(
            HTTPStatus.BAD_REQUEST,
            "Unexpected Host header: this server answers only to its own address.",
        )
        return False

    def _body(self, limit: int, content_type: str) -> bytes:
        """The request's body, if it is `content_type` (a type a web page cannot send to
        another site without asking it first) and at most `limit` bytes; else None, the
        error sent and the connection closed (an oversized body is never read)."""
        length = self.headers.get("Content-Length")
        if (
            self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            != content_type
        ):
            self.close_connection = True
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Send {content_type}.")
            return None
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "A Content-Length is needed.")
            return None
        if int(length) > limit:
            self.close_connection = True
            upload = content_type != "application/json"
            what = "The upload" if upload else "The request"
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"{what} is larger than the limit of {limit / 1e6:g} MB"
                + (" (--max-upload-mb)." if upload else "."),
                "upload" if upload else None,
            )
            return None
        body = self.rfile.read(int(length))
        if len(body) < int(length):  # the client stopped early: never act on a part
            self.close_connection = True
            self._error(
                HTTPStatus.BAD_REQUEST, "The request ended before its Content-Length."
            )
            return None
        return body

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        try:
            if not self._host_ok():
                return
            path = urlsplit(self.path).path
            if path in PAGE:
                name, content_type = PAGE[path]
                return self._send(
                    HTTPStatus.OK, (WEB / name).read_bytes(), content_type
                )
            if path == "/api/info":
                return self._json(self.studio.info())
            if path == "/api/history":
                with self.studio.lock:
                    return self._json(list(self.studio.history))
            if path.startswith("/api/jobs/"):
                status = self.studio.status(path[len("/api/jobs/") :])
                return (
                    self._json(status)
                    if status
                    else self._error(HTTPStatus.NOT_FOUND, "No such generation.")
                )
            if path.startswith("/results/"):
                with self.studio.lock:  # only what this run wrote, by its exact name
                    file = self.studio.files.get(path[len("/results/") :])
                if file is not None and file.is_file():
                    return self._file(file)
            self._error(HTTPStatus.NOT_FOUND, "Not found.")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {first_line(e)}"
            )

    def _file(self, path: Path):
        """A result, whole or the one byte range a media element asks for; a range that
        starts past its end is answered 416, as HTTP says."""
        data = path.read_bytes()
        content_type = CONTENT_TYPES.get(
            path.suffix.lower(), "application/octet-stream"
        )
        headers = [
            ("Accept-Ranges", "bytes"),
            ("Content-Disposition", f'inline; filename="{path.name}"'),
        ]
        span = byte_range(self.headers.get("Range", ""), len(data))
        if span is None:
            return self._send(HTTPStatus.OK, data, content_type, headers)
        if not span:
            headers.append(("Content-Range", f"bytes */{len(data)}"))
            return self._send(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", content_type, headers
            )
        start, end = span
        headers.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
        self._send(
            HTTPStatus.PARTIAL_CONTENT, data[start : end + 1], content_type, headers
        )

    def do_POST(self):
        try:
            if not self._host_ok():
                return
            path = urlsplit(self.path).path
            if path == "/api/upload":
                body = self._body(self.studio.max_upload, "application/octet-stream")
                if body is not None:
                    name = unquote(self.headers.get("X-Filename", "upload"))
                    self._json(self.studio.upload(body, name))
                return
            if path == "/api/generate":
                body = self._body(MAX_JSON, "application/json")
                if body is not None:
                    try:
                        data = json.loads(
                            body, parse_constant=lambda c: c
                        )  # NaN stays the text "NaN"
                    except (ValueError, UnicodeDecodeError):
                        return self._error(
                            HTTPStatus.BAD_REQUEST, "The request is not JSON."
                        )
                    except RecursionError:  # e.g. "[" * 100000
                        return self._error(
                            HTTPStatus.BAD_REQUEST, "The request's JSON is too deep."
                        )
                    self._json(self.studio.submit(data))
                return
            match = re.fullmatch(r"/api/jobs/([0-9a-f]+)/cancel", path)
            if match:
                status = self.studio.cancel(match[1])
                return (
                    self._json(status)
                    if status
                    else self._error(HTTPStatus.NOT_FOUND, "No such generation.")
                )
            self._error(HTTPStatus.NOT_FOUND, "Not found.")
        except ValueError as e:  # ArgumentError among them: a user's input
            self._error(HTTPStatus.BAD_REQUEST, str(e), getattr(e, "argument", None))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {first_line(e)}"
            )


def byte_range(header: str, size: int):
    """(first, last) byte of the one range `header` asks of `size` bytes; None for the
    whole file (no range, or one this server does not serve), () if it starts past the
    end."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header)
    if not match or not any(match.groups()) or not size:
        return None
    first, last = (None if g == "" else offset(g, size) for g in match.groups())
    start = first if first is not None else size - last
    end = size - 1 if first is None or last is None else min(last, size - 1)
    return (start, end) if start <= end else ()


def offset(digits: str, size: int) -> int:
    """A Range header's number, at most `size`: Python refuses int() of more than 4300
    digits, and any beyond 18 exceed every file."""
    digits = digits.lstrip("0") or "0"
    return size if len(digits) > 18 else min(int(digits), size)


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that left (a lying Content-Length too): nothing to report
        super().handle_error(request, client_address)


class Server6(Server):
    address_family = socket.AF_INET6


def listen(host: str, port: int) -> Server:
    """The server, listening on `host` (IPv6 if it has a colon); a ValueError if it
    cannot."""
    try:
        return (Server6 if ":" in host else Server)((host, port), Handler)
    except OSError as e:
        shown = f"[{host}]" if ":" in host else host
        raise ValueError(
            f"Cannot listen on {shown}:{port} ({e.strerror or e}); try another --port."
        ) from None


def check_output_dir(output_dir: str) -> Path:
    """The output folder, made if missing; a ValueError now, before the model loads,
    if results could not be written to it."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {output_dir!r} is a file, not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        check_writable(path / uuid.uuid4().hex)  # a name no file has: only the folder
    except (OSError, ValueError) as e:  # "Cannot write PATH: REASON." keeps REASON
        reason = getattr(e, "strerror", None) or str(e).rsplit(": ", 1)[-1]
        raise ValueError(
            f"Cannot write to --output-dir {output_dir!r}: {reason.rstrip('.')}."
        ) from None
    return path


def model_name(path_or_repo: str) -> str:
    """How the page names the model: a folder by its own name (`mlx_model`, not the path
    to it), a Hub repo by its name (`stable-audio-open-1.0`)."""
    path = Path(path_or_repo).expanduser()
    name = path.resolve().name if path.is_dir() else path_or_repo.rstrip("/")
    return name.rsplit("/", 1)[-1] or path_or_repo


def arguments():
    p = parser("Serve a local page that makes audio from text with Stable Audio Open.")
    add = p.add_argument
    add("--model", required=True, help="Converted folder, released folder or Hub repo")
    add(
        "--host",
        default="127.0.0.1",
        help=(
            "Address to listen on; anything but loopback lets other machines in"
            " (default: %(default)s)"
        ),
    )
    add(
        "--port",
        type=int,
        default=7860,
        help="Port to listen on, 0 for any free one (default: %(default)s)",
    )
    add(
        "--output-dir",
        default="outputs",
        help=(
            "Folder the results are written to, created if missing; nothing in it is"
            " overwritten (default: %(default)s)"
        ),
    )
    add_model_arguments(p)
    add_lora_arguments(p)  # applied to every generation
    add(
        "--max-upload-mb",
        type=number,
        default=100.0,
        help="The largest audio file the page may upload, in MB (default: %(default)s)",
    )
    return p


def main(argv=None):
    args = arguments().parse_args(argv)
    with one_line_errors("if memory ran out, try --quantize 8."):
        dtypes = dtype(args.dtype), dtype(args.vae_dtype)
        if not (0 <= args.port < 65536):
            raise ValueError(f"--port must be in [0, 65535], not {args.port}.")
        if not args.max_upload_mb > 0:
            raise ValueError("--max-upload-mb must be a positive number.")
        loras = lora_settings(args)
        output_dir = check_output_dir(args.output_dir)
        config = load_config(args.model)
        if args.quantize and config.quantization:
            raise ValueError(
                f"{args.model} is already quantized; leave out --quantize."
            )
        server = listen(args.host, args.port)  # before loading: a port in use fails now
        print(f"[INFO] Loading {args.model}", flush=True)
        upload_bytes = int(args.max_upload_mb * 1e6)
        studio = Studio(model_name(args.model), output_dir, args.compile, upload_bytes)
        studio.start(
            lambda: StableAudio.from_pretrained(
                args.model, *dtypes, args.quantize, loras
            )
        )
        studio.ready.wait()
        if studio.load_error is not None:
            raise studio.load_error

    port = server.server_address[1]
    Handler.studio = studio
    if args.host in LOOPBACK:
        Handler.allowed_hosts = {
            f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")
        }
    else:
        print(
            f"[WARNING] Listening on {args.host}: anyone who can reach this machine can"
            f" use the model and fill {output_dir}.",
            flush=True,
        )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"[INFO] Serving on http://{shown}:{port} (Ctrl-C stops); results go to"
        f" {output_dir}",
        flush=True,
    )
    try:
        with interruptible():  # SIGTERM and SIGHUP end the server as Ctrl-C does
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:  # a second Ctrl-C must not break the cleanup
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        server.server_close()
        if not studio.stop(STOP_WAIT):
            print(
                f"[WARNING] The running generation did not stop within {STOP_WAIT} s;"
                " its files may be incomplete.",
                flush=True,
            )
        studio.uploads_dir.cleanup()
    print("Stopped.")


if __name__ == "__main__":
    main()
