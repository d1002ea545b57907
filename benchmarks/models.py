"""Models and data for the GPU benchmarks: random-initialised models shaped like Qwen2.5-7B (no download), and
benchmark data made by the project's own steps from the bundled CMExam questions.

The tokenizer is the tiny model's byte-level BPE (ChatML template with generation markers), padded with
added tokens to Qwen2.5's vocabulary size, so the embedding and LM head have the 7B shapes and every id a
random model samples decodes to something.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2.5-7B(-Instruct) config.json: the shapes that set the FLOPs, the bytes per token and the memory.
QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def padded_tokenizer(vocab_size: int):
    """The tiny tokenizer with `<extra_i>` tokens added until it has exactly `vocab_size` ids."""
    from medcritical.modeling.tiny import build_tokenizer

    tokenizer = build_tokenizer(2048)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(vocab_size - len(tokenizer))])
    assert len(tokenizer) == vocab_size
    return tokenizer


def build_7b_shaped_model(output_dir: str | Path, *, layers: int = 28, device: str = "cuda") -> Path:
    """A Qwen2.5-7B-shaped model with `layers` decoder layers and random bf16 weights, saved as a HF folder.
    Reused when `output_dir` already holds one with the same shape (building and saving 15 GB takes a minute)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    output_dir = Path(output_dir)
    shape = {**QWEN25_7B, "num_hidden_layers": layers}
    marker = output_dir / "benchmark_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return output_dir
    tokenizer = padded_tokenizer(shape["vocab_size"])
    config = Qwen2Config(
        **shape, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: half the memory of float32 then cast
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    del model
    marker.write_text(json.dumps(shape, indent=2))
    return output_dir


def parameter_count(model_dir: str | Path) -> int:
    """Parameters of the model in `model_dir`, counted on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def full_layers_that_fit(gpu_memory_gib: float, gpus: int) -> int:
    """Decoder layers of a 7B-shaped model whose full fine-tuning state (16 bytes per parameter: bf16 weights and
    gradients, fp32 master weights and two Adam moments, sharded by ZeRO-3) takes at most half the GPU memory,
    leaving the rest for activations. 28 (the whole model) from about 8 x 80 GB."""
    h, ffn, vocab = QWEN25_7B["hidden_size"], QWEN25_7B["intermediate_size"], QWEN25_7B["vocab_size"]
    kv = h // QWEN25_7B["num_attention_heads"] * QWEN25_7B["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * ffn + 2 * h
    embeddings = 2 * vocab * h
    budget_params = 0.5 * gpu_memory_gib * 2**30 * gpus / 16
    return max(1, min(QWEN25_7B["num_hidden_layers"], int((budget_params - embeddings) // per_layer)))


def sft_dataset(output_dir: str | Path, questions: int) -> Path:
    """The SFT rows the pipeline trains on, from the `explanations` distillation backend (offline, real lengths)."""
    from medcritical.data.bundled import bundled_questions
    from medcritical.distill.config import DistillSection
    from medcritical.distill.run import SFT_FILE, distill

    output_dir = Path(output_dir)
    if not (output_dir / SFT_FILE).is_file():
        distill(DistillSection(backend="explanations", attempts=1), bundled_questions()[:questions], output_dir)
    return output_dir / SFT_FILE


def dpo_pairs(sft_path: str | Path, output_path: str | Path) -> Path:
    """Preference pairs in the rollout step's format: chosen = a question's verified trace, rejected = the next
    different trace (realistic lengths; the content does not matter for speed). Two questions can share a trace
    (the same explanation and answer), and DPO refuses a pair that prefers nothing."""
    rows = [json.loads(line) for line in Path(sft_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    output_path = Path(output_path)
    with output_path.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            prompt, chosen = row["messages"][:-1], row["messages"][-1:]
            later = (rows[(i + k) % len(rows)]["messages"][-1:] for k in range(1, len(rows)))
            rejected = next((other for other in later if other != chosen), None)
            if rejected is not None:
                f.write(
                    json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False) + "\n"
                )
    return output_path
