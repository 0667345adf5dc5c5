"""Build (not train) an SFTTrainer on the tiny model, under whatever `accelerate launch` set up; print CONSTRUCTED.

accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 1 tests/integration/_refusal_driver.py OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_align import SFTConfig, SFTTrainer  # noqa: E402
from tests.conftest import build_model, build_tokenizer  # noqa: E402

tokenizer = build_tokenizer()
rows = [{"prompt": "What is 1 + 1?", "completion": " 2"}] * 4
config = SFTConfig(output_dir=sys.argv[1], max_steps=1, report_to="none")
SFTTrainer(build_model(tokenizer), config, train_dataset=rows, processing_class=tokenizer)
print("CONSTRUCTED")
