"""The features IMG conditions on, computed by ONE implementation for the embed job and ``img infer``.

Callable classes, so Ray Data actors wrap them as they are (load once, call per
batch), also from several threads at once (tokenizers, which keep state between
calls, run under a lock). Inputs are lists; outputs are CPU tensors in the
encoder's compute dtype (float32 on CPU; the profile's ``tensor_dtype`` on GPU);
no randomness::

    from img.models.profiles import get_profile
    from img.features import IPTokenEncoder, GuidanceEncoder, TextGuidanceEncoder
    from img.questions import question_for

    p = get_profile("tiny")
    ip = IPTokenEncoder(p)                       # CLIP penultimate states -> IP-Adapter Plus resampler
    c = ip([img_a, img_b])                       # (2, N, D)
    c0 = ip.unconditional()                      # (1, N, D): all-zeros image (SDXL) / black image (FLUX)
    mllm = GuidanceEncoder(p)
    h = mllm([img_a], [question_for("a red circle", key="pair-1", seed=0)])   # [(L_0, E)]
    t = TextGuidanceEncoder(p)(["a red circle"])  # [(77, D)] SDXL text-encoder states (text-only ablation)

The text the MLLM reads is ``format_mllm_prompt(question, profile.mllm_template)``::

    format_mllm_prompt("How ...?", "llava_v0")
    # "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
    #  detailed, and polite answers to the human's questions.###Human: <image>\nHow ...?###Assistant:"
    format_mllm_prompt("How ...?", "llava_hf")      # "USER: <image>\nHow ...? ASSISTANT:"
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from img.conversation import IMAGE_PLACEHOLDER, TEMPLATES
from img.errors import UserError
from img.models.loading import compute_dtype, load_ip_image_encoder, load_ip_projection, load_mllm, load_text_encoders
from img.models.profiles import Profile, get_profile


def format_mllm_prompt(question: str, template: str, processor: Any = None) -> str:
    """The exact text the MLLM reads for ``question``, with its image placeholder.

    ``template``: ``"llava_v0"`` (the original LLaVA v0 conversation the released aligners were trained on),
    ``"llava_hf"`` (llava-hf's chat format) or ``"chat_template"`` (``processor``'s own chat template, e.g.
    Qwen2.5-VL; needs ``processor``). The question is inserted as is.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown MLLM prompt template {template!r}; use one of {', '.join(TEMPLATES)}.")
    fixed = TEMPLATES[template]
    if fixed is not None:
        return fixed.replace("{question}", question)
    if processor is None or not getattr(processor, "chat_template", None):
        raise ValueError("template 'chat_template' needs a processor that has a chat template; pass it, or use "
                         "'llava_v0' / 'llava_hf' for a LLaVA model.")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def pad_to_square(image: Any, fill: tuple[int, ...]) -> Any:
    """``image`` centred on a square canvas of its longer side filled with ``fill`` (LLaVA-1.5's ``expand2square``:
    the paste offset is rounded down); a square image is returned as it is."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def llava_input_ids(prompt: str, tokenizer: Any, image_token_id: int, n_image_tokens: int) -> list[int]:
    """Token ids of ``prompt`` as the original LLaVA code builds them, the image placeholder expanded.

    The text before and after ``<image>`` is tokenized separately (the tokenizer's BOS kept only at the very
    start), so a SentencePiece tokenizer starts the text after the image with its word-boundary piece, whatever
    the tokenizer does after special tokens. The placeholder becomes ``n_image_tokens`` x ``image_token_id``.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    bos = tokenizer.bos_token_id
    offset = 1 if bos is not None and chunks[0] and chunks[0][0] == bos else 0
    ids: list[int] = [bos] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.extend([image_token_id] * n_image_tokens)
        ids.extend(chunk[offset:])
    return ids


def _profile(profile: Profile | str) -> Profile:
    return get_profile(profile) if isinstance(profile, str) else profile


def _rgb(images: Sequence[Any]) -> list[Any]:
    from PIL import Image

    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = Image.fromarray(im)
        out.append(im if im.mode == "RGB" else im.convert("RGB"))
    return out


class IPTokenEncoder:
    """Images -> IP-Adapter image-prompt tokens ``c_I`` of shape (B, N, D).

    SDXL (IP-Adapter Plus): CLIP image processor -> ``CLIPVisionModelWithProjection`` ->
    ``hidden_states[-2]`` (penultimate, e.g. 257 x 1280) -> resampler -> 16 x 2048.
    FLUX (XLabs): CLIP ViT-L/14 ``image_embeds`` -> linear projection -> 4 x 4096.
    """

    def __init__(self, profile: Profile | str, device: str | torch.device = "cpu", dtype: Any = None) -> None:

        self.profile = _profile(profile)
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.profile, device, dtype)
        self.encoder, self.processor = load_ip_image_encoder(self.profile, self.device, self.dtype)
        self.projection = load_ip_projection(self.profile, self.device, self.dtype)

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """CLIP preprocessing (resize short side, center crop, OpenAI mean/std) -> (B, 3, S, S)."""
        return self.processor(images=_rgb(images), return_tensors="pt").pixel_values

    @torch.inference_mode()
    def tokens_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> (B, N, D) tokens on the CPU."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.profile.ip_kind == "xlabs":
            embeds = self.encoder(pixel_values).image_embeds  # (B, 768) projected CLS
            tokens = self.projection(embeds)
        else:
            hidden = self.encoder(pixel_values, output_hidden_states=True).hidden_states[-2]
            tokens = self.projection(hidden)
        return tokens.cpu()

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        if len(images) == 0:
            d = self.profile.dims
            return torch.empty(0, d.ip_tokens, d.ip_dim, dtype=self.dtype)
        return self.tokens_from_pixels(self.pixel_values(images))

    def unconditional(self) -> torch.Tensor:
        """(1, N, D) tokens for classifier-free guidance.

        SDXL: an all-zeros *preprocessed* image, as IP-Adapter and diffusers' ``encode_image`` do.
        FLUX: a black image, as diffusers' FLUX pipeline does.
        """
        size = self.encoder.config.image_size
        if self.profile.ip_kind == "xlabs":
            from PIL import Image

            return self([Image.new("RGB", (size, size), (0, 0, 0))])
        return self.tokens_from_pixels(torch.zeros(1, 3, size, size))


class GuidanceEncoder:
    """(image, question) -> the MLLM's last-layer hidden states over the whole sequence, (L_i, E) each.

    One forward pass, no generation. The sequence is the profile's conversation text
    (``format_mllm_prompt(question, profile.mllm_template)``): system text (if the template has one), the
    image tokens (LLaVA-1.5: 576) and the question. Images are padded to a square first when
    ``profile.mllm_image == "pad"``. ``llava_v0`` text is tokenized as the original LLaVA code does
    (``llava_input_ids``); the other templates by the processor. Right padding, then each sample is cut
    back to its attention mask, so a batched call equals per-sample calls.
    """

    def __init__(self, profile: Profile | str, device: str | torch.device = "cpu", dtype: Any = None) -> None:

        self.profile = _profile(profile)
        self.template = self.profile.mllm_template
        self.image_mode = self.profile.mllm_image
        if self.template in ("llava_v0", "llava_hf") and self.profile.mllm_kind != "llava":
            raise UserError(f"profile {self.profile.name!r} uses {self.profile.mllm_kind}, which cannot read the "
                            f"{self.template!r} LLaVA conversation. Set mllm_template = \"chat_template\".")
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.profile, device, dtype)
        self.model, self.processor = load_mllm(self.profile, self.device, self.dtype)
        self._text_lock = threading.Lock()  # a fast tokenizer's padding state is not safe across threads
        if self.template == "chat_template" and not getattr(self.processor, "chat_template", None):
            raise UserError(f"the MLLM processor at {self.profile.mllm.id} has no chat template, which "
                            f"mllm_template = \"chat_template\" needs. Use \"llava_v0\" or \"llava_hf\" for LLaVA.")

    def prompt(self, question: str) -> str:
        """The text the MLLM reads, with its image placeholder (``format_mllm_prompt`` of the profile's template)."""
        return format_mllm_prompt(question, self.template, self.processor)

    def images(self, images: Sequence[Any]) -> list[Any]:
        """RGB PIL images as the processor gets them: padded to a square with the processor's mean colour
        (``tuple(int(x * 255) for x in image_mean)``, as LLaVA-1.5) when the profile says ``pad``."""
        out = _rgb(images)
        if self.image_mode == "pad":
            fill = tuple(int(x * 255) for x in self.processor.image_processor.image_mean)
            out = [pad_to_square(im, fill) for im in out]
        return out

    def inputs(self, images: Sequence[Any], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs (ids with expanded image tokens, mask, pixels) for a batch."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions; pass one question per image")
        texts = [self.prompt(q) for q in questions]
        if self.template != "llava_v0":
            with self._text_lock:  # the processor tokenizes and expands image tokens in one call (images too)
                return self.processor(images=self.images(images), text=texts, padding=True, return_tensors="pt")
        pixels = self.processor.image_processor(images=self.images(images), return_tensors="pt")["pixel_values"]
        cfg = self.model.config
        with self._text_lock:
            rows = [llava_input_ids(t, self.processor.tokenizer, cfg.image_token_id, cfg.image_seq_length)
                    for t in texts]
        pad = self.processor.tokenizer.pad_token_id or 0  # masked out; the value does not matter
        ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}

    @torch.inference_mode()
    def __call__(self, images: Sequence[Any], questions: Sequence[str]) -> list[torch.Tensor]:
        if len(images) == 0:
            return []
        batch = self.inputs(images, questions)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        # The base model (no LM head): last_hidden_state == hidden_states[-1] of the full model, after the
        # final norm (tests check this); skips the vocab projection and the per-layer state list.
        hidden = self.model.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        return [hidden[i][mask[i]].cpu() for i in range(hidden.shape[0])]


class TextGuidanceEncoder:
    """Captions -> the SDXL text encoders' states, (77, D) each: the "text only" guidance ablation.

    As ``StableDiffusionXLPipeline.encode_prompt``: both CLIP text encoders' penultimate hidden states over
    the 77 padded tokens, concatenated (768 + 1280 = 2048 for SDXL). Loads only tokenizers + text encoders.
    """

    def __init__(self, profile: Profile | str, device: str | torch.device = "cpu", dtype: Any = None) -> None:

        self.profile = _profile(profile)
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.profile, device, dtype)
        self.encoders = load_text_encoders(self.profile, self.device, self.dtype)
        self._text_lock = threading.Lock()

    @torch.inference_mode()
    def __call__(self, captions: Sequence[str]) -> list[torch.Tensor]:
        if len(captions) == 0:
            return []
        parts = []
        for tokenizer, encoder in self.encoders:
            with self._text_lock:
                ids = tokenizer(
                    list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
            parts.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
        states = torch.cat(parts, dim=-1).cpu()
        return list(states.unbind(0))
