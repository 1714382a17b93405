"""Configs for the random-weight presets, and the byte-level tokenizer they share (no download needed)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlavaOnevisionConfig, PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# The Qwen2 ChatML turn format LLaVA-OneVision was trained with; the video placeholder precedes the text.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SHAPES = {
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=54, patch_size=2),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "0.5b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                    image_size=384, patch_size=14),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    ),
    "7b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                    image_size=384, patch_size=14),
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
    ),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with the ChatML chat template."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def llava_config(shape: str, vocab_size: int, image_token_id: int, video_token_id: int) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config of the named shape; `vocab_size` only raises the shape's own."""
    spec = SHAPES[shape]
    text_kwargs = dict(spec["text"])
    text_kwargs["vocab_size"] = max(text_kwargs.get("vocab_size", 0), vocab_size)
    text = Qwen2Config(rope_theta=1_000_000.0, max_position_embeddings=1 << 20, **text_kwargs)
    vision = SiglipVisionConfig(**spec["vision"])
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=text_kwargs["tie_word_embeddings"],
    )
