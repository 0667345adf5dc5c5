"""DPO loss of a single preference pair, for checking and teaching (the trainer batches the same math).

Choices: the prompt is the Alpaca template (``hf_align/prompts/alpaca_sft.prompt``) filled with the instruction, the
response is the answer plus EOS; prompt and response are tokenized separately (as everywhere in ``hf_align/data.py``),
so both answers share exactly the same prompt ids. Only response tokens enter the summed log-probs: the prompt's
log-prob is the same under chosen and rejected and cancels in the DPO margin. Each model runs ONE forward over
the two rows ``[chosen; rejected]``; the loss is ``hf_align.losses.dpo.dpo_loss`` with ``loss_type="sigmoid"``.
"""

from __future__ import annotations

import torch

from hf_align.data import build_shifted_sequences, format_prompt, load_prompt_template
from hf_align.logprobs import get_response_log_probs
from hf_align.losses.dpo import dpo_loss, sequence_log_probs, split_concatenated


def _pair_log_probs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen, rejected) of a 2-row batch under ``model``, on its device."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    log_probs_BT = get_response_log_probs(
        model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"]
    )["log_probs"]
    return split_concatenated(sequence_log_probs(log_probs_BT, batch["response_mask"]))


def per_instance_dpo_loss(
    lm: torch.nn.Module,
    lm_ref: torch.nn.Module,
    tokenizer,
    beta: float,
    prompt: str,
    response_chosen: str,
    response_rejected: str,
) -> torch.Tensor:
    """``-log sigma(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])``, 0-dim,
    on ``lm``'s device, differentiable with respect to ``lm`` (the reference runs under ``no_grad``)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "per_instance_dpo_loss appends EOS to each response: the tokenizer needs an eos token"
        )
    template = load_prompt_template("alpaca_sft")
    suffix = template.partition("{response}")[2]
    prompt_ids = tokenizer(format_prompt(template, prompt), add_special_tokens=False)["input_ids"]
    answers = (response_chosen, response_rejected)
    response_ids = [tokenizer(a + suffix, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    batch = build_shifted_sequences([prompt_ids, prompt_ids], response_ids, pad)  # each (2, T)
    policy_chosen, policy_rejected = _pair_log_probs(lm, batch)
    with torch.no_grad():
        ref_chosen, ref_rejected = _pair_log_probs(lm_ref, batch)
    device = policy_chosen.device
    return dpo_loss(
        policy_chosen, policy_rejected, ref_chosen.to(device), ref_rejected.to(device), beta=beta
    )[0]
