"""`inpformer watch`: files arriving in a watched folder, completeness, restarts, sorting, draining on SIGTERM, MQTT
to a real broker (Debian's mosquitto, skipped without it). A tiny trained model, as in test_serving."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serving import tiny_model

from inpformer.cli import main
from inpformer.deploy import load_predictor
from inpformer.errors import InpformerError
from inpformer.service import watch as watch_module
from inpformer.service.watch import MqttPublisher, Watcher

SETTLE = 1.0  # the writers below pause at most 0.1 s: far below it, even on a loaded machine


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(model):
    return load_predictor(model)


def png(seed: int, height: int = 40, width: int = 48) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def lines(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Running:
    """A watcher in a thread, stopped (and joined) on leaving the `with`."""

    def __init__(self, watcher: Watcher):
        self.watcher, self.stop = watcher, threading.Event()
        self.thread = threading.Thread(target=watcher.run, args=(self.stop,))

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self.watcher

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def write_slowly(path: Path, data: bytes, pieces: int = 6, pause: float = 0.1) -> None:
    with open(path, "wb") as file:
        for i in range(pieces):
            file.write(data[i * len(data) // pieces : (i + 1) * len(data) // pieces])
            file.flush()
            time.sleep(pause)


def test_files_are_taken_complete_and_once_across_a_restart(predictor, tmp_path):
    incoming, out = tmp_path / "in", tmp_path / "out"
    (incoming / "day1").mkdir(parents=True)
    (incoming / "present.png").write_bytes(png(0))  # there before the watcher starts
    (incoming / "broken.png").write_bytes(b"not an image")
    with Running(Watcher(predictor, incoming, out, settle=SETTLE)) as watcher:
        write_slowly(incoming / "day1" / "slow.png", png(1))  # partial for 0.6 s, never still for SETTLE
        (incoming / ".hidden.png").write_bytes(b"half")
        (incoming / "cam.png.part").write_bytes(png(2))
        os.rename(incoming / "cam.png.part", incoming / "cam.png")  # renamed into place: complete at once
        (incoming / "notes.txt").write_text("ignored")
        wait_until(lambda: len(lines(out)) >= 4)
        time.sleep(2 * SETTLE)  # nothing else is taken
    first = lines(out)
    assert watcher.counts.predicted == 3 and watcher.counts.failed == 1
    by_name = {Path(entry["source"]).name: entry for entry in first}
    assert set(by_name) == {"present.png", "broken.png", "slow.png", "cam.png"}
    assert by_name["broken.png"]["error"].endswith("replace or remove this file (supported: .png, .jpg, .jpeg, "
                                                   ".bmp, .tif, .tiff)")
    for name in ("present.png", "slow.png", "cam.png"):
        entry = by_name[name]
        assert entry["decision"] in ("good", "defective") and entry["category"] == "plate" and "error" not in entry
        assert entry["bytes"] == (incoming / Path(entry["source"]).relative_to(incoming)).stat().st_size
    assert by_name["slow.png"]["source"] == str((incoming / "day1" / "slow.png").resolve())

    # stopped: a file arrives, and the log ends in a line cut by a crash; the restart (polling) takes only the new file
    (incoming / "while-stopped.png").write_bytes(png(3))
    with open(out / "results.jsonl", "ab") as record:
        record.write(b'{"source": "/cut')
    with Running(Watcher(predictor, incoming, out, poll=0.2, settle=0.3)) as restarted:
        wait_until(lambda: restarted.counts.predicted == 1)
        time.sleep(1)
    second = lines(out)
    assert second[:4] == first and [Path(e["source"]).name for e in second[4:]] == ["while-stopped.png"]
    assert restarted.counts.failed == 0


def test_a_rewritten_file_is_taken_again(predictor, tmp_path):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    (incoming / "frame.png").write_bytes(png(0))
    with Running(Watcher(predictor, incoming, out, settle=0.2)):
        wait_until(lambda: len(lines(out)) == 1)
        (incoming / "frame.png").write_bytes(png(1, 30, 30))  # a camera reusing its file name
        wait_until(lambda: len(lines(out)) == 2)
    assert [e["bytes"] for e in lines(out)] == [len(png(0)), len(png(1, 30, 30))]


@pytest.mark.parametrize("sort", ["move", "link"])
def test_sort_puts_images_into_good_defective_and_failed(predictor, tmp_path, sort):
    incoming, out = tmp_path / "in", tmp_path / "out"
    for folder in ("a", "b"):
        (incoming / folder).mkdir(parents=True)
        (incoming / folder / "part.png").write_bytes(png(ord(folder)))  # equal names: part.png and part-2.png
    (incoming / "broken.png").write_bytes(b"junk")
    with Running(Watcher(predictor, incoming, out, sort=sort, settle=0.2)):
        wait_until(lambda: len(lines(out)) == 3)
    entries = lines(out)
    assert sorted(e["sorted"] for e in entries if "error" in e) == ["failed/broken.png"]
    assert sorted(Path(e["sorted"]).name for e in entries) == ["broken.png", "part-2.png", "part.png"]
    for entry in entries:
        target, source = out / entry["sorted"], Path(entry["source"])
        assert target.parent.name == entry.get("decision", "failed") and target.is_file()
        assert source.exists() == (sort == "link")
        if sort == "link":
            assert target.stat().st_ino == source.stat().st_ino  # a hard link: no copy
    # a restart neither predicts nor sorts anything again
    with Running(Watcher(predictor, incoming, out, sort=sort, settle=0.2, poll=0.1)) as again:
        time.sleep(1.5)
    assert again.counts == watch_module.WatchCounts() and len(lines(out)) == 3


def test_a_sort_cut_short_is_finished_at_restart(predictor, tmp_path, monkeypatch):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    (incoming / "part.png").write_bytes(png(0))
    with monkeypatch.context() as patch:
        patch.setattr(Watcher, "_sort", lambda self, source, target: None)  # stopped between record and move
        with Running(Watcher(predictor, incoming, out, sort="move", settle=0.2)):
            wait_until(lambda: len(lines(out)) == 1)
    assert (incoming / "part.png").exists()
    with Running(Watcher(predictor, incoming, out, sort="move", settle=0.2)) as again:
        wait_until(lambda: not (incoming / "part.png").exists())
    [entry] = lines(out)
    assert (out / entry["sorted"]).is_file() and again.counts.predicted == 0


def test_sigterm_finishes_the_images_in_progress_and_exits_0(model, predictor, tmp_path):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "inpformer", "watch", model, str(incoming), "--out", str(out),
                                "--settle", "0.2", "--batch-size", "2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        log = out / "watch.log"
        wait_until(lambda: log.exists() and "watching" in log.read_text())
        for i in range(12):
            (incoming / f"{i:02d}.png").write_bytes(png(i, 200, 200))
        wait_until(lambda: len(lines(out)) >= 1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    done = lines(out)  # every line whole: the batch in progress was finished and written
    assert stdout.startswith(f"watched: {len(done)} image") and "stopping after the images in progress" in stderr
    with Running(Watcher(predictor, incoming, out, settle=0.2)):  # the rest after a restart, none twice
        wait_until(lambda: len(lines(out)) >= 12)
        time.sleep(0.5)
    assert sorted(Path(e["source"]).name for e in lines(out)) == [f"{i:02d}.png" for i in range(12)]


@pytest.mark.parametrize(("options", "message"), [
    (["--poll", "0"], "--poll must be a finite number of seconds > 0, got 0"),
    (["--settle", "-1"], "--settle must be a finite number of seconds >= 0, got -1"),
    (["--settle", "nan"], "--settle must be a finite number of seconds >= 0, got nan"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--max-pixels", "0"], "--max-pixels must be at least 1, got 0"),
    (["--mqtt", "broker:port"], "--mqtt 'broker:port': expected HOST:PORT, e.g. localhost:1883"),
    (["--mqtt", "localhost:1883", "--topic", "line/#"], "--topic 'line/#': give a topic name without the wildcards"),
])
def test_watch_options_are_checked_in_one_line(tmp_path, capsys, options, message):
    assert main(["watch", str(tmp_path / "model.pt"), str(tmp_path), "--out", str(tmp_path / "out"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"inpformer: error: {message}") and err.count("\n") == 1


def test_watch_needs_an_input_folder_and_a_result_log(predictor, tmp_path, capsys):
    assert main(["watch", "run", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "IN_DIR" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text("not json\n")
    with pytest.raises(InpformerError, match="line 1 is not a result of `inpformer watch`; give another --out"):
        Watcher(predictor, tmp_path, tmp_path / "out")


def test_missing_paho_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)
    with pytest.raises(InpformerError, match=r"^--mqtt needs paho-mqtt: pip install 'inpformer\[mqtt\]'$"):
        MqttPublisher("localhost:1883")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")


@pytest.fixture
def broker(tmp_path):
    """Debian's mosquitto on a free loopback port; its HOST:PORT."""
    if not MOSQUITTO:
        pytest.skip("mosquitto not installed (Debian: apt-get install mosquitto)")
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def test_results_are_published_to_a_real_mqtt_broker(predictor, tmp_path, broker):
    mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (pip install -e '.[dev]')")
    received, subscribed = [], threading.Event()
    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.on_message = lambda client, userdata, message: received.append((message.topic, message.qos,
                                                                               json.loads(message.payload)))
    host, port = broker.split(":")
    subscriber.connect(host, int(port))
    subscriber.subscribe("line1/#", qos=1)
    subscriber.loop_start()
    try:
        assert subscribed.wait(30)
        incoming, out = tmp_path / "in", tmp_path / "out"
        incoming.mkdir()
        for i in range(3):
            (incoming / f"{i}.png").write_bytes(png(i))
        (incoming / "bad.png").write_bytes(b"junk")
        publisher = MqttPublisher(broker, "line1/camera2")
        try:
            with Running(Watcher(predictor, incoming, out, settle=0.2, publish=publisher)):
                wait_until(lambda: len(lines(out)) == 4)
        finally:
            publisher.close()
        wait_until(lambda: len(received) == 4, timeout=30)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
    assert sorted((e["source"], e.get("score")) for e in lines(out)) == sorted(
        (payload["source"], payload.get("score")) for *_, payload in received)
    assert {(topic, qos) for topic, qos, _ in received} == {("line1/camera2", 1)}
    assert [payload for *_, payload in received] == lines(out)  # the very lines, in order


def test_an_unreachable_broker_is_one_line():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(InpformerError) as error:
        MqttPublisher(address)
    assert str(error.value) == f"--mqtt {address}: cannot connect to the broker (Connection refused)"
