"""Memory and time of chatft's two loss heads on one micro-batch: the chunked head against the model's own logits.

    python bench/loss_head.py --head logits
    python bench/loss_head.py --head chunked

One process per head, so each peak is its own. The model has Qwen2.5-0.5B's shapes (152k vocabulary, random
weights, built on the spot) with LoRA on every linear layer but the head; the micro-batch is one padding-free
row of `--conversations` conversations of `--length` tokens whose last two thirds are supervised. Prints the
loss, the seconds of one forward and backward, and the process's peak memory (CUDA: max allocated; CPU: peak
RSS) before and after.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":  # see bench/run.py
    sys.path[0] = str(ROOT)

from bench.workloads import LORA_TARGETS, QWEN25_05B  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", choices=["chunked", "logits"], required=True)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--length", type=int, default=512, help="tokens per conversation")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--layers", type=int, default=QWEN25_05B.layers, help="decoder layers (fewer: a quick run)")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatft.train import attention, losses, memory

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shape = QWEN25_05B
    config = shape.config(num_hidden_layers=args.layers)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS)))
    attention.use_segment_sdpa(model)
    tokens = args.conversations * args.length
    input_ids = torch.randint(0, shape.vocab, (1, tokens))
    labels = input_ids.clone()
    labels[:, :tokens // 3] = -100
    batch = {"input_ids": input_ids, "labels": labels,
             "position_ids": torch.arange(args.length).repeat(args.conversations)[None]}
    head = losses.head_for(model, shape.vocab, device) if args.head == "chunked" else None
    if args.head == "chunked" and head is None:
        raise SystemExit("the chunked head does not reproduce this model's logits")

    def peak_mb() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return memory.peak_rss() / 2**20

    before = peak_mb()
    started = time.perf_counter()
    loss, _ = losses.loss_sum(model, batch, device, head)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    supervised = int((labels[:, 1:] != -100).sum())
    print(f"head {args.head} on {device.type} ({args.dtype}): {tokens} tokens, {supervised} supervised, "
          f"summed loss {float(loss.detach()):.4f}, {seconds:.1f} s, peak memory {before:,.0f} MB before, "
          f"{peak_mb():,.0f} MB after")


if __name__ == "__main__":
    main()
