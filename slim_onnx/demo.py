"""`slim-onnx demo`: the whole user path on an embedded default, with no download.

1. A small Llama (4 blocks, hidden 128) and a byte-level BPE tokenizer are built locally and the
   model is trained for a few seconds on English prose that ships with Python (pydoc's topics),
   so that it predicts text better than chance and compression has something to lose.
2. It is exported with Optimum (text-generation-with-past), as a user would.
3. `slim_onnx.compress` calibrates it on held-out prose and rewrites every weight MatMul into
   SlimMatMul with the default configuration.
4. Dense and compressed models are evaluated on further held-out prose (perplexity, KL divergence
   and top-1 agreement with the dense model) on both paths - with the slim_onnx kernels and on
   stock onnxruntime through the fallback functions - and timed for greedy generation.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

SEQ = 128


def _prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _train_model(root: Path, text: str, steps: int, seconds: float, seed: int) -> tuple[float, int]:
    """Tokenizer + tied-embedding Llama trained for `steps` AdamW steps or `seconds`, whichever ends
    first; saved to root/hf. Returns the last loss and the steps taken."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=2 * SEQ)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    windows = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    loss, step, start = float("nan"), 0, time.perf_counter()
    while step < steps and time.perf_counter() - start < seconds:
        step += 1
        batch = windows[torch.randint(len(windows), (8,), generator=generator)]
        loss_t = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss_t.backward()
        optimizer.step()
        loss = float(loss_t)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return loss, step


def _generation(model_dir: Path, prompts: list[str], with_library: bool) -> tuple[list[list[int]], float]:
    """Greedy 32-token continuations of the prompts and the tokens per second."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from slim_onnx.runtime import session_options

    so = session_options() if with_library else ort.SessionOptions()
    model = ORTModelForCausalLM.from_pretrained(model_dir, session_options=so, use_io_binding=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    outputs, tokens, start = [], 0, time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        out = model.generate(**ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        outputs.append(out[0, ids["input_ids"].shape[1]:].tolist())
        tokens += len(outputs[-1])
    return outputs, tokens / (time.perf_counter() - start)


def run_demo(steps: int = 1000, seconds: float = 60.0, workdir: str | None = None, seed: int = 0) -> int:
    try:
        import optimum.exporters.onnx  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("slim-onnx demo exports a model with Optimum: install the optimum extra, `pip install '.[optimum]'`")
        return 2
    from optimum.exporters.onnx import main_export

    from slim_onnx.calibration import TextCalibration
    from slim_onnx.config import SlimConfig
    from slim_onnx.evaluate import evaluate
    from slim_onnx.pipeline import compress

    text = _prose()
    train, calib, held_out = text[:300_000], text[300_000:360_000], text[360_000:420_000]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        (root / "calib.txt").write_text(calib)
        (root / "eval.txt").write_text(held_out)
        t0 = time.perf_counter()
        loss, taken = _train_model(root, train, steps, seconds, seed)
        print(f"1. built a 4-block Llama (hidden 128, vocab 512) and trained it {taken} steps on pydoc prose: "
              f"loss {loss:.2f} ({time.perf_counter() - t0:.0f} s)")

        t0 = time.perf_counter()
        main_export(str(root / "hf"), str(root / "dense"), task="text-generation-with-past")
        print(f"2. exported with Optimum (text-generation-with-past) to {root / 'dense'} ({time.perf_counter() - t0:.0f} s)")

        report = compress(root / "dense", root / "slim", SlimConfig(), TextCalibration(root / "calib.txt", 32, SEQ, seed),
                          overwrite=True, log=lambda msg: None)
        totals = report["totals"]
        print(f"3. compressed {totals['layers']} layers with the default SlimConfig (2:4 + 4-bit GPTQ group 128, "
              f"rank-0.1 4-bit adapters) in {totals['seconds']} s: linear weights {totals['bytes_float16'] / 2**10:.0f} KiB "
              f"(float16) -> {totals['bytes_packed'] / 2**10:.0f} KiB ({totals['bytes_packed'] / totals['bytes_float16']:.2f}x); "
              f"{report['attention_fused']} attention layers fused into GroupQueryAttention")

        dense = evaluate(root / "dense", root / "eval.txt", seqlen=SEQ, max_windows=40)
        kernel = evaluate(root / "slim", root / "eval.txt", root / "dense", seqlen=SEQ, max_windows=40)
        fallback = evaluate(root / "slim", root / "eval.txt", root / "dense", seqlen=SEQ, max_windows=40,
                            with_library=False)
        print(f"4. held-out prose ({dense['tokens']} tokens): perplexity dense {dense['perplexity']:.2f}, "
              f"compressed {kernel['perplexity']:.2f} with the slim_onnx kernels, {fallback['perplexity']:.2f} on stock "
              f"onnxruntime (fallback functions)")
        print(f"   against the dense model: KL {kernel['kl']:.3f}, top-1 agreement {kernel['top1_agreement']:.1%}")

        prompts = [held_out[i: i + 200] for i in (0, 5000, 10000)]
        dense_tokens, dense_speed = _generation(root / "dense", prompts, False)
        slim_tokens, slim_speed = _generation(root / "slim", prompts, True)
        fallback_tokens, fallback_speed = _generation(root / "slim", prompts, False)
        same = sum(a == b for a, b in zip(slim_tokens, dense_tokens))
        print(f"5. greedy generation, 3 prompts x 32 tokens: dense {dense_speed:.0f} tokens/s, compressed {slim_speed:.0f} "
              f"tokens/s (kernels), {fallback_speed:.0f} tokens/s (fallback); {same}/3 continuations identical to dense")
        (root / "demo_report.json").write_text(json.dumps(
            {"loss": loss, "compress": totals, "dense": dense, "kernel": kernel, "fallback": fallback,
             "tokens_per_s": {"dense": dense_speed, "kernel": slim_speed, "fallback": fallback_speed}}, indent=2))
        # The two paths of the compressed model compute the same function (the kernels' int8
        # activations aside): their perplexities must agree closely.
        ok = abs(kernel["perplexity"] - fallback["perplexity"]) / fallback["perplexity"] < 0.05
        print("result:", "OK" if ok else "MISMATCH between the kernel and fallback paths")
        return 0 if ok else 1
