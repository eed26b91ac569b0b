"""``python -m instruct.export checkpoint=<dir> out=<dir>``: a folder a serving engine loads.

``merge=true`` (the default): LoRA adapters (and any token rows a template added) are merged
into the base weights, a standard Hugging Face model folder, so
``AutoModelForCausalLM.from_pretrained(out)``, ``transformers serve out`` and ``vllm serve out``
need nothing from this project.

``merge=false``: the LoRA adapter alone, in peft's layout (``adapter_config.json`` +
``adapter_model.safetensors``), for ``PeftModel.from_pretrained(base, out)`` or vLLM's
``--enable-lora``. Its ``base_model_name_or_path`` is where the base model was loaded from in
training (a local folder, made absolute, or a hub id); a base built in memory (``model=tiny``)
has no such place, so it is written beside the adapter as ``out/base``.

Either folder holds the tokenizer with the training template as its ``chat_template`` and a
generation config that stops at the template's end of turn (see docs/serving.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from instruct.checkpoint import CONFIG_FILE, TEMPLATE_FILE, load_checkpoint
from instruct.entry import hydra_main
from instruct.errors import ConfigError
from instruct.model import resolve_dtype, stop_at_end_of_turn
from instruct.progress import progress

BASE_FOLDER = "base"  # out/base: the base model of an adapter whose base exists only in memory


def export(
    checkpoint: str | Path, out: str | Path, dtype: str | None = None, merge: bool = True
) -> Path:
    """Write ``checkpoint`` as a new folder ``out`` (merged, or the adapter alone with
    ``merge=False``); never touches an existing folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out={out} already exists and is not empty; pick a new folder")
    bar = progress(total=3, desc="export", unit="step")  # load, merge, write
    with bar:
        model, tokenizer, cfg = load_checkpoint(checkpoint)
        bar.update()
        if not merge:
            check_adapter(model, checkpoint)
        elif hasattr(model, "merge_and_unload"):  # LoRA
            model = model.merge_and_unload()
        if dtype:
            model = model.to(resolve_dtype(dtype))
        stop_at_end_of_turn(model, tokenizer, cfg.template)
        bar.update()
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if merge:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_adapter(model, tokenizer, tmp, out)
        tokenizer.save_pretrained(tmp)
        bar.update()
    for name in (CONFIG_FILE, TEMPLATE_FILE):  # provenance: how it was trained
        shutil.copy2(Path(checkpoint) / name, tmp / f"instruct_{name}")
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    return out


def check_adapter(model: Any, checkpoint: str | Path) -> None:
    """``merge=false`` needs a LoRA adapter that fits the unchanged base model."""
    if not hasattr(model, "merge_and_unload"):
        raise ConfigError(
            f"merge=false: {checkpoint} is a fully fine-tuned model (trained with lora=none), "
            "so it has no adapter to export; export it with merge=true"
        )
    added = model.peft_config["default"].trainable_token_indices
    if added:
        raise ConfigError(
            f"merge=false: {checkpoint}'s adapter also trains token rows its template added "
            f"({added}), which the unchanged base model has no room for and vLLM's LoRA does "
            "not load; export it with merge=true"
        )


def save_adapter(model: Any, tokenizer: Any, folder: Path, out: Path) -> None:
    """The adapter in peft's layout into ``folder`` (renamed to ``out`` afterwards), with the
    generation config; a base that exists only in memory is written to ``out/base``."""
    base = model.get_base_model()
    source = str(base.name_or_path or "")
    if source and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())  # where a server finds it
    in_memory = str(out.absolute() / BASE_FOLDER)
    model.peft_config["default"].base_model_name_or_path = source or in_memory
    # No embedding rows to save: check_adapter refused tokens a template added.
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    model.generation_config.save_pretrained(folder)
    if not source:  # the untouched base weights, as the adapter was trained on
        plain = model.unload()
        plain.save_pretrained(folder / BASE_FOLDER, safe_serialization=True)
        tokenizer.save_pretrained(folder / BASE_FOLDER)


@hydra_main("export")
def main(cfg: Any) -> None:
    out = export(cfg.checkpoint, cfg.out, cfg.dtype, cfg.merge)
    kind = "merged model" if cfg.merge else "LoRA adapter (peft layout)"
    print(f"exported {cfg.checkpoint} to {out} as a {kind}")


if __name__ == "__main__":
    main()
