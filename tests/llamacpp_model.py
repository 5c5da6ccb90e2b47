"""Write a tiny llama-architecture GGUF model, random weights and all, for llama.cpp to serve in the tests.

Run with the llama.cpp environment's python (scripts/llamacpp), which has the
``gguf`` and ``numpy`` packages: ``python llamacpp_model.py OUT.gguf [--no-pooling]``.

What the tests need of it is the protocol, not the text: it loads in
milliseconds, generates fast on one CPU thread, and

- has a working tokenizer (SentencePiece-style: pieces, scores, byte
  fallback), so any prompt tokenizes, and a chat template;
- never ends an answer by itself: the end-of-sequence token (and every token
  but the words) has an all-zero output row, while every word has a twin of
  opposite sign, so that some word always scores above it; answers end at
  ``max_tokens`` or when the context is full, with finish_reason "length";
- pools embeddings (mean) unless ``--no-pooling``: without a pooling type,
  llama.cpp answers /v1/embeddings with one vector per token of each input.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np

EMBED = 64  # model width
LAYERS = 2
HEADS = 4
FFN = 128
TRAIN_CONTEXT = 4096
WORDS = (
    "the sky is blue why hello world a an of to and in on it that this for with as was are be at by not"
    " or from but what all were when we there can more if no out so said up its about into than them"
    " only some could time these two may then do first any my now such like our over man me even most"
).split()
TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Pieces, their scores and types: specials, the 256 byte tokens, characters, then words."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\"-()"
    pieces = ["\u2581", *chars]
    # Every prefix of "\u2581word": SentencePiece reaches a piece only through pieces it merges on the way.
    for word in ("\u2581" + w for w in (*chars, *WORDS)):
        pieces += [word[:end] for end in range(2, len(word) + 1) if word[:end] not in pieces]
    tokens += pieces
    types += [T.NORMAL] * len(pieces)
    # SentencePiece merges the pair whose result scores highest first: longer pieces win.
    scores = [0.0] * (3 + 256) + [float(len(p)) for p in pieces]
    return tokens, scores, [int(t) for t in types]


def write(path: str, pooling: bool) -> None:
    rng = np.random.default_rng(7)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("llm-worker-tiny")
    w.add_context_length(TRAIN_CONTEXT)
    w.add_embedding_length(EMBED)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(EMBED // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if pooling:
        w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(TEMPLATE)

    def weights(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", weights(n_vocab, EMBED, scale=0.5))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        w.add_tensor(f"{block}.attn_norm.weight", np.ones(EMBED, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"{block}.{name}.weight", weights(EMBED, EMBED, scale=EMBED**-0.5))
        w.add_tensor(f"{block}.ffn_norm.weight", np.ones(EMBED, dtype=np.float32))
        w.add_tensor(f"{block}.ffn_gate.weight", weights(FFN, EMBED, scale=EMBED**-0.5))
        w.add_tensor(f"{block}.ffn_up.weight", weights(FFN, EMBED, scale=EMBED**-0.5))
        w.add_tensor(f"{block}.ffn_down.weight", weights(EMBED, FFN, scale=FFN**-0.5))
    w.add_tensor("output_norm.weight", np.ones(EMBED, dtype=np.float32))
    # Output rows: zero (a logit of 0) for all but the word pieces, which come in pairs +v, -v:
    # whatever the hidden state, one of each pair scores at least 0, so a word always beats the end.
    output = np.zeros((n_vocab, EMBED), dtype=np.float32)
    words = [tokens.index("\u2581" + w) for w in WORDS]
    for first, second in zip(words[0::2], words[1::2], strict=False):  # an odd one out stays 0
        output[first] = weights(EMBED, scale=1.0)
        output[second] = -output[first]
    w.add_tensor("output.weight", output)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or any(a.startswith("-") and a != "--no-pooling" for a in args):
        sys.exit(f"usage: {sys.argv[0]} OUT.gguf [--no-pooling]")
    write(next(a for a in args if not a.startswith("-")), pooling="--no-pooling" not in args)
