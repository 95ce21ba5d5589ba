"""Generate text from a compressed decoder on a CPU, in one file: onnxruntime, our kernels, the
folder's tokenizer.json, nothing else (no torch, no transformers).

    python examples/edge.py slim/ "The history of" --max-new-tokens 64 --threads 4

The compressed model's activations are int8 inside our kernels when it was compressed with the
default --accuracy-level 4 (float32 with 0); --threads sets onnxruntime's intra-op threads (the
machine's cores by default). Needs `pip install slim-onnx tokenizers`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer

from slim_onnx.generate import CachedDecoder


def load_tokenizer(folder: Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        sys.exit(f"error: {path} does not exist: the folder needs the tokenizer.json of the export")
    return Tokenizer.from_file(str(path))


def eos_ids(folder: Path) -> set[int]:
    """The end-of-sequence token ids from generation_config.json or config.json."""
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {eos}
    return set()


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The text of `tokens` piece by piece: the whole continuation is decoded at each token and
    the new end emitted, held back while it ends in an incomplete UTF-8 character."""
    ids, sent = [], ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
        sent = text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a slim-onnx output folder (model.onnx, tokenizer.json)")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    decoder = CachedDecoder(args.model, threads=args.threads)
    prompt = tokenizer.encode(args.prompt).ids
    start, count = time.perf_counter(), 0

    def counted(tokens):
        nonlocal count
        for token in tokens:
            count += 1
            yield token

    for piece in stream_text(tokenizer, counted(decoder.tokens(prompt, args.max_new_tokens, eos_ids(args.model),
                                                                 args.temperature))):
        print(piece, end="", flush=True)
    seconds = time.perf_counter() - start
    print()
    print(f"[{count} tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s including the prompt]", file=sys.stderr)


if __name__ == "__main__":
    main()
