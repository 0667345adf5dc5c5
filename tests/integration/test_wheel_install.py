"""hf_align installs like a library: a wheel built from the sources, installed into a fresh virtual environment,
runs a GRPO step with a built-in grader (prompt templates and the grader's worker ship inside the package).

The fresh environment sees the main environment's site-packages (torch, transformers, ... are not reinstalled:
that would download gigabytes) through a path entry, which does not run that environment's ``.pth`` hooks, so the
editable install of the checkout is invisible; the script runs outside the checkout and asserts it imported the
installed copy.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys
    import hf_align
    from hf_align import GRPOConfig, GRPOTrainer
    from hf_align.data import format_prompt, load_prompt_template

    assert "site-packages" in hf_align.__file__ and {root!r} not in hf_align.__file__, hf_align.__file__
    template = load_prompt_template("r1_zero")
    rows = [{{"prompt": format_prompt(template, f"What is {{i}} + 1?"), "answer": str(i + 1)}} for i in range(4)]
    args = GRPOConfig(
        output_dir=sys.argv[2], max_steps=1, num_generations=2, per_device_train_batch_size=4,
        max_completion_length=8, report_to="none", logging_steps=1, save_strategy="no",
    )
    def spread(completions, **kwargs):  # a signal the random tiny model has (r1_zero gives it 0 everywhere)
        return [float(len(set(c))) for c in completions]

    trainer = GRPOTrainer(model=sys.argv[1], reward_funcs=["r1_zero", spread], args=args, train_dataset=rows)
    trainer.train()
    print("STEP_DONE", trainer.state.global_step, sorted(trainer.state.log_history[0]))
    """
)


@pytest.mark.slow
def test_wheel_installs_and_runs_a_grpo_step(tmp_path, tiny_model_dir):
    src = tmp_path / "src"  # build from a copy: the checkout gets no build/ or egg-info folders
    shutil.copytree(ROOT / "hf_align", src / "hf_align", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src], check=True)
    (wheel,) = wheels.glob("hf_align-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", purelib, wheel], check=True)
    (Path(purelib) / "main_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    script = tmp_path / "run_step.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [python, script, str(tiny_model_dir), str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "STEP_DONE 1" in result.stdout
