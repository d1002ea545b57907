"""Training: supervised fine-tuning (sft) and preference optimisation (dpo) on TRL."""
