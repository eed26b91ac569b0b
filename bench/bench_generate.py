"""Batched generation: today's path (batches of 8 in file order) vs ``instruct.decoding``.

    python bench/bench_generate.py                        # SmolLM2-135M, the 36 test prompts
    python bench/bench_generate.py --model tiny           # the random tiny model
    python bench/bench_generate.py --prompts my.jsonl --limit 100 --repeats 3
    python bench/bench_generate.py --threads 0 --json bench-generate.json   # torch's threads
    python bench/bench_generate.py --prompts instruct/data/ifeval.jsonl --limit 100 \
        --new-batch-size 64 --threads 0 --repeats 1    # IFEval prompts, eval's batch

Both sides decode the same prompts greedily (each record as one user turn through
``instruct.data.templates.to_messages``, the model's default template), ``--max-new-tokens`` 256,
``--batch-size`` 8. The baseline is a verbatim copy of the generation loop before the pool:
``model.generate`` on consecutive batches of the file, left-padded, each row cut at its first
stop id afterwards. The sides alternate within each repeat; the table shows medians, the
ratio new / baseline, and how many replies differ (they should not).

"row-tokens fed" counts what the model computed: every (row, token) the forward passes took,
padding and finished rows included; "reply tokens" counts the replies' own tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instruct.config import compose  # noqa: E402
from instruct.data.templates import Message, render_many, stop_tokens, to_messages  # noqa: E402
from instruct.decoding import generate, generation_kwargs  # noqa: E402
from instruct.model import build_model, fit_tokenizer  # noqa: E402

# 36 varied prompts (explanations, code, maths, writing; with and without an input).
DEFAULT_PROMPTS = REPO / "tests" / "fixtures" / "varied_prompts.jsonl"
MODELS = {"smollm2": "smollm2-135m", "smollm2-135m": "smollm2-135m", "tiny": "tiny"}


@torch.no_grad()
def generate_baseline(
    model: Any,
    tokenizer: Any,
    template: Any,
    conversations: Sequence[Sequence[Message]],
    sampling: Any,
    batch_size: int = 8,
) -> list[str]:
    """``instruct.decoding.generate`` as it was before the pool (kept verbatim)."""
    stop_ids, stop_strings = stop_tokens(template, tokenizer)
    kwargs = generation_kwargs(sampling)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        rendered = render_many(chunk, template, tokenizer, add_generation_prompt=True)
        prompts = [tokenizer(r.text, add_special_tokens=False).input_ids for r in rendered]
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            text = tokenizer.decode(row[:cut], skip_special_tokens=False)
            for s in stop_strings:
                text = text.split(s, 1)[0]
            replies.append(text.strip())
    model.train(was_training)
    return replies


def load_conversations(path: Path, template: Any, limit: int | None) -> list[list[Message]]:
    """Each JSONL record (``instruction`` [+ ``input``], ``messages``, or an IFEval record's
    ``prompt``, as the ifeval suite asks it) as a conversation."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if limit is not None:
        records = records[:limit]
    conversations = []
    for record in records:
        if "instruction_id_list" in record:  # an IFEval-format record: its prompt, one turn
            record = {"instruction": record["prompt"], "input": ""}
        messages = to_messages(record, template)
        if messages[-1]["role"] == "assistant":  # a worked example: ask for its last reply
            messages = messages[:-1]
        conversations.append(messages)
    return conversations


class FedCounter:
    """Counts forward calls and the (row, token) positions they take, padding included."""

    def __init__(self, model: Any) -> None:
        self.calls = 0
        self.row_tokens = 0
        self.handle = model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.calls += 1
            self.row_tokens += ids.numel()


def timed(
    side: Callable[..., list[str]], model: Any, args: tuple
) -> tuple[list[str], float, int, int]:
    """``(replies, seconds, forward calls, row-tokens fed)`` of one run of ``side``."""
    counter = FedCounter(model)
    try:
        start = time.perf_counter()
        replies = side(model, *args)
        seconds = time.perf_counter() - start
    finally:
        counter.handle.remove()
    return replies, seconds, counter.calls, counter.row_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="rows at once, both sides")
    parser.add_argument(
        "--new-batch-size",
        type=int,
        default=None,
        help="rows at once for the new side only (the eval suites use eval.batch_size, 64)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    # One thread: on the shared 2-core machine two OpenMP threads per process stall each other
    # whenever another process runs (a 36-prompt baseline ran > 35 min at 2, 4 min at 1).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = compose([f"model={MODELS[args.model]}"])
    model, tokenizer = build_model(cfg.model)
    fit_tokenizer(model, tokenizer, cfg.template)
    model.eval()
    conversations = load_conversations(args.prompts, cfg.template, args.limit)
    greedy = SimpleNamespace(
        max_new_tokens=args.max_new_tokens, do_sample=False, repetition_penalty=1.0, seed=0
    )
    inputs = {
        "baseline": (tokenizer, cfg.template, conversations, greedy, args.batch_size),
        "new": (tokenizer, cfg.template, conversations, greedy,
                args.new_batch_size or args.batch_size),
    }  # fmt: skip
    sides = {"baseline": generate_baseline, "new": generate}
    print(
        f"model {cfg.model.name}, template {cfg.template.name}, {len(conversations)} prompts "
        f"from {args.prompts.name}, greedy, max_new_tokens {args.max_new_tokens}, batch "
        f"{args.batch_size} (new: {args.new_batch_size or args.batch_size}), {args.repeats} "
        f"repeats, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    replies: dict[str, list[str]] = {}
    unstable = 0  # replies of a side that differ from its own first run
    for repeat in range(args.repeats):
        for name, side in sides.items():
            out, seconds, calls, fed = timed(side, model, inputs[name])
            first = replies.setdefault(name, out)
            unstable += sum(a != b for a, b in zip(first, out, strict=True))
            runs[name].append({"seconds": seconds, "forward_calls": calls, "row_tokens": fed})
            print(f"  repeat {repeat + 1} {name:8s} {seconds:8.1f} s  {calls} forwards", flush=True)

    encoded = tokenizer(replies["new"], add_special_tokens=False).input_ids
    reply_tokens = sum(len(ids) for ids in encoded)
    n = len(conversations)
    seconds = {name: statistics.median(r["seconds"] for r in runs[name]) for name in sides}
    print(
        f"\n{'side':9s} {'median s':>9s} {'replies/s':>10s} {'reply tok/s':>12s} "
        f"{'forwards':>9s} {'row-tokens fed':>15s}  every run (s)"
    )
    for name in sides:
        last = runs[name][-1]
        print(
            f"{name:9s} {seconds[name]:9.1f} {n / seconds[name]:10.3f} "
            f"{reply_tokens / seconds[name]:12.1f} {last['forward_calls']:9d} "
            f"{last['row_tokens']:15,d}  {[round(r['seconds'], 1) for r in runs[name]]}"
        )
    speedup = seconds["baseline"] / seconds["new"]
    pairs = zip(replies["baseline"], replies["new"], strict=True)
    differ = [i for i, (a, b) in enumerate(pairs) if a != b]
    print(f"\nspeed-up new / baseline: {speedup:.2f}x  ({reply_tokens:,} reply tokens)")
    print(f"replies that differ: {len(differ)} of {n}" + (f" (prompts {differ})" if differ else ""))
    if unstable:
        print(f"replies that changed between repeats: {unstable}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": cfg.model.name,
                    "prompts": str(args.prompts),
                    "n": n,
                    "max_new_tokens": args.max_new_tokens,
                    "threads": torch.get_num_threads(),
                    "runs": runs,
                    "median_seconds": seconds,
                    "speedup": speedup,
                    "reply_tokens": reply_tokens,
                    "differ": differ,
                    "replies": replies,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
