"""Every command in the README and docs/ works as written, from the repository root.

The commands are read from the documents' bash blocks, so a command that changes there is
tested as changed. Long runs are shortened by appending flags (argparse takes the last
occurrence of an option), and outputs that would land in the repository go to a scratch
folder. Commands this test does not run say why: the set-up is what CI itself runs
(.ci/run), the suite is this suite, and a few need root or real hosts (the emulated-host
tests in test_multiprocess.py run the same tool). A command matched by no rule below fails
the test: a new command in the docs needs a rule here.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = pathlib.Path(sys.executable).parent  # the environment the suite runs in

TINY_TRAIN = ["--model", "resnet18", "--width", "4", "--steps", "2", "--eval-every", "0"]
SHORT_BENCH = ["-b", "4K", "-e", "16K", "-n", "2", "-w", "1"]

# (pattern, what to append, or the reason it is not run here)
RULES = [
    (r"^python3 -m venv \.venv$", "set-up: .ci/run runs it on a fresh machine"),
    (r"^\.venv/bin/pip install ", "set-up: .ci/run runs it on a fresh machine"),
    (r"^\.venv/bin/pytest$", "the test suite itself"),
    (r"^cmake ", "the C++ tests: .ci/run builds and runs them"),
    (r"^ctest ", "the C++ tests: .ci/run builds and runs them"),
    (
        r"emulated_hosts\.py|^L=|\$L |^H=",
        "needs root: test_multiprocess.py runs the emulated hosts",
    ),
    (r"-hosts node1,node2", "needs real hosts"),
    (r"^bash tools/gpu_check\.sh", "needs an NVIDIA GPU: the GPU machine runs it"),
    (r"^\.venv/bin/python examples/train\.py --help$", []),
    (r"^\.venv/bin/python examples/train\.py", TINY_TRAIN),
    (
        r"^\.venv/bin/python examples/bench_train\.py",
        ["--model", "resnet18", "--width", "4", "--image-size", "8", "--batch-size", "16"]
        + ["--steps", "1", "--warmup", "0"],
    ),
    (r"^\.venv/bin/mpiexec -n 2 \.venv/bin/python examples/train\.py", TINY_TRAIN),
    (
        r"^\.venv/bin/mpiexec -n 2 \.venv/bin/python examples/bench_train\.py",
        ["--model", "resnet18", "--width", "4", "--image-size", "8", "--batch-size", "16"]
        + ["--steps", "1", "--warmup", "0", "--host-devices", "2"],
    ),
    (r"^\.venv/bin/mpiexec -n 8 ", "8 processes: the same program as the -n 2 run below"),
    (r"^\.venv/bin/mpiexec -n 2 \.venv/bin/python -m jax_ddl\.bench", ["-b", "4K", "-e", "8K"]),
    (r"^\.venv/bin/python -m jax_ddl\.bench", SHORT_BENCH),
    (r"^\.venv/bin/python -m jax_ddl\.calibrate", ["--fault-sizes", "1M", "-n", "2"]),
    (r"^\.venv/bin/python -m jax_ddl\.model", []),
    (r"^\.venv/bin/python examples/plot_step_split\.py", []),
    (r"^\.venv/bin/python tools/trace_table\.py", []),
]


def _commands():
    """(document, command) for every command line of every bash block."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                for part in filter(None, (p.strip() for p in line.split("&&"))):
                    found.append((doc.relative_to(ROOT).as_posix(), " ".join(part.split())))
    return found


COMMANDS = _commands()


def _rule(command):
    matches = [action for pattern, action in RULES if re.search(pattern, command)]
    assert matches, f"no rule for the documented command {command!r}: add one to RULES"
    return matches[0]


def test_every_documented_command_has_a_rule():
    assert len(COMMANDS) > 10
    for _, command in COMMANDS:
        _rule(command)


@pytest.mark.parametrize(
    "doc, command",
    sorted(set(COMMANDS)),
    ids=[f"{d}: {c[:60]}" for d, c in sorted(set(COMMANDS))],
)
def test_documented_command_runs_from_the_repository_root(doc, command, tmp_path):
    action = _rule(command)
    if isinstance(action, str):
        pytest.skip(action)
    argv = shlex.split(command) + action
    argv = [str(BIN / a[len(".venv/bin/") :]) if a.startswith(".venv/bin/") else a for a in argv]
    if "examples/train.py" in command:
        argv += ["--out-dir", str(tmp_path / "run"), "--no-progress"]
    for flag, name in (
        ("--json", "bench.json"),
        ("--out", "plot.png"),
        ("--plot", "plot.png"),
        ("--trace", "trace.json"),
    ):
        if flag in argv:  # write the scratch folder, not docs/results
            argv[argv.index(flag) + 1] = str(tmp_path / name)
    # As a user's shell would have it: not the suite's x64 and device-count settings.
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
