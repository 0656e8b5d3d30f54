"""The examples run end to end (a few training steps each, to stay fast) and finish without
matplotlib, saying that the plot was skipped."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHORT_RUNS = {
    "adding_problem.py": ["--cells", "LSTM,RNN", "--steps", "3", "--length", "12", "--batch", "8", "--hidden", "8"],
    "char_lm.py": ["--seconds", "1", "--hidden", "16", "--embed", "8", "--batch", "4", "--length", "16", "--regularise"],
    "one_to_many.py": ["--steps", "3", "--hidden", "8", "--batch", "8"],
    # backend "eager": Dynamo still traces the converted model over packed input, without
    # the minutes of C++ compilation inductor takes on a small CPU.
    "convert_compile.py": ["--steps", "3", "--batch", "8", "--backend", "eager"],
    "rl_resets.py": ["--updates", "3", "--envs", "8", "--steps", "12", "--epochs", "2"],
}
PLOTTING = sorted(set(SHORT_RUNS) - {"convert_compile.py", "rl_resets.py"})  # rl_resets prints only


def _run(name, tmp_path, hide_matplotlib):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if hide_matplotlib:
        blocker = tmp_path / "no_matplotlib" / "matplotlib"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text("raise ImportError('matplotlib is hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), ROOT])
    out = ["--out", str(tmp_path / "out")] if name != "rl_resets.py" else []
    args = [sys.executable, os.path.join(ROOT, "examples", name), *SHORT_RUNS[name], *out]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_example_is_covered():
    examples = {n for n in os.listdir(os.path.join(ROOT, "examples")) if n.endswith(".py") and n != "plotting.py"}
    assert examples == set(SHORT_RUNS)


@pytest.mark.parametrize("name", PLOTTING)
def test_example_runs_without_matplotlib(name, tmp_path):
    out = _run(name, tmp_path, hide_matplotlib=True)
    assert "plot skipped: matplotlib is not installed (pip install matplotlib)" in out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_convert_compile_example_converts_both_ways(tmp_path):
    out = _run("convert_compile.py", tmp_path, hide_matplotlib=True)
    assert "lstm: torch.nn.LSTM -> rnnfused.LSTM" in out
    assert "lstm (rnnfused.LSTM)\n  layer 0 forward: " in out
    assert "converted back to torch.nn: torch.nn.modules.rnn.LSTM, same prediction on 100.0% of the test lines" in out
    assert "test accuracy (rnnfused, compiled, 3 steps" in out
    assert "plot skipped: matplotlib is not installed (pip install matplotlib)" in out


def test_rl_example_variants_agree(tmp_path):
    """The fused and the LSTMCell-loop variants compute the same function from the same
    weights and seed, so a short run reaches the same success rate with both."""
    out = _run("rl_resets.py", tmp_path, hide_matplotlib=False)
    rates = [line.split("episodes")[1].split("%")[0] for line in out.splitlines() if "success rate" in line]
    assert len(rates) == 2 and rates[0] == rates[1]
