"""The features IMG conditions on, computed by ONE implementation for the embed job and ``img infer``.

Callable classes, so Ray Data actors wrap them as they are (load once, call per
batch). Inputs are lists; outputs are CPU tensors in the encoder's compute
dtype (float32 on CPU; the profile's ``tensor_dtype`` on GPU); no randomness::

    from img.profiles import get_profile
    from img.features import IPTokenEncoder, GuidanceEncoder, TextGuidanceEncoder
    from img.questions import question_for

    p = get_profile("tiny")
    ip = IPTokenEncoder(p)                       # CLIP penultimate states -> IP-Adapter Plus resampler
    c = ip([img_a, img_b])                       # (2, N, D)
    c0 = ip.unconditional()                      # (1, N, D): all-zeros image (SDXL) / black image (FLUX)
    mllm = GuidanceEncoder(p)
    h = mllm([img_a], [question_for("a red circle", key="pair-1", seed=0)])   # [(L_0, E)]
    t = TextGuidanceEncoder(p)(["a red circle"])  # [(77, D)] SDXL text-encoder states (text-only ablation)
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from img.profiles import Profile, get_profile

log = logging.getLogger(__name__)

LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5 format, used when a processor has no chat template


def chat_prompt(processor: Any, question: str) -> str:
    """The MLLM's input text for one image and ``question``: the processor's chat template, else LLaVA-1.5's."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return LLAVA_PROMPT.format(question=question)


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
        from img.model_loading import compute_dtype, load_ip_image_encoder, load_ip_projection

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

    One forward pass, no generation. The sequence is the chat prompt: system text (if the template has
    one), the image tokens (LLaVA-1.5: 576) and the question. Right padding, then each sample is cut back
    to its attention mask, so a batched call equals per-sample calls.
    """

    def __init__(self, profile: Profile | str, device: str | torch.device = "cpu", dtype: Any = None) -> None:
        from img.model_loading import compute_dtype, load_mllm

        self.profile = _profile(profile)
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.profile, device, dtype)
        self.model, self.processor = load_mllm(self.profile, self.device, self.dtype)

    def prompt(self, question: str) -> str:
        """The text the MLLM reads, with its image placeholder (chat template of the processor)."""
        if not getattr(self.processor, "chat_template", None) and self.profile.mllm_kind != "llava":
            raise RuntimeError(f"the {self.profile.mllm_kind} processor at {self.profile.mllm.id} has no chat template")
        return chat_prompt(self.processor, question)

    def inputs(self, images: Sequence[Any], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Processor output (ids with expanded image tokens, mask, pixels) for a batch."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions; pass one question per image")
        texts = [self.prompt(q) for q in questions]
        return self.processor(images=_rgb(images), text=texts, padding=True, return_tensors="pt")

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
        from img.model_loading import compute_dtype, load_text_encoders

        self.profile = _profile(profile)
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.profile, device, dtype)
        self.encoders = load_text_encoders(self.profile, self.device, self.dtype)

    @torch.inference_mode()
    def __call__(self, captions: Sequence[str]) -> list[torch.Tensor]:
        if len(captions) == 0:
            return []
        parts = []
        for tokenizer, encoder in self.encoders:
            ids = tokenizer(
                list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            parts.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
        states = torch.cat(parts, dim=-1).cpu()
        return list(states.unbind(0))
