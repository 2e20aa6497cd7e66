"""The examples of README.md and docs/*.md still work, on a tiny model and generated images.

- Every command line is parsed by the real `inpformer.cli.build_parser()`, so a renamed option or an invalid
  choice fails here: each `inpformer ...` line of a fenced bash block (`\\` continuations joined, comments
  dropped; `torchrun ... -m inpformer ...` too) and each `$ inpformer ...` line of a transcript in any block. The
  option synopsis (``` text blocks, lines starting with `inpformer COMMAND`) may only name existing options.
- The README's examples run in document order, in a temporary folder prepared with generated data at the paths
  they name: `data/mvtec` (an MVTec AD tree, categories bottle and screw, defect type broken_large) and `camera/`
  (one image for `watch` to find). Substitutions, each explicit:
  * `inpformer train` gets TINY appended (a random tiny ViT at 64 px, 30 steps: seconds instead of minutes);
  * `inpformer serve` gets `--port` of a free port and runs as a subprocess until `/health` answers; the `curl`
    lines after it in its block post to that port, and the server is stopped at the end of the block;
  * `inpformer watch` runs as a subprocess until its first result line, then gets SIGTERM and must exit with 0;
  * other `inpformer` commands run in this process through `inpformer.cli.main`;
  * in Python examples, the arguments of every `INPFormer(preset=...)` call become those of TINY_CALL.
- The Python examples of docs/*.md run the same way, each in a fresh prepared folder, and there
  `inpformer.demo.elpv_samples()` (the demo's ELPV images) gives 16 of its training images and 4 good and 4
  defective test images (ELPV_SUBSET) instead of 150 and 100.
- What runs in this process runs on one PyTorch thread: on a CPU shared with other jobs, idle OpenMP threads
  spinning for work made these examples several times slower (the tiny model gains nothing from more threads).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_mvtec, save_image, textured_image, tiny_cli

from inpformer import demo
from inpformer.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
TINY = tiny_cli()
TINY_CALL = ('INPFormer(preset="cpu", backbone="tiny_random", image_size=64, crop_size=56, iterations=30, '
             "batch_size=4, warmup_iterations=5)")
PRESET_CALL = re.compile(r"INPFormer\(\s*preset=[^()]*\)")
DOCUMENTED_PORT = "127.0.0.1:8000"
STARTUP_SECONDS = 60
ELPV_SUBSET = {"train": 16, "good": 4, "defective": 4}


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, its first line's number in the file, and its text."""

    path: Path
    line: int
    language: str
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line + offset}"


def fenced_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [Block(path, text.count("\n", 0, m.start(2)) + 1, m.group(1), m.group(2))
            for m in re.finditer(r"(?ms)^```(\w*)\n(.*?)^```$", text)]


def command_lines(block: Block, prompt: str = "") -> Iterator[tuple[int, list[str]]]:
    """(line offset, tokens after `prompt`) of each line of the block that starts with `prompt`, `\\` continuations
    joined and comments dropped."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i]
        i += 1
        tokens = shlex.split(line.removeprefix(prompt), comments=True) if line.startswith(prompt) else []
        if tokens:
            yield start, tokens


def inpformer_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments after `inpformer` (or `python -m inpformer`, `torchrun ... -m inpformer`), else None."""
    if tokens[0] == "inpformer":
        return tokens[1:]
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "inpformer":
            return tokens[i + 2:]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for path in [README, *DOCS]:
        for block in fenced_blocks(path):
            for offset, tokens in command_lines(block, "" if block.language == "bash" else "$ "):
                arguments = inpformer_arguments(tokens)
                if arguments is not None:
                    commands.append((block.where(offset), arguments))
    return commands


def synopsis_lines() -> list[tuple[str, str, list[str]]]:
    """(where, command, options) of each `inpformer COMMAND ...` line of the text blocks (the option synopsis)."""
    lines = []
    for path in [README, *DOCS]:
        for block in fenced_blocks(path):
            if block.language == "text":
                for offset, tokens in command_lines(block, "inpformer "):
                    options = [o.strip("[]|.").split("=")[0] for o in tokens if o.lstrip("[").startswith("--")]
                    lines.append((block.where(offset), tokens[0], options))
    return lines


def python_blocks(paths: list[Path]) -> list[Block]:
    return [block for path in paths for block in fenced_blocks(path) if block.language == "python"]


@pytest.mark.parametrize(("where", "arguments"), [pytest.param(*c, id=c[0]) for c in documented_commands()])
def test_documented_command_line_parses(where, arguments, capsys):
    try:
        build_parser().parse_args(arguments)
    except SystemExit as error:
        assert error.code == 0, f"{where}: inpformer {shlex.join(arguments)}\n{capsys.readouterr().err}"


def test_documentation_shows_commands_and_a_synopsis():
    """Guards the extraction above: if it found nothing, the tests above would pass on nothing."""
    commands = {arguments[0] for _, arguments in documented_commands()}
    assert {"train", "test", "predict", "export", "serve", "watch", "calibrate", "import", "audit"} <= commands
    assert {command for _, command, _ in synopsis_lines()} >= commands


@pytest.mark.parametrize(("where", "command", "options"), [pytest.param(*s, id=s[0]) for s in synopsis_lines()])
def test_synopsis_names_existing_options(where, command, options):
    with contextlib.redirect_stdout(io.StringIO()) as usage, contextlib.suppress(SystemExit):
        build_parser().parse_args([command, "--help"])
    unknown = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", usage.getvalue())]
    assert not unknown, f"{where}: inpformer {command} has no {', '.join(unknown)}"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"(?ms)^```.*?^```$", "", path.read_text())
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"(?m)^#+ (.*)$", text)}


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_links_between_documents_resolve(path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A folder holding what the examples name: data/mvtec and camera/ with one image; the current directory."""
    make_mvtec(tmp_path / "data" / "mvtec", categories=("bottle", "screw"), n_train=8, n_good_test=2,
               defect_types={"broken_large": 2})
    save_image(tmp_path / "camera" / "part_0001.png", textured_image(np.random.default_rng(0), 64))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(arguments: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inpformer", *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(process: subprocess.Popen, ready: Callable[[], bool], where: str) -> None:
    """Polls `ready()` until it is true; fails with the process's output if it exits or takes too long."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{where}: not ready after {STARTUP_SECONDS} s (exit {process.poll()}):\n"
                        f"{process.communicate()[0]}")
        time.sleep(0.2)


def health_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_watch(process: subprocess.Popen, where: str) -> None:
    """SIGTERM, as `systemctl stop` sends: the watcher finishes its batch and exits with 0."""
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, f"{where}: exit {process.returncode} after SIGTERM:\n{output}"


def run_inpformer(arguments: list[str], where: str) -> None:
    if arguments[0] == "train":
        arguments = [*arguments, *TINY]
    assert main(arguments) == 0, f"{where}: inpformer {shlex.join(arguments)} failed"


def watch(arguments: list[str], where: str) -> None:
    out = Path(arguments[arguments.index("--out") + 1])
    process = start(arguments)
    results = out / "results.jsonl"
    wait_for(process, lambda: results.is_file() and results.read_text().endswith("\n"), where)
    stop_watch(process, where)
    first = json.loads(results.read_text().splitlines()[0])
    assert first["decision"] in ("good", "defective"), first
    if "--sort" in arguments:
        assert (out / first["sorted"]).is_file(), first


def curl(tokens: list[str], port: int | None, where: str) -> None:
    assert port is not None, f"{where}: curl needs an `inpformer serve` before it in the same block"
    tokens = [t.replace(DOCUMENTED_PORT, f"127.0.0.1:{port}") for t in tokens]
    result = subprocess.run(tokens, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{where}: {shlex.join(tokens)}: {result.stderr}"
    results = json.loads(result.stdout)["results"]
    assert len(results) == 1 and results[0]["decision"] in ("good", "defective"), results


def run_bash(block: Block) -> None:
    server, port = None, None
    try:
        for offset, tokens in command_lines(block):
            where, arguments = block.where(offset), inpformer_arguments(tokens)
            if arguments and arguments[0] == "serve":
                port = free_port()
                server = start([*arguments, "--port", str(port)])
                wait_for(server, functools.partial(health_answers, port), where)
            elif arguments and arguments[0] == "watch":
                watch(arguments, where)
            elif arguments:
                run_inpformer(arguments, where)
            elif tokens[0] == "curl":
                curl(tokens, port, where)
            else:
                pytest.fail(f"{where}: test_docs.py does not know how to run {tokens[0]}")
    finally:
        if server is not None:
            server.terminate()
            server.communicate(timeout=30)


def run_python(block: Block) -> None:
    code, calls = PRESET_CALL.subn(TINY_CALL, block.text)
    assert calls == block.text.count("INPFormer("), (
        f"{block.where()}: an INPFormer(...) without preset= would train a real model; give it preset=")
    exec(compile(code, block.where(), "exec"), {"__name__": "__doc_example__"})


@pytest.mark.slow
def test_readme_examples_run_in_order(workspace, one_thread):
    blocks = [b for b in fenced_blocks(README) if b.language in ("bash", "python")]
    examples = blocks[1:]  # the first block is `make demo` / `make test`, which this very test is part of
    assert "make test" in blocks[0].text and examples
    for block in examples:
        if block.language == "bash":
            run_bash(block)
        else:
            run_python(block)
    assert (workspace / "runs" / "mvtec" / "report.html").is_file()
    assert (workspace / "runs" / "mvtec.pt").is_file()


@pytest.fixture
def small_elpv(monkeypatch) -> None:
    """`inpformer.demo.elpv_samples()` gives ELPV_SUBSET of the demo's images."""
    train, test = demo.elpv_samples()
    good = [s for s in test if s.label == 0][: ELPV_SUBSET["good"]]
    defective = [s for s in test if s.label == 1][: ELPV_SUBSET["defective"]]
    monkeypatch.setattr(demo, "elpv_samples", lambda: (train[: ELPV_SUBSET["train"]], good + defective))


@pytest.mark.slow
@pytest.mark.parametrize("block", python_blocks(DOCS), ids=lambda b: b.where())
def test_docs_python_example_runs(block, workspace, small_elpv, one_thread):
    run_python(block)
