"""Replies from a model, with the template it was trained on.

Every caller (evaluation, training samples, ``python -m instruct.generate``, chat) goes
through :func:`generate`. It decodes the prompts as a pool: at most ``batch_size`` rows share
one KV cache, a row leaves at its end of turn and the next prompt is prefilled into its
place, so no step is spent on a finished row and no batch waits for its longest reply
(``bench/bench_generate.py``). The prompt is rendered by the same function training used,
and generation stops at the template's end-of-turn token, which training supervised.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from instruct.data.batching import padded
from instruct.data.templates import Message, render_many, stop_tokens
from instruct.data.tokenize import token_ids
from instruct.modes import evaluating
from instruct.progress import progress

SPARE_COLUMNS = 64  # the cache is copied every 64 steps rather than every step

# The next token of each row, from its float32 logits [rows, vocab] and a function returning
# each row's ids so far (prompt + reply) as a [rows, length] tensor, called only when needed.
Chooser = Callable[[torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor]


class NotPoolable(Exception):
    """The model's KV cache is not one this module can merge and slice (sliding windows)."""


def generation_kwargs(sampling: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments for a sampling config (the lock-step path)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.do_sample,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:  # silence the model's own sampling defaults when decoding greedily
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    template: Any,
    conversations: Sequence[Sequence[Message]],
    sampling: Any,
    batch_size: int = 8,
    lock_step: bool | None = None,
    spare_columns: int = SPARE_COLUMNS,
    desc: str = "generate",
) -> list[str]:
    """One reply per conversation (each ends with a user turn), in the caller's order.

    Prompts are decoded longest first, at most ``batch_size`` rows at a time; a row leaves
    the batch at its end of turn (a stop id, a stop string or ``max_new_tokens``) and the next
    prompt is prefilled into its place. Greedy replies equal those of ``model.generate`` on
    batches of ``batch_size`` in the caller's order up to float noise, which padding and batch
    shape bring to both (equal on every prompt of the tests and of the benchmark). One of
    several processes (DDP, FSDP, ZeRO-3: see :func:`in_lock_step`), or a model whose cache
    has sliding windows, uses ``model.generate`` on batches of neighbours in that order.
    ``lock_step`` says whether this is such a process (by default :func:`in_lock_step`
    asks torch.distributed); ``spare_columns``: see :func:`spare_layer`. A progress bar named
    ``desc`` counts the finished replies (see :mod:`instruct.progress`).
    """
    if not conversations:
        return []
    stop_ids, stop_strings = stop_tokens(template, tokenizer)
    prompts = prompt_ids(conversations, template, tokenizer)
    # Longest first: the first batch's rows share a width, and each later prompt is no longer
    # than those before it, so it fits into cache columns that already exist.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    lock = in_lock_step(model) if lock_step is None else lock_step
    dist = torch.distributed
    main = not (lock and dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    with evaluating(model), progress(desc=desc, total=len(prompts), unit="reply",
                                     main=main) as bar:  # fmt: skip
        new = None
        if not lock:
            done = counted(stop_check(tokenizer, stop_ids, stop_strings,
                                      sampling.max_new_tokens), bar)  # fmt: skip
            try:
                new = decode_pool(model, prompts, order, chooser(sampling), done, batch_size,
                                  pad_of(tokenizer), spare_columns)  # fmt: skip
            except NotPoolable:
                bar.reset()
                if sampling.do_sample:
                    torch.manual_seed(sampling.seed)
        if new is None:
            new = generate_sorted(model, tokenizer, prompts, order, stop_ids, stop_strings,
                                  sampling, batch_size, bar)  # fmt: skip
    return [reply_text(ids, tokenizer, stop_ids, stop_strings) for ids in new]


def counted(done: Callable[[list[int]], bool], bar: Any) -> Callable[[list[int]], bool]:
    """``done``, ticking ``bar`` for each row it ends."""

    def ends(new: list[int]) -> bool:
        finished = done(new)
        if finished:
            bar.update()
        return finished

    return ends


def prompt_ids(
    conversations: Sequence[Sequence[Message]], template: Any, tokenizer: Any
) -> list[list[int]]:
    """Each conversation's prompt as token ids: rendered as in training, up to where the
    model starts its reply. A special-token string inside a message is encoded as text, so
    a user cannot forge turns (:mod:`instruct.data.content`)."""
    rendered = render_many(conversations, template, tokenizer, add_generation_prompt=True)
    return token_ids(rendered, tokenizer)


def reply_text(
    ids: Sequence[int], tokenizer: Any, stop_ids: Sequence[int], stop_strings: Sequence[str]
) -> str:
    """The reply in generated ``ids``: the text before the first stop id or stop string."""
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    text = tokenizer.decode(list(ids[:cut]), skip_special_tokens=False)
    for s in stop_strings:
        text = text.split(s, 1)[0]
    return text.strip()


def pad_of(tokenizer: Any) -> int:
    """The id written into padding columns (masked out, so any valid id would do)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def stop_check(
    tokenizer: Any, stop_ids: Sequence[int], stop_strings: Sequence[str], max_new_tokens: int
) -> Callable[[list[int]], bool]:
    """Whether a row's generated ids end its reply: a stop id, a stop string, or the budget."""
    ids = set(stop_ids)

    def done(new: list[int]) -> bool:
        if len(new) >= max_new_tokens or new[-1] in ids:
            return True
        if not stop_strings:
            return False
        # The whole reply is decoded, as reply_text decodes it, so a stop string that spans
        # tokens ends the row exactly when the text that reply_text cuts contains it.
        text = tokenizer.decode(new, skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    return done


def chooser(sampling: Any) -> Chooser:
    """The next-token rule of ``sampling``, with transformers' own logits processors in
    ``model.generate``'s order; greedy without a repetition penalty is a bare argmax."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    penalty = getattr(sampling, "repetition_penalty", None)
    if penalty is not None and penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    if sampling.do_sample:
        if sampling.temperature is not None and sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k is not None and sampling.top_k != 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p is not None and sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))

    def choose(logits: torch.Tensor, history: Callable[[], torch.Tensor]) -> torch.Tensor:
        if processors:
            logits = processors(history(), logits)
        if sampling.do_sample:
            return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)
        return logits.argmax(dim=-1)

    return choose


def in_lock_step(model: Any) -> bool:
    """Whether this is one of several processes, which may have to decode in step.

    Under FSDP or ZeRO-3 every forward pass gathers weights with collectives, so each process
    must run as many as the others; ``model.generate`` keeps finished processes stepping
    (``synced_gpus``), a pool would not. The model may be sharded without saying so here
    (``instruct.parallel.fsdp.root_gathered`` marks it only for transformers), so any
    process group of two or more takes that path.
    """
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def merged_adapter(model: Any) -> Iterator[Any]:
    """``model`` with its LoRA adapters merged into the base weights while inside, restored
    bit for bit on leaving.

    Unmerged, each adapted linear layer computes its base product plus two small ones, and
    the same eval replies took noticeably longer. peft's ``unmerge_adapter`` subtracts what
    it added, which leaves rounding in the weights, so the touched base parameters are copied
    to the CPU first and written back. Left as it is: a model without adapters, one whose
    base weights are quantised or not plain tensors, and one of several processes (sharded
    weights). (measured: docs/performance.md, "Measurements behind design choices")
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    plain = (torch.nn.Linear, torch.nn.Embedding)
    if (
        not layers
        or not hasattr(model, "merge_adapter")
        or in_lock_step(model)
        or getattr(model, "is_quantized", False)
        or any(layer.merged for layer in layers)
        or any(type(layer.get_base_layer()) not in plain for layer in layers)
    ):
        yield model
        return
    touched = {id(p): p for layer in layers for p in layer.get_base_layer().parameters()}
    saved = [(p, p.detach().to("cpu", copy=True)) for p in touched.values()]
    try:
        model.merge_adapter()
        yield model
    finally:
        if any(layer.merged for layer in layers):
            model.unmerge_adapter()
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)


def generate_sorted(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    order: Sequence[int],
    stop_ids: Sequence[int],
    stop_strings: Sequence[str],
    sampling: Any,
    batch_size: int,
    bar: Any = None,
) -> list[list[int]]:
    """The generated ids of every prompt from ``model.generate``, on batches of neighbours in
    ``order``; a batch ends when all its rows have (``bar`` ticks for each)."""
    kwargs = generation_kwargs(sampling)
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    device = next(model.parameters()).device
    pad_id = pad_of(tokenizer)
    new: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = padded([prompts[i] for i in chunk], pad_id, left=True)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            **kwargs,
        )
        for i, row in zip(chunk, out[:, ids.shape[1] :].tolist(), strict=True):
            new[i] = row
        if bar is not None:
            bar.update(len(chunk))
    return new


@dataclass
class Pool:
    """The rows being decoded. They share the columns of one KV cache, left-padded, so every
    row writes its next token into the same (new, last) column."""

    cache: Any  # a transformers DynamicCache; its batch dimension is the rows
    mask: torch.Tensor  # [rows, columns] long: 1 where the cache holds a real token
    position: torch.Tensor  # [rows] the position id of each row's next token
    last: torch.Tensor  # [rows] the token each row feeds in next (chosen, not yet cached)
    index: list[int]  # the prompt each row answers


def decode_pool(
    model: Any,
    prompts: Sequence[Sequence[int]],
    order: Sequence[int],
    choose: Chooser,
    done: Callable[[list[int]], bool],
    batch_size: int,
    pad_id: int,
    spare_columns: int = SPARE_COLUMNS,
) -> list[list[int]]:
    """The generated ids of every prompt, the stop token included, decoding the prompts in
    ``order`` with at most ``batch_size`` rows in the cache at once."""
    device = next(model.parameters()).device
    cache_name = cache_argument(model)
    new: list[list[int]] = [[] for _ in prompts]
    queue = list(order)
    pool: Pool | None = None
    while queue or pool is not None:
        rows = 0 if pool is None else len(pool.index)
        admit = bool(queue) and rows < batch_size
        if admit:
            joining, queue = queue[: batch_size - rows], queue[batch_size - rows :]
            batch, logits = prefill(model, [prompts[i] for i in joining], joining, pad_id, device,
                                    spare_columns)  # fmt: skip
        else:
            assert pool is not None
            batch, logits = pool, step(model, pool, cache_name)

        def history(rows: Pool = batch) -> torch.Tensor:
            return history_tensor([list(prompts[i]) + new[i] for i in rows.index], device)

        batch.last = choose(logits, history)
        keep = []
        for row, (i, token) in enumerate(zip(batch.index, batch.last.tolist(), strict=True)):
            new[i].append(token)
            if not done(new[i]):
                keep.append(row)
        kept = select(batch, keep)
        pool = join(pool, kept) if admit else kept
    return new


def history_tensor(history: Sequence[Sequence[int]], device: Any) -> torch.Tensor:
    """Rows of ids padded to one width with each row's own first id: a repetition penalty
    treats a row as a set of ids, so repeating one of its own ids changes nothing."""
    width = max(len(h) for h in history)
    return torch.tensor([[h[0]] * (width - len(h)) + list(h) for h in history], device=device)


def prefill(
    model: Any,
    prompts: Sequence[Sequence[int]],
    index: list[int],
    pad_id: int,
    device: Any,
    spare_columns: int = SPARE_COLUMNS,
) -> tuple[Pool, torch.Tensor]:
    """The prompts' KV cache, left-padded as ``model.generate`` pads them (in layers with
    ``spare_columns``: :func:`spare_layer`), and the float32 logits of each one's first reply
    token."""
    ids, mask = padded(prompts, pad_id, left=True)
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # model.generate's rule
    ids, mask, position = ids.to(device), mask.to(device), position.to(device)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position,
        use_cache=True,
        logits_to_keep=1,  # the output head on the last position only, as model.generate does
    )
    cache = out.get("cache")  # transformers >= 5.24; before, past_key_values
    cache = out.past_key_values if cache is None else cache
    check_poolable(cache)
    for i, layer in enumerate(cache.layers):
        cache.layers[i] = spare_layer(layer.keys, layer.values, spare_columns)
    pool = Pool(cache, mask, position[:, -1] + 1, ids[:, -1], index)
    return pool, out.logits[:, -1, :].float()


def step(model: Any, pool: Pool, cache_name: str) -> torch.Tensor:
    """Feed every row its last token; the float32 logits of the next one."""
    pool.mask = torch.cat([pool.mask, pool.mask.new_ones((len(pool.index), 1))], dim=1)
    out = model(
        input_ids=pool.last[:, None],
        attention_mask=pool.mask,
        position_ids=pool.position[:, None],
        use_cache=True,
        logits_to_keep=1,
        **{cache_name: pool.cache},
    )
    pool.position = pool.position + 1
    return out.logits[:, -1, :].float()


def cache_argument(model: Any) -> str:
    """The name forward takes a KV cache by: ``cache`` from transformers 5.24, which warns
    that ``past_key_values`` goes in 5.40, and ``past_key_values`` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def check_poolable(cache: Any) -> None:
    """Rows can be merged and sliced only in a cache of plain growing layers."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise NotPoolable(type(cache).__name__)


def spare_layer(keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE_COLUMNS) -> Any:
    """A cache layer holding ``keys`` and ``values`` with spare columns after them.

    transformers' DynamicLayer appends a step's key and value with ``torch.cat``, a copy of
    the whole cache at every step, a sizeable share of a decoding step. This one writes the
    new column into room reserved beforehand, and reserves ``spare`` more (by default
    :data:`SPARE_COLUMNS`) when it runs out, so the cache is copied once every that many
    steps. (measured: docs/performance.md, "Measurements behind design choices")
    """
    layer = spare_layer_class()()
    layer.device, layer.dtype, layer.is_initialized = keys.device, keys.dtype, True
    layer.spare = spare
    layer.adopt(keys, values)
    return layer


@functools.cache
def spare_layer_class() -> type:
    """:func:`spare_layer`'s class, built once (transformers is imported only when needed)."""
    from transformers.cache_utils import DynamicLayer

    class SpareLayer(DynamicLayer):
        spare: int  # columns reserved beyond those in use (set by spare_layer)

        def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Hold ``keys`` and ``values`` (copied) with room for more columns."""
            b, h, n, d = keys.shape
            self.key_room = keys.new_empty((b, h, n + self.spare, d))
            self.value_room = values.new_empty((b, h, n + self.spare, values.shape[-1]))
            self.key_room[:, :, :n] = keys
            self.value_room[:, :, :n] = values
            self.keys, self.values = self.key_room[:, :, :n], self.value_room[:, :, :n]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            n, q = self.keys.shape[-2], key_states.shape[-2]
            if n + q > self.key_room.shape[-2]:
                self.adopt(self.keys, self.values)
            self.key_room[:, :, n : n + q] = key_states
            self.value_room[:, :, n : n + q] = value_states
            self.keys, self.values = self.key_room[:, :, : n + q], self.value_room[:, :, : n + q]
            return self.keys, self.values

    return SpareLayer


def select(pool: Pool, rows: list[int]) -> Pool | None:
    """``pool`` with only ``rows``, and without the leading columns none of them uses."""
    if len(rows) == len(pool.index):
        return pool
    if not rows:
        return None
    keep = torch.tensor(rows, device=pool.mask.device)
    mask = pool.mask[keep]
    first = int(mask.any(dim=0).long().argmax())  # a kept row has at least its prompt
    for layer in pool.cache.layers:
        layer.adopt(layer.keys[keep, :, first:], layer.values[keep, :, first:])
    return Pool(
        pool.cache,
        mask[:, first:],
        pool.position[keep],
        pool.last[keep],
        [pool.index[r] for r in rows],
    )


def join(pool: Pool | None, fresh: Pool | None) -> Pool | None:
    """One pool of the rows of both, each left-padded to the wider one's columns."""
    if pool is None or fresh is None:
        return fresh if pool is None else pool
    width = max(pool.mask.shape[1], fresh.mask.shape[1])

    def widen(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = width - t.shape[-dim_from_end]
        return t if missing == 0 else F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0))

    for a, b in zip(pool.cache.layers, fresh.cache.layers, strict=True):
        a.adopt(
            torch.cat([widen(a.keys, 2), widen(b.keys, 2)]),
            torch.cat([widen(a.values, 2), widen(b.values, 2)]),
        )
    return Pool(
        pool.cache,
        torch.cat([widen(pool.mask, 1), widen(fresh.mask, 1)]),
        torch.cat([pool.position, fresh.position]),
        torch.cat([pool.last, fresh.last]),
        pool.index + fresh.index,
    )


def load_for_inference(checkpoint: str) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, run config)`` from a checkpoint, on the GPU when there is one."""
    from instruct.checkpoint import load_checkpoint

    model, tokenizer, cfg = load_checkpoint(checkpoint)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer, cfg
