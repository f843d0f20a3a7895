"""The conversation texts the MLLM reads, as plain strings (``img.features.format_mllm_prompt`` fills them).

    from img.conversation import TEMPLATES
    TEMPLATES["llava_v0"].format(question="How should this image change to match: a red circle?")
"""
from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
LLAVA_V0_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# The original LLaVA repository's v0 conversation ("###"-separated, roles Human/Assistant, the image token and a
# newline before the question); the authors' code selects it because their model folder is named "llava".
LLAVA_V0_PROMPT = LLAVA_V0_SYSTEM + "###Human: " + IMAGE_PLACEHOLDER + "\n{question}###Assistant:"
# llava-hf's LLaVA-1.5 chat format (what its processors' chat template produces).
LLAVA_HF_PROMPT = "USER: " + IMAGE_PLACEHOLDER + "\n{question} ASSISTANT:"
TEMPLATES: dict[str, str | None] = {"llava_v0": LLAVA_V0_PROMPT, "llava_hf": LLAVA_HF_PROMPT, "chat_template": None}
