"""The newcomer's path through the real CLI: version and help, the bundled example, the usual mistakes, a
study written to a log, and a resume with a smaller budget; the texts a new user reads are asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from optimizer.cli import main
from optimizer.model import examples
from optimizer.paths import cache_dir
from studies import FAST_CLI

# What the help showed before it spoke the user's words: the annotations' own names.
ANNOTATION_TYPES = re.compile(r"<(bool|int|float|str|path|list\[[^\]]*\])>")


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version_and_short_help(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and re.match(r"optimize \S+; (bundled Triton|no bundled Triton)", out)
    code, out, _ = _run(capsys, "-h")
    assert code == 0 and "Usage: optimize" in out and "--version" in out


def test_help_speaks_the_users_words(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # as a terminal of the usual width
    code, out, _ = _run(capsys, "study", "--help")
    assert code == 0
    assert not ANNOTATION_TYPES.search(out), ANNOTATION_TYPES.search(out)
    assert "INTEGER" in out and "PATH" in out and "NUMBER" in out and "TEXT" in out
    assert "default 1,2,4,8,16,32,64" in re.sub(r"[\s│]+", " ", out).replace(", ", ",")
    assert "…" not in out  # no option's text cut (--docker-image-tag's was)
    code, out, _ = _run(capsys, "inspect", "-h")
    assert code == 0 and "several --model" not in out and "bundled example" in out
    assert not ANNOTATION_TYPES.search(out) and re.search(r"MODEL\s+PATH\s", out)  # the argument's type too


def test_help_imports_nothing_heavy():
    """``--help`` starts fast because its path leaves numpy, optuna, onnx and yaml to the commands."""
    probe = (
        "import sys\n"
        "from optimizer.cli import main\n"
        "code = main(['study', '--help'])\n"
        "print(code, sorted({m.split('.')[0] for m in sys.modules} & "
        "{'numpy', 'optuna', 'onnx', 'onnxruntime', 'tritonclient', 'yaml'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "0 []"


def test_shell_completion_installs_and_completes_commands_and_choices(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    optimize = [sys.executable, "-m", "optimizer"]
    done = subprocess.run(
        [*optimize, "--install-completion", "bash"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "bash completion installed" in done.stdout
    script = tmp_path / ".bash_completions" / "optimize.sh"
    assert "_OPTIMIZE_COMPLETE=complete_bash" in script.read_text()
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()

    def complete(words: str) -> list[str]:
        shell = {**env, "_OPTIMIZE_COMPLETE": "complete_bash", "COMP_WORDS": words}
        shell["COMP_CWORD"] = str(len(words.split()) - (0 if words.endswith(" ") else 1))
        return subprocess.run(optimize, env=shell, capture_output=True, text=True).stdout.split()

    assert complete("optimize st") == ["study"]
    assert complete("optimize study --sampler ") == ["tpe", "random", "grid"]


def test_inspect_without_a_model_shows_the_bundled_example_with_the_shapes_a_study_sends(capsys):
    code, out, _ = _run(capsys, "inspect")
    assert code == 0
    path = examples.example_model(cache_dir() / "examples")
    assert str(path) in re.sub(r"\s+", "", out) or path.name in out
    assert "request shapes: input_ids:128, attention_mask:128" in out
    code, out, _ = _run(capsys, "inspect", str(path))  # the same file named by its path
    assert code == 0 and "request shapes: input_ids:128, attention_mask:128" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["study", "--budget", "three"],
            "Error: Invalid value for '--budget': 'three' is not a whole number",
        ),
        (
            ["study", "--sampler", "tpee"],
            "Error: Invalid value for '--sampler': 'tpee' is not one of 'tpe', 'random', 'grid'.",
        ),
    ],
)
def test_usage_mistakes_are_said_in_the_tools_words(capsys, args, message):
    code, out, err = _run(capsys, *args)
    assert code == 2 and err.strip() == message and "Value error" not in err


def test_a_gpu_space_on_a_cpu_machine_says_what_to_use_instead_in_one_line(capsys, tmp_path):
    code, _, err = _run(capsys, "study", "--space", "gpu", "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert code == 4 and err.startswith("Error: ")  # no blank line before it
    assert len(err.strip().splitlines()) == 1 and "use a space of those (--space cpu" in err


@pytest.mark.server
def test_a_study_written_to_a_log_reads_whole_and_a_resume_with_a_smaller_budget_says_so(
    models, tmp_path, capsys
):
    storage = f"sqlite:///{tmp_path / 'first.db'}"
    args = ["study", "--model", str(models["mlp"]), "--study-name", "first", "--storage", storage]
    code, out, err = _run(capsys, *args, "--budget", "3", *FAST_CLI)
    assert code == 0
    # The default budget says how it was rounded (a small MLP's p99 x 10 is below the 5 ms minimum).
    assert re.search(
        r"latency budget: \d+ ms \(10 x the median .*: (the minimum of 5 ms|.* rounded up to a whole ms);",
        err,
    )
    trial_lines = [line for line in err.splitlines() if line.startswith("#")]
    # The baseline's line and every trial's, in order (a proposal that repeats a measured config has its own
    # line and does not count toward the budget, so a study of 3 may show more).
    numbers = [line.split()[0] for line in trial_lines]
    assert numbers == [f"#{n}" for n in range(len(numbers))] and len(numbers) >= 3, trial_lines
    assert not any("failed: interrupted" in line for line in trial_lines)
    assert "…" not in out + err and not err.startswith("\n")  # a log gets whole lines and tables
    best = next(line for line in out.splitlines() if line.lstrip("│ ").startswith("best"))
    assert re.search(r"cpu \S+ mbs=\d+ .*inst=\d+ thr=\S+ ", best)  # the config's summary whole, one line
    # Without a confirmation (--confirm 0) the speed-up says it divides the two trials' own figures.
    ratio, best_figure, baseline_figure = re.search(
        r"speed-up over baseline: ([\d.]+)x \(single measurements: ([\d.]+) / ([\d.]+) inf/s\)", out
    ).groups()
    assert float(ratio) == pytest.approx(float(best_figure) / float(baseline_figure), abs=0.01)
    assert best_figure in best and "confirmed mean" not in out
    # The exported config itself, whole, as the log's reader needs it.
    assert re.search(r"exported .*first/best/.*/config.pbtxt:\n", out) and "max_batch_size" in out
    code, out, err = _run(capsys, *args, "--budget", "2", *FAST_CLI)
    assert code == 0
    assert "already has 3 finished trials (--budget 2): no trial to run; give a larger --budget" in err
    assert "study first: 3 trials (more than this run's --budget 2)" in out
