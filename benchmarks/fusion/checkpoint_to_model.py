"""Write a full-tuning checkpoint (`<run>/checkpoints/step-N/trainable.safetensors`) on top of its
base model as a plain HF folder: how the interrupted heal run's last checkpoint became the small base.

    python benchmarks/fusion/checkpoint_to_model.py runs/fusion/small-pruned \
        runs/fusion/heal/checkpoints/step-16 runs/fusion/small-healed
"""
import sys

import torch
from safetensors.torch import load_file

from tunesmith.models.load import load_model

base, checkpoint, out = sys.argv[1:4]
model, tok = load_model(base, "fp32")
weights = load_file(f"{checkpoint}/trainable.safetensors")
own = model.state_dict()
missing = sorted(set(own) - set(weights) - {"lm_head.weight"})  # lm_head is tied to the embeddings
if missing or set(weights) - set(own):
    sys.exit(f"checkpoint keys do not match the model: missing {missing[:3]}, extra {sorted(set(weights) - set(own))[:3]}")
with torch.no_grad():
    for name, value in weights.items():
        own[name].copy_(value.to(own[name].dtype))
model.save_pretrained(out)
tok.save_pretrained(out)
model.generation_config.save_pretrained(out)
print(f"{len(weights)} tensors from {checkpoint} written into {out}")
