"""Every recipe YAML parses into its dataclasses (unknown or renamed keys fail here, not on a user's GPU)."""

from pathlib import Path

import pytest

from hf_align.cli import parse_args
from hf_align.config import DPOConfig, GRPOConfig, ModelArguments, RewardConfig, ScriptArguments, SFTConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"sft": SFTConfig, "grpo": GRPOConfig, "dpo": DPOConfig, "reward_model": RewardConfig}
YAMLS = sorted(p for algo in CONFIGS for p in (REPO / "recipes" / "configs" / algo).glob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_yaml_parses(path, tmp_path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path} must start with a comment holding its launch command"
    cls = CONFIGS[path.parent.name]
    script_cls = ScriptArguments
    if cls is GRPOConfig:  # the GRPO recipe adds reward_funcs and prompt_template to the script arguments
        from recipes.grpo import GRPOScriptArguments as script_cls
    # CPU overrides so GPU configs (bf16) validate on this machine; everything else comes from the file.
    cpu = ["--use_cpu", "true", "--bf16", "false", "--output_dir", str(tmp_path)]
    model_args, script_args, cfg = parse_args(
        (ModelArguments, script_cls, cls), ["--config", str(path), *cpu]
    )
    assert model_args.model_name_or_path and script_args.dataset_name


def test_unknown_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# launch\nwarmup_ratioo: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key\(s\) \['warmup_ratioo'\]"):
        parse_args((ModelArguments, ScriptArguments, SFTConfig), ["--config", str(bad)])


def test_resume_target_reads_the_flag(tmp_path):
    from hf_align.cli import resume_target

    assert resume_target("latest") is True and resume_target("true") is True
    assert resume_target("false") is None and resume_target(None) is None and resume_target("") is None
    assert resume_target(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resume_target(str(tmp_path / "checkpoint-9"))
