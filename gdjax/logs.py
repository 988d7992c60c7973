"""Run logging: metric rows that survive kills and resumes, TensorBoard, W&B, progress lines.

`MetricLogger` writes one JSON-lines file per stream, `<workdir>/metrics/<stream>.jsonl`
(streams such as "train", "experience", "eval"), each row `{"step": step, **metrics}`. The
JSON files are the source of truth that reports read back with `read_metrics`; TensorBoard
(through tensorboardX, no TensorFlow needed) and Weights & Biases are optional mirrors.

Exactly-once rows. Every stream shares the global step counter that the checkpoints use, and a
training loop logs all rows of step s *before* it saves the checkpoint of step s. A run killed
after logging but before checkpointing is resumed with `MetricLogger(..., resume_step=s)` where
s is the restored checkpoint's step: rows with step > s are dropped from every stream (they will
be logged again), as is a half-written last line. A loop restarting from nothing after a crash
before its first checkpoint passes `resume_step=-1`, which empties every stream.

Non-finite floats are written as the JSON strings "nan", "inf" and "-inf" (strict JSON has no
NaN, and null would lose which one it was); `read_metrics` turns them back into floats.

In a multi-host run, construct the logger on process 0 only.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import sys
import time
import warnings
from typing import Any, Callable, Mapping, TextIO

import numpy as np

_STREAM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- JSON rows


def _to_json_number(name: str, value: Any) -> int | float | str:
    """A python int/float (or "nan"/"inf"/"-inf") from a python, numpy or jax scalar."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        number = value
    else:
        array = np.asarray(value)  # numpy and jax scalars; fetches a jax array to the host
        if array.ndim != 0 or array.dtype.kind not in "biuf":
            raise TypeError(
                f"metric {name!r} must be a real scalar, got {type(value).__name__} "
                f"with shape {array.shape} and dtype {array.dtype}")
        if array.dtype.kind in "biu":
            return int(array)
        number = float(array)
    if math.isfinite(number):
        return number
    return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")


def _encode_row(step: int, metrics: Mapping[str, Any]) -> str:
    if "step" in metrics:
        raise ValueError("'step' is reserved for the step argument of MetricLogger.write")
    row = {"step": step}
    row.update({str(k): _to_json_number(k, v) for k, v in metrics.items()})
    return json.dumps(row, allow_nan=False)


def _decode_row(line: str) -> dict | None:
    """The row of one line, None if it is not a JSON object (a torn write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or "step" not in row:
        return None
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}


def _read_rows(path: pathlib.Path, text: str | None = None) -> list[tuple[str, dict]]:
    """(raw line, row) pairs of a stream file (or of its `text`); a torn last line is
    skipped, a torn middle line is corruption and raises."""
    if text is None:
        if not path.exists():
            return []
        text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    pairs = []
    for number, line in enumerate(lines, start=1):
        row = _decode_row(line)
        if row is None:
            if number == len(lines):
                break  # killed mid-write: the row was never complete
            raise ValueError(f"{path}:{number} is not a metric row: {line[:80]!r}")
        pairs.append((line, row))
    return pairs


def read_metrics(workdir: str | os.PathLike, stream: str) -> list[dict]:
    """The rows of one stream in file order, each a dict with "step" and float/int values
    ([] if the stream was never written). Non-finite values come back as floats."""
    return [row for _, row in _read_rows(_stream_path(workdir, stream))]


def _stream_path(workdir: str | os.PathLike, stream: str) -> pathlib.Path:
    if not _STREAM_NAME.match(stream):
        raise ValueError(f"stream name {stream!r} must match {_STREAM_NAME.pattern}")
    return pathlib.Path(workdir) / "metrics" / f"{stream}.jsonl"


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Replace `path` by `text` so that a kill leaves either the old or the new file."""
    # Same directory, so os.replace is atomic; open() keeps the umask's permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def replace_stream(workdir: str | os.PathLike, stream: str, rows: list[dict]) -> None:
    """Rewrites a whole stream with `rows` (each with "step"), atomically: a kill leaves the
    old file or the new one. For streams no MetricLogger appends to at the same time."""
    text = "".join(_encode_row(r["step"], {k: v for k, v in r.items() if k != "step"}) + "\n"
                   for r in rows)
    path = _stream_path(workdir, stream)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, text)


def _truncate_stream(path: pathlib.Path, resume_step: int) -> None:
    """Drop rows with step > resume_step and a torn last line; rewrite only on change."""
    original = path.read_text(encoding="utf-8")
    kept = [line for line, row in _read_rows(path, original) if row["step"] <= resume_step]
    text = "".join(line + "\n" for line in kept)
    if text != original:
        _atomic_write_text(path, text)


# ----------------------------------------------------------------------------- the logger


class NullLogger:
    """The logger of processes other than 0 in a multi-host run: process 0 writes the rows."""

    def write(self, stream, step, metrics) -> None:
        del stream, step, metrics

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricLogger:
    """Writes metric rows to JSON lines, and mirrors them to TensorBoard and W&B.

    Args:
      workdir: the run's directory; files go under `metrics/` and `tensorboard/`.
      resume_step: None for a fresh run (raises ValueError if the workdir already holds
        metric rows); else the step of the restored checkpoint: later rows are dropped.
      tensorboard: mirror scalars to `<workdir>/tensorboard/` as tag `<stream>/<name>`.
      wandb: mirror to Weights & Biases when the `wandb` package is importable.
      config: plain-value dict of the run's config, given to W&B and TensorBoard text.
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
                 tensorboard: bool = True, wandb: bool = False,
                 config: Mapping[str, Any] | None = None):
        self.workdir = pathlib.Path(workdir)
        self._metrics_dir = self.workdir / "metrics"
        self._metrics_dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, TextIO] = {}
        self._closed = False
        self._prepare_streams(resume_step)
        self._tb = _open_tensorboard(self.workdir, resume_step, config) if tensorboard else None
        self._wandb = _open_wandb(self.workdir, config) if wandb else None

    def _prepare_streams(self, resume_step: int | None) -> None:
        paths = sorted(self._metrics_dir.glob("*.jsonl"))
        if resume_step is None:
            written = [p.name for p in paths if p.stat().st_size > 0]
            if written:
                raise ValueError(
                    f"{self._metrics_dir} already holds metrics ({', '.join(written)}); "
                    "pass resume_step=<checkpoint step> to continue that run, or use a new workdir")
            return
        for path in paths:
            _truncate_stream(path, int(resume_step))

    def write(self, stream: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends the row `{"step": step, **metrics}` to `stream` and mirrors it.

        Values are python, numpy or jax real scalars; the row reaches the OS at once, so a
        killed process loses nothing written before (`flush` makes it durable on disk).
        """
        if self._closed:
            raise RuntimeError("MetricLogger.write after close()")
        step = _to_step(step)
        line = _encode_row(step, metrics)
        f = self._files.get(stream)
        if f is None:
            path = _stream_path(self.workdir, stream)
            f = self._files[stream] = open(path, "a", encoding="utf-8")
        try:
            f.write(line + "\n")
            f.flush()
        except OSError:
            # A full disk, say: drop the file with its unwritten tail, so that `close` does
            # not fail on it again. A torn last line is dropped when the run resumes.
            del self._files[stream]
            try:
                f.close()
            except OSError:
                pass
            raise
        row = _decode_row(line)
        if self._tb is not None:
            for name, value in row.items():
                if name != "step":
                    self._tb.add_scalar(f"{stream}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{stream}/{k}": v for k, v in row.items() if k != "step"}, step=step)

    def flush(self) -> None:
        """Makes every written row durable (fsync) and pushes TensorBoard events to disk."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes every sink; idempotent."""
        if self._closed:
            return
        self.flush()
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._closed = True

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _to_step(step: Any) -> int:
    array = np.asarray(step)
    if array.ndim != 0 or array.dtype.kind not in "iu":
        raise TypeError(f"step must be an integer scalar, got {step!r}")
    return int(array)


class _TensorBoardEvents:
    """A synchronous TensorBoard event file: every event is in the file when `flush` returns.

    tensorboardX's SummaryWriter hands events to a background thread through a queue, and its
    `flush` flushes only the file, not the queue, so events written just before it could miss
    the file (and a kill). This writes the same records in the caller's thread instead.
    """

    def __init__(self, logdir: pathlib.Path, purge_step: int | None):
        from tensorboardX import event_file_writer, summary
        from tensorboardX.proto import event_pb2

        self._summary, self._pb = summary, event_pb2
        logdir.mkdir(parents=True, exist_ok=True)
        # Two writers opened in the same second (a quick resume) would share tensorboardX's
        # file name; the suffix keeps them apart and in the order they were opened.
        self._writer = event_file_writer.EventsWriter(
            str(logdir / "events"), filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        if purge_step is not None:
            # A SessionLog START hides the earlier events from purge_step on in TensorBoard.
            self._writer.write_event(event_pb2.Event(
                wall_time=time.time(), step=purge_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _write(self, summary_proto, step: int) -> None:
        self._writer.write_event(
            self._pb.Event(wall_time=time.time(), step=int(step), summary=summary_proto))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(self._summary.scalar(tag, float(value)), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._write(self._summary.text(tag, text), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _open_tensorboard(workdir: pathlib.Path, resume_step: int | None,
                      config: Mapping[str, Any] | None):
    try:
        import tensorboardX  # noqa: F401
    except ImportError as e:
        _warn_once("tensorboardX", f"TensorBoard logging off: cannot import tensorboardX ({e})")
        return None
    # purge_step hides the killed run's events after the checkpoint in TensorBoard's view,
    # the counterpart of the truncated JSON rows.
    purge_step = None if resume_step is None else int(resume_step) + 1
    writer = _TensorBoardEvents(workdir / "tensorboard", purge_step)
    if config is not None and resume_step is None:
        text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
        writer.add_text("config", f"```\n{text}\n```", 0)
    return writer


def _open_wandb(workdir: pathlib.Path, config: Mapping[str, Any] | None):
    try:
        import wandb
    except ImportError:
        _warn_once("wandb", "Weights & Biases logging disabled: cannot import wandb")
        return None
    # The run id lives in the workdir so that a resumed run continues the same W&B run.
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    # Named after the workdir; the project is $WANDB_PROJECT, else "gdjax" (not W&B's
    # "uncategorized").
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "gdjax"), name=workdir.name,
                      dir=str(workdir), id=run_id, resume="allow",
                      config=dict(config) if config is not None else None)


# ----------------------------------------------------------------------------- progress


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format_rate(rate: float) -> str:
    if rate >= 1 or rate == 0:
        return f"{rate:.1f} it/s"
    return f"{1 / rate:.1f} s/it"


def _format_value(value: Any) -> str:
    if isinstance(value, (str, bool, int, np.integer)):
        return str(value)
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class Progress:
    """Progress lines for long loops, with rate and ETA, readable in CI logs.

    `update(n, **postfix)` advances the count; a line such as
    `exp 2/5 | step 120/400 (30%) | 3.2 it/s | ETA 1m27s | loss 0.0412` is printed at most
    every `every_seconds` (and by `close`). On a terminal the line is redrawn in place; in
    a non-TTY stream every line is a new line. The rate is measured since the previous line,
    so the first step's compilation time does not skew the ETA for long. Postfix values are
    formatted only when a line is printed, so jax scalars are not fetched every step.
    """

    def __init__(self, total: int | None, desc: str = "", *, every_seconds: float = 10.0,
                 stream: TextIO | None = None, unit: str = "step",
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.every_seconds = every_seconds
        self.stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.n = 0
        self._postfix: dict[str, Any] = {}
        self._last_time = self._start = clock()
        self._last_n = 0
        self._printed = False
        self._closed = False

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by `n` and remembers `postfix` (shown as `name value` on the line)."""
        self.n += n
        self._postfix.update(postfix)
        finished = self.total is not None and self.n >= self.total
        if not finished and self._clock() - self._last_time >= self.every_seconds:
            self._print(final=False)  # a finished loop gets its line from close()

    def close(self) -> None:
        """Prints the final line (idempotent)."""
        if not self._closed:
            self._print(final=True)
            self._closed = True

    def line(self, now: float | None = None, *, final: bool = False) -> str:
        """The text of the progress line; the final line shows the whole loop's mean rate."""
        now = self._clock() if now is None else now
        since_time, since_n = (self._start, 0) if final else (self._last_time, self._last_n)
        elapsed = now - since_time
        rate = (self.n - since_n) / elapsed if elapsed > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{self.unit} {self.n}/{self.total} ({100 * self.n // self.total}%)")
        else:
            parts.append(f"{self.unit} {self.n}")
        parts.append(_format_rate(rate))
        if self.total:
            remaining = max(self.total - self.n, 0)
            eta = _format_duration(remaining / rate) if rate > 0 else "?"
            took = _format_duration(now - self._start)
            parts.append(f"ETA {eta}" if remaining else f"took {took}")
        parts += [f"{k} {_format_value(v)}" for k, v in self._postfix.items()]
        return " | ".join(parts)

    def _print(self, *, final: bool) -> None:
        now = self._clock()
        text = self.line(now, final=final)
        if self._tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_time, self._last_n = now, self.n

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
