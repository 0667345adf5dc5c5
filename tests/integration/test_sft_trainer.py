"""SFTTrainer end to end on the tiny model: it learns, and its gradients do not depend on how a step is split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_align.config import SFTConfig
from hf_align.trainers.sft import SFTTrainer
from tests.conftest import build_model, grad_capture

REPO = Path(__file__).resolve().parents[2]

# Variable prompt and response lengths so that padding differs between micro-batch layouts.
TOY = [
    {"prompt": "What is 12 + 7?", "completion": " The answer is 19."},
    {"prompt": "Say hello.", "completion": " Hello world!"},
    {"prompt": "Colour of the sky?", "completion": " blue"},
    {"prompt": "Solve 2x + 3 = 11.", "completion": " x = 4. The answer is 4."},
    {"prompt": "Is a cat a dog?", "completion": " no"},
    {"prompt": "Name a fox.", "completion": " The quick brown fox jumps over the lazy dog."},
    {"prompt": "Count to three.", "completion": " 1 2 3"},
    {"prompt": "Good or bad?", "completion": " good"},
]


def _config(tmp_path, **kw) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        max_length=64,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(kw)
    return SFTConfig(**defaults)


@pytest.mark.parametrize("normalization", ["token_mean", "sequence_sum"])
def test_gradient_accumulation_splits_give_identical_gradients(tmp_path, tokenizer, normalization):
    grads = {}
    for micro, accum in [(8, 1), (4, 2), (1, 8)]:
        cap = grad_capture()
        cfg = _config(
            tmp_path,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum,
            loss_normalization=normalization,
            max_grad_norm=0.0,
        )
        trainer = SFTTrainer(
            build_model(tokenizer), cfg, train_dataset=TOY, processing_class=tokenizer, callbacks=[cap]
        )
        trainer.train()
        grads[(micro, accum)] = cap.grads
    ref = grads[(8, 1)]
    assert ref and all(g.abs().sum() > 0 for g in ref.values())
    for split, g in grads.items():
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], atol=1e-6, rtol=1e-5, msg=f"{split} {name}")


def test_token_mean_loss_equals_naive_nll(tmp_path, tokenizer):
    """The logged first-step loss is the mean NLL over all response tokens of the step (checked naively)."""
    model = build_model(tokenizer)
    cfg = _config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4, learning_rate=0.0)
    trainer = SFTTrainer(model, cfg, train_dataset=TOY, processing_class=tokenizer)
    examples = list(trainer.train_dataset)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            keep = labels != -100
            total += -logp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum().item()
            count += int(keep.sum())
    assert count < sum(len(e["input_ids"]) - 1 for e in examples)  # prompts are not trained
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert logged["loss"] == pytest.approx(total / count, rel=1e-4)


def test_sft_memorises_toy_set(tmp_path, tokenizer):
    cfg = _config(tmp_path, max_steps=40, learning_rate=3e-3, lr_scheduler_type="constant")
    trainer = SFTTrainer(build_model(tokenizer), cfg, train_dataset=TOY, processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 40
    assert losses[-1] <= 0.5 * losses[0], losses
    assert all(map(lambda x: x == x, losses))  # no NaN


@pytest.mark.parametrize("mode", [{"packing": True}, {"padding_free": True}])
def test_packing_and_padding_free_match_unpacked_first_loss(tmp_path, tokenizer, mode):
    cfg = _config(tmp_path, learning_rate=0.0, **mode)
    trainer = SFTTrainer(build_model(tokenizer), cfg, train_dataset=TOY, processing_class=tokenizer)
    if "packing" in mode:
        assert len(trainer.train_dataset) < len(TOY)
    trainer.train()
    packed_loss = next(h for h in trainer.state.log_history if "loss" in h)["loss"]
    cfg = _config(tmp_path, learning_rate=0.0)
    trainer = SFTTrainer(build_model(tokenizer), cfg, train_dataset=TOY, processing_class=tokenizer)
    trainer.train()
    plain_loss = next(h for h in trainer.state.log_history if "loss" in h)["loss"]
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)


def test_lora_trains_only_adapters(tmp_path, tokenizer):
    from peft import LoraConfig

    model = build_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _config(tmp_path, max_steps=3)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model, cfg, train_dataset=TOY, processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    named = dict(trainer.model.named_parameters())
    changed = [
        n
        for n, p in named.items()
        if "lora_" in n and n.endswith("lora_B.default.weight") and p.abs().sum() > 0
    ]
    assert changed, "LoRA B matrices should have moved from zero"
    for n, p in named.items():
        if "lora_" not in n:
            base_name = n.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(p.detach(), before[base_name], msg=n)


def _write_tiny(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    build_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TOY))
    return model_dir, data


def _run_recipe(launcher: list[str], model_dir, data, out, micro, accum):
    cmd = launcher + [
        str(REPO / "recipes" / "sft.py"),
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(data),
        "--output_dir", str(out),
        "--per_device_train_batch_size", str(micro),
        "--gradient_accumulation_steps", str(accum),
        "--max_steps", "1",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu", "true",
        "--max_length", "64",
        "--seed", "0",
        "--gradient_checkpointing", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    return next(h for h in state["log_history"] if "loss" in h)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tokenizer):
    """accelerate multi_cpu (2 processes, 2x2 per process) == 1 process (4x2) at global batch 8."""
    model_dir, data = _write_tiny(tmp_path, tokenizer)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    one = _run_recipe(accelerate + ["--num_processes", "1", "--cpu"], model_dir, data, tmp_path / "one", 4, 2)
    two = _run_recipe(
        accelerate + ["--config_file", str(REPO / "accelerate_configs" / "multi_cpu.yaml")],
        model_dir, data, tmp_path / "two", 2, 2,
    )  # fmt: skip
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)


def test_skip_prepare_dataset_rows_without_labels_train_on_input_ids(tmp_path, tokenizer):
    """TRL's collator makes labels from input_ids when the rows carry none (dataset_kwargs skip_prepare_dataset)."""
    ids = [tokenizer(row["prompt"] + row["completion"])["input_ids"] for row in TOY]
    losses = []
    for rows in ([{"input_ids": i} for i in ids], [{"input_ids": i, "labels": i} for i in ids]):
        cfg = _config(tmp_path, learning_rate=0.0, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SFTTrainer(build_model(tokenizer), cfg, train_dataset=rows, processing_class=tokenizer)
        trainer.train()
        losses.append(next(h for h in trainer.state.log_history if "loss" in h)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_eval_packing_alone_keeps_samples_apart(tmp_path, tokenizer):
    """eval_packing=True with packing=False: the packed eval rows are flattened by the collator (positions restart
    per sample), so the eval loss is the unpacked one; padded as plain rows, samples would attend to each other."""
    losses = []
    for eval_packing in (True, False):
        cfg = _config(tmp_path, eval_packing=eval_packing, per_device_eval_batch_size=8)
        model = build_model(tokenizer)
        trainer = SFTTrainer(model, cfg, train_dataset=TOY, eval_dataset=TOY, processing_class=tokenizer)
        assert len(trainer.eval_dataset) < len(TOY) if eval_packing else len(trainer.eval_dataset) == len(TOY)
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
