"""A tiny randomly initialised Llama (a few hundred thousand parameters) with its own byte-level BPE tokenizer and
a chat template, built offline in about a second: the model of the tests, benches and experiments, never of a run."""

from __future__ import annotations

from pathlib import Path

from cluster.models import CHATML_TEMPLATE


_TINY_CORPUS_SEED_TEXT = """\
Thinking Level: 1
Thinking Level: 2
Thinking Level: 3
Thinking Level: 4
<|begin_of_thinking|> <|end_of_thinking|> <|begin_of_answer|> <|end_of_answer|>
History: Goal: Intent: Assess: Strategy: Deduction: Integration: Style: Response:
Imagine you are an agent, your task is to act and speak as that person would, keeping in mind the social goal.
Here is the context of this interaction: Scenario: Participants: background: goal: Unknown
You are at Turn 0. You can say something to interact or just say 'left the conversation' to stop continuing.
Turn 1: said: "Hello, how are you today? I would like to talk about the money you owe me."
She is a 35-year-old female teacher. He/him pronouns. They/them pronouns. Personality and values description:
The quick brown fox jumps over the lazy dog. Negotiation, persuasion, cooperation and conflict between friends.
"""


def build_tiny_model(
    out: Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised Llama causal LM and a byte-level BPE tokenizer with a chat template
    to `out` (HF layout, fp32 safetensors). Offline and fast (about a second). Embeddings are tied, like
    SmolLM2's, so weight-push tests exercise the tied lm_head path. The default head size is 32
    (hidden 64 / 2 heads), the smallest vLLM's CPU attention backend supports."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS_SEED_TEXT] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out
