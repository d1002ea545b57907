"""Greedy generation cut by the length limit, on vLLM, for tests/test_vllm_backend.py:

    python tests/vllm_scripts/greedy_cuts.py MODEL_DIR WORK_DIR   # writes WORK_DIR/greedy_cuts.json

MODEL_DIR is a chain model (tests/fixtures/vllm.py, build_chain_model) whose greedy text is known, so some
cuts fall inside a CJK character's bytes on any CPU. The engine core is a spawned process, hence the guard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from checks_common import CUT_LENGTHS, questions


def main(model: Path) -> dict:
    from medcritical.modeling.config import GenerationSection
    from medcritical.modeling.generation import VLLMGenerator
    from medcritical.prompts import mcq_messages

    generator = VLLMGenerator(model, GenerationSection(backend="vllm"), dtype="float32", seed=0)
    pool = questions()[:3]
    prompts, keys = [mcq_messages(q) for q in pool], [q.id for q in pool]
    with generator:
        return {
            length: [
                [c.text for c in samples] for samples in generator.generate(prompts, keys=keys, max_new_tokens=length)
            ]
            for length in CUT_LENGTHS
        }


if __name__ == "__main__":
    model, work = Path(sys.argv[1]), Path(sys.argv[2])
    (work / "greedy_cuts.json").write_text(json.dumps(main(model), ensure_ascii=False, indent=1))
