"""Save and load checkpoints: weights (safetensors), tokenizer, resolved config and template.

A checkpoint folder is written to a temporary sibling and renamed into place, so a reader
never sees a half-written ``best``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_FILE = "config.yaml"
TEMPLATE_FILE = "template.yaml"
STATE_FILE = "trainer_state.json"


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    path: Path, model: Any, tokenizer: Any, cfg: DictConfig, state: dict[str, Any]
) -> None:
    """Write a complete checkpoint to ``path``, replacing any previous one atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    # LoRA: adapter weights only; full fine-tuning: every weight. Both as safetensors.
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    (tmp / TEMPLATE_FILE).write_text(OmegaConf.to_yaml(cfg.template), encoding="utf-8")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    _fsync_tree(tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path) -> tuple[Any, Any, DictConfig]:
    """Rebuild ``(model, tokenizer, cfg)`` from a checkpoint folder written by this module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instruct.config import SCHEMAS, RunConfig
    from instruct.model import build_model, resolve_dtype

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {CONFIG_FILE})")
    saved = OmegaConf.load(path / CONFIG_FILE)
    data_schema = SCHEMAS.get(f"data/{saved.data.source}")
    schema = OmegaConf.structured(RunConfig)
    if data_schema is not None:  # the data group's own schema, as Hydra composed it
        schema.data = OmegaConf.structured(data_schema)
    cfg = OmegaConf.merge(schema, saved)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = build_model(cfg.model)
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(cfg.model.dtype))
    return model, tokenizer, cfg
