"""Batched generation: today's path (batches of 8 in file order) vs ``instruct.decoding``.

    python bench/bench_generate.py                        # SmolLM2-135M, the 36 test prompts
    python bench/bench_generate.py --model tiny           # the random tiny model
    python bench/bench_generate.py --prompts my.jsonl --limit 100 --repeats 3
    python bench/bench_generate.py --threads 0 --json bench-generate.json   # torch's threads
    python bench/bench_generate.py --prompts instruct/data/ifeval.jsonl --limit 100 \
        --new-batch-size 64 --threads 0 --repeats 1    # IFEval prompts, eval's batch
    python bench/bench_generate.py --llama shipped      # llama.cpp on the Q4_1 file as shipped
    python bench/bench_generate.py --llama none --lora  # LoRA: merged vs unmerged adapters

Both sides decode the same prompts greedily (each record as one user turn through
``instruct.data.templates.to_messages``, the model's default template), ``--max-new-tokens`` 256,
``--batch-size`` 8. The baseline is a verbatim copy of the generation loop before the pool:
``model.generate`` on consecutive batches of the file, left-padded, each row cut at its first
stop id afterwards. The sides alternate within each repeat; the table shows medians, the
ratio new / baseline, and how many replies differ (they should not).

"row-tokens fed" counts what the model computed: every (row, token) the forward passes took,
padding and finished rows included; "reply tokens" counts the replies' own tokens.

The llama.cpp anchor (``--llama``, on by default for a model shipped as GGUF) serves the same
prompts from the same weights with llama-cpp-python, in-process: ``Llama.generate`` on each
prompt's token ids (ours, so the prompt is byte for byte the one the other sides prefill),
greedy (``temp=0``), stopped at the template's end of turn or ``--max-new-tokens``, the reply
cut by the same function. ``--llama f32`` (the default) serves the shipped GGUF with every
tensor dequantised to float32: the very values our model holds (transformers dequantises the
same file with the same ``gguf.quants``); ``--llama shipped`` serves the file as shipped
(SmolLM2: Q4_1), llama.cpp's own fast path. It decodes one prompt at a time: llama-cpp-python
has no batched generation, and its OpenAI-compatible server (``python -m llama_cpp.server``)
holds a lock around the model, so it would serve the same sequence plus HTTP. Without
llama-cpp-python the column is skipped and the install command printed.

``--lora`` adds LoRA adapters (``lora=default``: rank 8, all linear layers) with random
``lora_B`` (seeded, std ``--lora-std``) so that they change the replies, and a third side: the
pool with the adapters merged into the weights (``instruct.decoding.merged_adapter``, what
evaluation does), against the pool on the unmerged adapters.
"""

from __future__ import annotations

import argparse
import importlib.util
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
from instruct.decoding import (  # noqa: E402
    generate,
    generation_kwargs,
    merged_adapter,
    prompt_ids,
    reply_text,
    stop_check,
)
from instruct.model import (  # noqa: E402
    apply_lora,
    build_model,
    cache_root,
    fit_tokenizer,
    locate_gguf,
)

# 36 varied prompts (explanations, code, maths, writing; with and without an input).
DEFAULT_PROMPTS = REPO / "tests" / "fixtures" / "varied_prompts.jsonl"
MODELS = {"smollm2": "smollm2-135m", "smollm2-135m": "smollm2-135m", "tiny": "tiny"}
LLAMA_INSTALL = "pip install llama-cpp-python"
LLAMA_CHOICES = ("f32", "shipped", "none")


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
    """Counts forward calls and the (row, token) positions they take, padding included: on
    the transformers model itself (a peft model's ``generate`` calls its base model's)."""

    def __init__(self, model: Any) -> None:
        self.calls = 0
        self.row_tokens = 0
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.handle = inner.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.calls += 1
            self.row_tokens += ids.numel()


def merged_pool(model: Any, *args: Any) -> list[str]:
    """The pool with the LoRA adapters merged into the weights while it runs (evaluation's way)."""
    with merged_adapter(model) as merged:
        return generate(merged, *args)


def add_random_lora(model: Any, std: float, seed: int = 0) -> Any:
    """``model`` with ``lora=default`` adapters whose ``lora_B`` is drawn (std ``std``), not
    zero, so that they change the replies as a trained adapter does."""
    cfg = compose(["lora=default"]).lora
    model = apply_lora(model, cfg, [])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


# The llama.cpp anchor -----------------------------------------------------------------------


def llama_gguf(model_cfg: Any, which: str) -> tuple[Path | None, str]:
    """``(GGUF file, what it holds)`` for llama.cpp to serve, or ``(None, why not)``.

    ``which``: ``f32``, the shipped file dequantised to float32 (our model's values);
    ``shipped``, the file as shipped; ``none``, no anchor.
    """
    if which == "none":
        return None, "--llama none"
    if model_cfg.builder != "gguf":
        return None, f"model={model_cfg.name} is not shipped as GGUF"
    if importlib.util.find_spec("llama_cpp") is None:
        return None, f"llama-cpp-python is not installed: {LLAMA_INSTALL}"
    shipped = locate_gguf(model_cfg)
    if which == "shipped":
        return shipped, f"{shipped.name} as shipped ({gguf_file_type(shipped)})"
    out = cache_root() / "models" / f"{shipped.stem}-{shipped.stat().st_size}.F32.gguf"
    if not out.is_file():
        dequantised_gguf(shipped, out)
    return out, f"{shipped.name} dequantised to F32 (our weights)"


def gguf_file_type(file: Path) -> str:
    """The ``general.file_type`` of a GGUF file by name (``MOSTLY_Q4_1``, ``ALL_F32``)."""
    import gguf

    field = gguf.GGUFReader(file).fields.get("general.file_type")
    if field is None:
        return "file type not recorded"
    return gguf.LlamaFileType(int(field.contents())).name


def dequantised_gguf(src: Path, out: Path) -> None:
    """Write ``src`` with every tensor dequantised to float32 into ``out``, metadata copied.

    These are the values our model holds: transformers loads the same file through the same
    ``gguf.quants.dequantize`` (then permutes Q and K into its own layout, which llama.cpp's
    layout here does not need), and casts nothing, since float32 holds every Q4_1 value.
    """
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)


def load_llama(gguf_path: Path, threads: int, n_ctx: int) -> Any:
    """llama.cpp on ``gguf_path``, CPU, ``threads`` threads for decoding and prompts."""
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        seed=0,
        verbose=False,
    )


def generate_llama(
    llama: Any,
    tokenizer: Any,
    template: Any,
    conversations: Sequence[Sequence[Message]],
    sampling: Any,
) -> list[str]:
    """Greedy replies from llama.cpp, one prompt at a time: each prompt's token ids as
    ``instruct.decoding.generate`` prefills them, each reply stopped and cut as it cuts."""
    stop_ids, stop_strings = stop_tokens(template, tokenizer)
    done = stop_check(tokenizer, stop_ids, stop_strings, sampling.max_new_tokens)
    replies = []
    for ids in prompt_ids(conversations, template, tokenizer):
        new: list[int] = []
        for token in llama.generate(ids, temp=0.0, repeat_penalty=1.0):
            new.append(token)
            if done(new):
                break
        replies.append(reply_text(new, tokenizer, stop_ids, stop_strings))
    return replies


# The run ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument(
        "--llama",
        choices=LLAMA_CHOICES,
        default="f32",
        help="the llama.cpp anchor: the shipped GGUF dequantised to F32 (our weights), "
        "the file as shipped, or none",
    )
    parser.add_argument(
        "--lora", action="store_true", help="random LoRA adapters; adds the merged side"
    )
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the drawn lora_B")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    return parser.parse_args(argv)


def build_sides(
    args: argparse.Namespace, model: Any, tokenizer: Any, cfg: Any, conversations: list
) -> tuple[dict[str, tuple[Callable[..., list[str]], Any, tuple]], str]:
    """``{side: (function, counted model or None, arguments)}`` and the anchor's line."""
    greedy = SimpleNamespace(
        max_new_tokens=args.max_new_tokens, do_sample=False, repetition_penalty=1.0, seed=0
    )
    common = (tokenizer, cfg.template, conversations, greedy)
    sides: dict[str, tuple[Callable[..., list[str]], Any, tuple]] = {
        "baseline": (generate_baseline, model, (model, *common, args.batch_size)),
        "new": (generate, model, (model, *common, args.new_batch_size or args.batch_size)),
    }
    if args.lora:
        sides["merged"] = (
            merged_pool,
            model,
            (model, *common, args.new_batch_size or args.batch_size),
        )
    gguf_path, about = llama_gguf(cfg.model, "none" if args.lora else args.llama)
    if args.lora and args.llama != "none":
        about = "the GGUF holds no adapters (--lora)"
    if gguf_path is None:
        return sides, f"llama.cpp: skipped ({about})"
    longest = max(len(ids) for ids in prompt_ids(conversations, cfg.template, tokenizer))
    n_ctx = max(2048, longest + args.max_new_tokens)
    llama = load_llama(gguf_path, torch.get_num_threads(), n_ctx)
    sides["llama.cpp"] = (generate_llama, None, (llama, *common))
    import llama_cpp

    line = (
        f"llama.cpp: llama-cpp-python {llama_cpp.__version__} in-process, {about}, "
        f"one prompt at a time, {torch.get_num_threads()} threads, n_ctx {n_ctx}"
    )
    return sides, line


def timed(
    side: Callable[..., list[str]], counted: Any, args: tuple
) -> tuple[list[str], float, int, int]:
    """``(replies, seconds, forward calls, row-tokens fed)`` of one run of ``side``; the
    counts are those of the torch model ``counted`` (0 when None: llama.cpp)."""
    counter = FedCounter(counted) if counted is not None else None
    try:
        start = time.perf_counter()
        replies = side(*args)
        seconds = time.perf_counter() - start
    finally:
        if counter is not None:
            counter.handle.remove()
    if counter is None:
        return replies, seconds, 0, 0
    return replies, seconds, counter.calls, counter.row_tokens


def differing(a: Sequence[str], b: Sequence[str]) -> list[int]:
    """The indices where two lists of replies differ."""
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sides, print the table; every figure, as written by ``--json``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose([f"model={MODELS[args.model]}"])
    model, tokenizer = build_model(cfg.model)
    fit_tokenizer(model, tokenizer, cfg.template)
    model.eval()
    if args.lora:
        model = add_random_lora(model, args.lora_std)
    conversations = load_conversations(args.prompts, cfg.template, args.limit)
    sides, anchor = build_sides(args, model, tokenizer, cfg, conversations)
    print(
        f"model {cfg.model.name}{' + random LoRA r8 all-linear' if args.lora else ''}, "
        f"template {cfg.template.name}, {len(conversations)} prompts "
        f"from {args.prompts.name}, greedy, max_new_tokens {args.max_new_tokens}, batch "
        f"{args.batch_size} (new: {args.new_batch_size or args.batch_size}), {args.repeats} "
        f"repeats, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}\n{anchor}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    replies: dict[str, list[str]] = {}
    unstable = 0  # replies of a side that differ from its own first run
    for repeat in range(args.repeats):
        for name, (side, counted, inputs) in sides.items():
            out, seconds, calls, fed = timed(side, counted, inputs)
            first = replies.setdefault(name, out)
            unstable += len(differing(first, out))
            runs[name].append({"seconds": seconds, "forward_calls": calls, "row_tokens": fed})
            print(f"  repeat {repeat + 1} {name:9s} {seconds:8.1f} s  {calls} forwards", flush=True)

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
        tokens = sum(
            len(ids) for ids in tokenizer(replies[name], add_special_tokens=False).input_ids
        )
        fed = (f"{last['forward_calls']:9d} {last['row_tokens']:15,d}"
               if sides[name][1] is not None else f"{'-':>9s} {'-':>15s}")  # fmt: skip
        print(
            f"{name:9s} {seconds[name]:9.1f} {n / seconds[name]:10.3f} "
            f"{tokens / seconds[name]:12.1f} {fed}  "
            f"{[round(r['seconds'], 1) for r in runs[name]]}"
        )
    speedup = seconds["baseline"] / seconds["new"]
    differ = differing(replies["baseline"], replies["new"])
    print(f"\nspeed-up new / baseline: {speedup:.2f}x  ({reply_tokens:,} reply tokens)")
    print(f"replies that differ: {len(differ)} of {n}" + (f" (prompts {differ})" if differ else ""))
    result: dict[str, Any] = {
        "model": cfg.model.name,
        "prompts": str(args.prompts),
        "n": n,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "anchor": anchor,
        "runs": runs,
        "median_seconds": seconds,
        "speedup": speedup,
        "reply_tokens": reply_tokens,
        "differ": differ,
        "replies": replies,
    }
    if "merged" in sides:
        merged = differing(replies["new"], replies["merged"])
        result["merged_speedup"] = seconds["new"] / seconds["merged"]
        result["merged_differ"] = merged
        print(
            f"LoRA merged / unmerged (both the pool): {result['merged_speedup']:.2f}x; "
            f"replies that differ: {len(merged)} of {n}"
            + (f" (prompts {merged})" if merged else "")
        )
    if "llama.cpp" in sides:
        same = n - len(differing(replies["new"], replies["llama.cpp"]))
        ratio = seconds["llama.cpp"] / seconds["new"]
        result["llama_ratio"] = ratio
        result["llama_equal"] = same
        faster = "new" if ratio >= 1 else "llama.cpp"
        print(
            f"new / llama.cpp: {ratio:.2f}x ({faster} faster; baseline / llama.cpp "
            f"{seconds['llama.cpp'] / seconds['baseline']:.2f}x); llama.cpp replies equal to "
            f"ours: {same} of {n}"
        )
    if unstable:
        print(f"replies that changed between repeats: {unstable}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
