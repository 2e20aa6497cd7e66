"""Watched folders: `inpformer watch RUN IN_DIR --out OUT_DIR` predicts images as cameras write them.

A file is taken once it is complete: at once when it was renamed into place (a rename is atomic, so the writer is
done), otherwise once its size and modification time have not changed for `settle` seconds. Only visible files
with an image extension count, so temporary names (`.name`, `*.tmp`, `*.part`) are never taken.

OUT_DIR/results.jsonl is the record: one line per image (the prediction's JSON, or {source, error}), flushed and
fsynced before the image is sorted or published. At start it is read back; an image whose path, size and
modification time it holds is not predicted again (and a sort it did not finish is finished), any other image in
IN_DIR is taken as if it had just arrived. So a restart neither loses an image nor predicts one twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..data.images import IMAGE_EXTENSIONS, MAX_PIXELS, read_image
from ..errors import InpformerError
from ..files import output_folder
from ..inference import Predictor

log = logging.getLogger("inpformer")
RESULTS = "results.jsonl"
SORTS = ("move", "link")
SORTED = ("good", "defective", "failed")  # folders of OUT_DIR that --sort fills, never watched
DEFAULT_TOPIC = "inpformer/results"
RESCAN_SECONDS = 30.0  # with file events, a full scan now and then catches what the events missed
FALLBACK_POLL_SECONDS = 1.0


@dataclass
class WatchCounts:
    """What a watcher did: images predicted (of them defective) and files that failed."""

    predicted: int = 0
    defective: int = 0
    failed: int = 0


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float  # monotonic time the size and mtime were first seen as they are
    renamed: bool = False


@dataclass
class _Item:
    path: Path
    size: int
    mtime_ns: int
    entry: dict = field(default_factory=dict)
    image: np.ndarray | None = None


class Watcher:
    """Predicts the images arriving in `in_dir` into `out` (see the module's docstring); `run` until `stop` is set.

    `sort` ("move" or "link") puts each image into out/good, out/defective or out/failed; `poll` (seconds) scans the
    folder instead of following file events; `publish` is called with every result line after it is written."""

    def __init__(self, predictor: Predictor, in_dir: str | Path, out: str | Path, sort: str | None = None,
                 poll: float | None = None, settle: float = 1.0, batch_size: int = 8, category: str | None = None,
                 publish: Callable[[dict], None] | None = None):
        check_options(sort, poll, settle, batch_size)
        self.in_dir = _input_folder(in_dir)
        if category is not None:
            predictor.calibration.for_category(category)  # fails early, naming the known categories
        self.predictor, self.category, self.publish = predictor, category, publish
        self.sort, self.poll, self.settle, self.batch_size = sort, poll, settle, batch_size
        self.out = output_folder(out, "--out").resolve()
        self.sorted_dirs = [self.out / name for name in SORTED]
        if sort:
            for folder in self.sorted_dirs:
                output_folder(folder, "--out")
        self.counts = WatchCounts()
        self._events: queue.SimpleQueue[tuple[str, bool] | None] = queue.SimpleQueue()
        self._candidates: dict[Path, _Candidate] = {}
        self._done: set[tuple[str, int, int]] = set()  # (source, size, mtime_ns) of recorded images
        self._unsorted = self._read_record()
        self._record = open(self.out / RESULTS, "ab")  # noqa: SIM115 (held open while the watcher runs)

    def run(self, stop: threading.Event) -> WatchCounts:
        """Watches until `stop` is set; the batch in progress is finished and recorded first."""
        observer = None if self.poll else self._observe()
        interval = self.poll or (RESCAN_SECONDS if observer else FALLBACK_POLL_SECONDS)
        tick = max(0.02, min(0.25, self.settle / 4, interval))
        log.info("watching %s (%s, images complete after %g s unchanged); results: %s", self.in_dir,
                 "file events" if observer else f"polling every {interval:g} s", self.settle, self.out / RESULTS)
        next_scan = 0.0
        try:
            self._finish_sorts()
            while not stop.is_set():
                if self._take_events() or time.monotonic() >= next_scan:
                    self._scan()
                    next_scan = time.monotonic() + interval
                ready = self._ready()
                for start in range(0, len(ready), self.batch_size):
                    if stop.is_set():
                        break
                    self._process(ready[start : start + self.batch_size])
                stop.wait(tick)
        finally:
            if observer is not None:
                _stop_observer(observer)
            self._record.close()
        return self.counts

    def _observe(self):
        """A started watchdog observer feeding `_events`, or None (polling) when file events are unavailable."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            events = self._events

            class Handler(FileSystemEventHandler):
                def on_any_event(self, event) -> None:
                    if event.is_directory:
                        if event.event_type in ("created", "moved"):
                            events.put(None)  # a folder arrived: scan for its files
                    elif event.event_type == "moved":
                        events.put((os.fsdecode(event.dest_path), True))
                    elif event.event_type in ("created", "modified", "closed"):
                        events.put((os.fsdecode(event.src_path), False))

            observer = Observer()
            observer.schedule(Handler(), str(self.in_dir), recursive=True)
            observer.start()
            return observer
        except (ImportError, OSError) as error:  # no watchdog, or no inotify watches left
            log.warning("file events unavailable (%s); polling every %g s instead", error, FALLBACK_POLL_SECONDS)
            return None

    def _take_events(self) -> bool:
        """Notes the files named by file events; True when a folder event asks for a full scan."""
        rescan = False
        with contextlib.suppress(queue.Empty):
            while True:
                event = self._events.get_nowait()
                if event is None:
                    rescan = True
                else:
                    self._note(Path(event[0]), renamed=event[1])
        return rescan

    def _scan(self) -> None:
        seen = set()
        for folder, folders, files in os.walk(self.in_dir):
            here = Path(folder)
            folders[:] = sorted(name for name in folders if not name.startswith(".")
                                and here / name not in self.sorted_dirs)
            for name in files:
                seen.add(str(here / name))
                self._note(here / name)
        # what is no longer in the folder cannot come back as the same file: forget it
        self._done = {key for key in self._done if key[0] in seen}

    def _note(self, path: Path, renamed: bool = False) -> None:
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or self._is_sorted(path):
            return
        try:
            stat = path.stat()
        except OSError:
            self._candidates.pop(path, None)
            return
        if (str(path), stat.st_size, stat.st_mtime_ns) in self._done:
            return
        known = self._candidates.get(path)
        if known is None or (known.size, known.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            self._candidates[path] = _Candidate(stat.st_size, stat.st_mtime_ns, time.monotonic(), renamed)
        elif renamed:
            known.renamed = True

    def _is_sorted(self, path: Path) -> bool:
        return any(path.is_relative_to(folder) for folder in self.sorted_dirs)

    def _ready(self) -> list[_Item]:
        """The complete candidates, oldest first (they leave the candidates)."""
        now, ready = time.monotonic(), []
        for path, known in list(self._candidates.items()):
            try:
                stat = path.stat()
            except OSError:  # gone before it was complete
                del self._candidates[path]
                continue
            if (known.size, known.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self._candidates[path] = _Candidate(stat.st_size, stat.st_mtime_ns, now)
            elif known.renamed or now - known.since >= self.settle:
                del self._candidates[path]
                ready.append(_Item(path, known.size, known.mtime_ns))
        return sorted(ready, key=lambda item: (item.mtime_ns, str(item.path)))

    def _process(self, items: list[_Item]) -> None:
        """Predicts a batch of complete files and records, sorts and publishes each result."""
        readable = []
        for item in items:
            try:
                item.image = read_image(item.path, max_pixels=self.predictor.max_pixels)
                readable.append(item)
            except InpformerError as error:
                item.entry = {"source": str(item.path), "error": str(error)}
        for item, outcome in zip(readable, self._predict(readable), strict=True):
            item.entry = outcome if isinstance(outcome, dict) else {"source": str(item.path), "error": outcome}
            item.image = None
        reserved: set[Path] = set()
        for item in items:
            self._finish(item, reserved)

    def _predict(self, items: list[_Item]) -> list[dict | str]:
        """Each item's prediction JSON, or the reason it failed (a failing batch is retried image by image)."""
        if not items:
            return []
        try:
            predictions = self.predictor.predict([i.image for i in items], [str(i.path) for i in items],
                                                 self.category)
            return [prediction.to_json() for prediction in predictions]
        except Exception as error:
            if len(items) > 1:
                return [outcome for item in items for outcome in self._predict([item])]
            log.exception("%s: prediction failed", items[0].path)
            return [f"{items[0].path}: prediction failed ({type(error).__name__}: {str(error)[:200]})"]

    def _finish(self, item: _Item, reserved: set[Path]) -> None:
        entry = item.entry | {"time": datetime.now().astimezone().isoformat(timespec="milliseconds"),
                              "bytes": item.size, "mtime_ns": item.mtime_ns}
        target = None
        if self.sort:
            target = _free_name(self.out / entry.get("decision", "failed"), item.path.name, reserved)
            entry["sorted"] = str(target.relative_to(self.out))
        self._record.write(json.dumps(entry).encode() + b"\n")
        self._record.flush()
        os.fsync(self._record.fileno())
        self._done.add((str(item.path), item.size, item.mtime_ns))
        if target is not None:
            self._sort(item.path, target)
        if "error" in entry:
            self.counts.failed += 1
            log.error("%s", entry["error"])
        else:
            self.counts.predicted += 1
            self.counts.defective += entry["decision"] == "defective"
            log.info("%s: %s (score %.4f, threshold %.4f)", item.path.name, entry["decision"], entry["score"],
                     entry["threshold"])
        if self.publish is not None:
            self.publish(entry)

    def _sort(self, source: Path, target: Path) -> None:
        try:
            if target.exists():
                log.warning("%s: %s exists already; left the image where it is", source, target)
            elif self.sort == "move":
                shutil.move(source, target)
            else:
                try:
                    os.link(source, target)
                except OSError:  # another file system, or one without hard links
                    os.symlink(source, target)
        except OSError as error:
            log.error("%s: cannot %s it to %s (%s); it stays in place", source, self.sort, target,
                      error.strerror or error)

    def _read_record(self) -> list[tuple[tuple[str, int, int], Path]]:
        """Reads results.jsonl into the set of done images; returns the (image, target) sorts it shows unfinished.
        A last line cut by a crash is dropped: its image was not done."""
        path = self.out / RESULTS
        if not path.exists():
            return []
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropped an incomplete last line (the watcher stopped while writing it)", path)
            os.truncate(path, end)
        unsorted = []
        for number, line in enumerate(data[:end].splitlines(), 1):
            try:
                entry = json.loads(line)
                key = (str(entry["source"]), int(entry["bytes"]), int(entry["mtime_ns"]))
            except (ValueError, KeyError, TypeError):
                raise InpformerError(f"{path}: line {number} is not a result of `inpformer watch`; give another "
                                     "--out") from None
            self._done.add(key)
            if self.sort and "sorted" in entry:
                unsorted.append((key, self.out / entry["sorted"]))
        return unsorted

    def _finish_sorts(self) -> None:
        """Sorts the recorded images that are still in IN_DIR as they were (a stop between record and sort)."""
        for (source, size, mtime_ns), target in self._unsorted:
            path = Path(source)
            with contextlib.suppress(OSError):
                stat = path.stat()
                if (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns) and not target.exists():
                    log.info("%s: finishing its sort to %s", path, target)
                    self._sort(path, target)
        self._unsorted = []


def _stop_observer(observer) -> None:
    # watchdog's inotify emitter may log its own shutdown race ("queue_events() called when the thread is inactive")
    # as an error: harmless, and not the user's concern
    quiet = logging.getLogger("watchdog.observers.inotify")
    disabled, quiet.disabled = quiet.disabled, True
    try:
        observer.stop()
        observer.join()
    finally:
        quiet.disabled = disabled


def _free_name(folder: Path, name: str, reserved: set[Path]) -> Path:
    """folder/name, or folder/stem-2.ext, -3... when taken (on disk or by this batch)."""
    target, count, stem, suffix = folder / name, 1, Path(name).stem, Path(name).suffix
    while target.exists() or target in reserved:
        count += 1
        target = folder / f"{stem}-{count}{suffix}"
    reserved.add(target)
    return target


def _input_folder(in_dir: str | Path) -> Path:
    path = Path(in_dir).resolve()
    if not path.is_dir():
        raise InpformerError(f"IN_DIR {in_dir}: not a folder; give the folder the cameras write into")
    return path


def check_options(sort: str | None, poll: float | None, settle: float, batch_size: int) -> None:
    """One-line errors naming the option, before any work."""
    if sort is not None and sort not in SORTS:
        raise InpformerError(f"unknown --sort {sort!r}; choose one of: {', '.join(SORTS)}")
    if poll is not None and not 0 < poll < math.inf:
        raise InpformerError(f"--poll must be a finite number of seconds > 0, got {poll:g}")
    if not 0 <= settle < math.inf:
        raise InpformerError(f"--settle must be a finite number of seconds >= 0, got {settle:g}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InpformerError(f"--batch-size must be at least 1, got {batch_size!r}")


class MqttPublisher:
    """Publishes each result as one JSON message at QoS 1 (paho's network thread delivers it, and keeps it while
    the broker is away); `close` waits a while for the broker's acknowledgements."""

    def __init__(self, address: str, topic: str = DEFAULT_TOPIC):
        host, port = parse_address(address)
        if not topic or "+" in topic or "#" in topic:
            raise InpformerError(f"--topic {topic!r}: give a topic name without the wildcards + and #")
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise InpformerError("--mqtt needs paho-mqtt: pip install 'inpformer[mqtt]'") from None
        self.topic = topic
        self._pending: set[int] = set()  # message ids sent, not yet acknowledged
        self._early: set[int] = set()  # acknowledged before `publish` returned their id
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"inpformer-watch-{os.getpid()}")
        self.client.on_publish = self._acknowledged
        try:
            self.client.connect(host, port)
        except (OSError, ValueError) as error:
            raise InpformerError(f"--mqtt {address}: cannot connect to the broker "
                                 f"({getattr(error, 'strerror', None) or error})") from None
        self.client.loop_start()

    def __call__(self, entry: dict) -> None:
        mid = self.client.publish(self.topic, json.dumps(entry), qos=1).mid
        with self._lock:
            if mid in self._early:
                self._early.discard(mid)
            else:
                self._pending.add(mid)

    def _acknowledged(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._early.add(mid)

    def close(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._pending:
            log.warning("MQTT: %d messages not acknowledged by the broker; results.jsonl has them",
                        len(self._pending))
        self.client.disconnect()
        self.client.loop_stop()


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or HOST, port 1883) of `--mqtt`."""
    host, colon, port = address.rpartition(":")
    if not colon:
        host, port = address, "1883"
    host = host.strip("[]")  # [::1]:1883
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InpformerError(f"--mqtt {address!r}: expected HOST:PORT, e.g. localhost:1883")
    return host, int(port)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C or SIGTERM set `stop` (the watcher drains); a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def handler(number, frame) -> None:
        log.info("stopping after the images in progress (again to stop at once)")
        stop.set()
        for again in previous:
            signal.signal(again, signal.default_int_handler)

    for number in previous:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def watch(target: str | Path, in_dir: str | Path, out: str | Path, runtime: str = "torch", model: str | None = None,
          category: str | None = None, sort: str | None = None, poll: float | None = None, settle: float = 1.0,
          batch_size: int = 8, max_pixels: int = MAX_PIXELS, mqtt: str | None = None, topic: str = DEFAULT_TOPIC,
          stop: threading.Event | None = None) -> WatchCounts:
    """Watches `in_dir` with the model of `target` until `stop` is set, or until Ctrl-C / SIGTERM (when called from
    the main thread); logs to out/watch.log. Returns what it did."""
    from ..deploy import load_predictor
    from ..runs import log_to_file

    check_options(sort, poll, settle, batch_size)
    if max_pixels < 1:
        raise InpformerError(f"--max-pixels must be at least 1, got {max_pixels}")
    _input_folder(in_dir)
    out = output_folder(out, "--out")
    publisher = MqttPublisher(mqtt, topic) if mqtt else None
    stop = stop or threading.Event()
    try:
        with log_to_file(out / "watch.log"), _stop_on_signals(stop):
            predictor = load_predictor(target, runtime, model, category)
            predictor.max_pixels = max_pixels
            watcher = Watcher(predictor, in_dir, out, sort, poll, settle, batch_size, category, publisher)
            return watcher.run(stop)
    finally:
        if publisher is not None:
            publisher.close()
