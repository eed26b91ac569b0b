"""``python -m instruct.export checkpoint=<dir> out=<dir>``: a standard Hugging Face folder.

LoRA adapters (and any token rows a template added) are merged into the base weights. The
folder holds safetensors weights, the tokenizer with the training template as its
``chat_template``, and a generation config that stops at the template's end of turn, so
``AutoModelForCausalLM.from_pretrained(out)`` needs nothing from this project.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from instruct.checkpoint import CONFIG_FILE, TEMPLATE_FILE, load_checkpoint
from instruct.entry import hydra_main
from instruct.model import resolve_dtype


def export(checkpoint: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Merge ``checkpoint`` into a new folder ``out``; never touches an existing folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out={out} already exists and is not empty; pick a new folder")
    model, tokenizer, _ = load_checkpoint(checkpoint)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype:
        model = model.to(resolve_dtype(dtype))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name in (CONFIG_FILE, TEMPLATE_FILE):  # provenance: how it was trained
        shutil.copy2(Path(checkpoint) / name, tmp / f"instruct_{name}")
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    return out


@hydra_main("export")
def main(cfg: Any) -> None:
    out = export(cfg.checkpoint, cfg.out, cfg.dtype)
    print(f"exported {cfg.checkpoint} to {out}")


if __name__ == "__main__":
    main()
