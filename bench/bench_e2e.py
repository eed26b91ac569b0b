"""The whole default run against the same job through TRL: wall time from launch to exit.

    python bench/bench_e2e.py                            # SmolLM2-135M, the default run, 3 repeats
    python bench/bench_e2e.py --model tiny --repeats 1   # the random tiny model (a smoke run)
    python bench/bench_e2e.py --overrides lora.rank=16 --json e2e.json

Each side runs in its own process, timed from launch to exit (imports, model load, data,
training, every validation, checkpoints, W&B offline files), and the sides alternate within
each repeat:

- ``ours``: ``python -m instruct.run`` with the overrides (none: the default run), W&B offline,
  into a temporary run folder. The model is cached beforehand, as it is on a user's second run.
- ``ours, no samples``: the same with ``trainer.samples=0``. Our run generates greedy sample
  replies at each validation; TRL's job has no such step, so this column is like for like.
- ``trl``: ``SFTTrainer`` on the same train and validation examples, tokenised by our code
  (``input_ids`` + ``labels``, used by TRL as they are: TRL is not charged for tokenising),
  with the same LoRA (rank, alpha, dropout, all-linear), AdamW, learning rate, schedule,
  warm-up, clipping, batch size and epochs; ``eval_strategy="steps"`` at
  ``trainer.eval_every`` with ``eval_on_start`` and an evaluation after the last step when it
  falls between (ours validates at step 0, every ``eval_every`` steps and at the end); each
  evaluation saves a checkpoint and the best by ``eval_loss`` is kept
  (``load_best_model_at_end``), as ours keeps ``checkpoints/best``. TRL's defaults are kept
  otherwise (no packing), except gradient checkpointing, which TRL 1.16 turns on by default
  and which is off in ours: it stays off, as in ``bench_train.py``.

The table shows medians and TRL's wall time over ours (above 1: ours is faster), with each
side's best validation loss. The two losses are different means (ours over every supervised
token of the split; TRL's over batches), so they show that both trained, not which did better.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {"smollm2": "smollm2-135m", "smollm2-135m": "smollm2-135m", "tiny": "tiny"}
SIDES = ("ours", "ours-nosamples", "trl")
LABELS = {"ours": "ours", "ours-nosamples": "ours, no samples", "trl": "TRL SFTTrainer"}


def compose_job(model: str, overrides: Sequence[str]) -> Any:
    """The run config the job composes to (``run_dir`` is a placeholder: never written)."""
    from instruct.config import compose

    return compose([f"model={model}", *overrides, "run_dir=/nonexistent"])


def prepare(cfg: Any, out: Path) -> dict[str, Any]:
    """The model folder and the tokenised splits TRL trains on, with the job's schedule.

    The model is built as our run builds it (the cached SmolLM2 or the tiny model, with the
    template's tokens fitted) and saved once, so TRL loads the very weights ours starts from.
    The splits come from our own loader and tokeniser with the job's seed: the same examples
    and the same tokens as our run's.
    """
    from instruct.data import load_splits
    from instruct.data.features import tokenize_split
    from instruct.model import build_model, fit_tokenizer
    from instruct.train import total_steps

    model, tokenizer = build_model(cfg.model)
    fit_tokenizer(model, tokenizer, cfg.template)
    folder = out / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    train_examples, val_examples = load_splits(cfg.data, cfg.seed)
    paths = {}
    for name, examples in (("train", train_examples), ("val", val_examples)):
        features, _ = tokenize_split(examples, cfg, tokenizer)
        rows = [{"input_ids": f.input_ids.tolist(), "labels": f.labels.tolist()} for f in features]
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(rows))
    t, o, lora = cfg.trainer, cfg.optimizer, cfg.lora
    return {
        "folder": str(folder),
        "train": str(paths["train"]),
        "val": str(paths["val"]),
        "steps": total_steps(cfg, len(json.loads(paths["train"].read_text())), 1),
        "batch_size": t.batch_size,
        "eval_batch_size": t.eval_batch_size or t.batch_size,
        "grad_accum": t.grad_accum,
        "epochs": t.epochs,
        "max_steps": t.max_steps,
        "max_length": t.max_length,
        "eval_every": t.eval_every,
        "keep": t.keep_checkpoints,
        "bf16": str(t.precision) == "bf16",
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "scheduler": str(o.scheduler),
        "warmup_steps": o.warmup_steps,
        "warmup_ratio": o.warmup_ratio,
        "max_grad_norm": o.max_grad_norm,
        "lora": None
        if not lora.enabled
        else {
            "r": lora.rank,
            "alpha": lora.alpha if lora.alpha is not None else 2 * lora.rank,
            "dropout": lora.dropout,
            "target_modules": lora.target_modules
            if isinstance(lora.target_modules, str)
            else list(lora.target_modules),
        },
        "seed": cfg.seed,
    }


def eval_at_end(every: int) -> Any:
    """A transformers callback: evaluate (and save) after the last step when it is not an
    evaluation step already, as our run validates at the end."""
    from transformers import TrainerCallback

    class EvalAtEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps and state.global_step % every:
                control.should_evaluate = control.should_save = True
            return control

    return EvalAtEnd()


def child_trl(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """The TRL job of ``spec`` (see :func:`prepare`), in this process."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32)
    train = Dataset.from_list(json.loads(Path(spec["train"]).read_text()))
    val = Dataset.from_list(json.loads(Path(spec["val"]).read_text()))
    lora = spec["lora"]
    peft_config = None
    if lora is not None:
        peft_config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        )
    warmup = spec["warmup_steps"] or round(spec["warmup_ratio"] * spec["steps"])
    args = SFTConfig(
        output_dir=str(out / "trl-run"),
        per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["eval_batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        num_train_epochs=spec["epochs"],
        max_steps=spec["max_steps"] if spec["max_steps"] is not None else -1,
        max_length=spec["max_length"],
        learning_rate=spec["lr"],
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"],
        weight_decay=spec["weight_decay"],
        lr_scheduler_type=spec["scheduler"],
        warmup_steps=warmup,
        max_grad_norm=spec["max_grad_norm"],
        bf16=spec["bf16"],
        gradient_checkpointing=False,
        eval_strategy="steps",
        eval_steps=spec["eval_every"],
        eval_on_start=True,
        save_strategy="steps",
        save_steps=spec["eval_every"],
        save_total_limit=spec["keep"],
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="wandb",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=spec["seed"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[eval_at_end(spec["eval_every"])],
    )
    trainer.train()
    trainer.save_model(str(out / "trl-run" / "best"))  # the best, loaded at the end
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    return {
        "best_val_loss": min(e["eval_loss"] for e in evals),
        "validations": len(evals),
        "steps": trainer.state.global_step,
    }


def run_ours(model: str, overrides: Sequence[str], work: Path, env: dict[str, str]) -> dict:
    """One launch of ``python -m instruct.run``: its wall time and what results.json says."""
    run_dir = work / "ours-run"
    command = [sys.executable, "-m", "instruct.run", f"model={model}", *overrides,
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    wall = launch(command, work / "ours.log", env)
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "wall_s": wall,
        "best_val_loss": results["best_val_loss"],
        "validations": len(results["val_loss_history"]),
        "steps": results.get("steps"),
        "time_split": results.get("time_split"),
    }


def run_trl(spec_path: Path, work: Path, env: dict[str, str]) -> dict:
    """One launch of this script's TRL child: its wall time and what it reported."""
    result = work / "trl.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path),
               "--child-out", str(work), "--child-result", str(result)]  # fmt: skip
    wall = launch(command, work / "trl.log", env)
    return {"wall_s": wall, **json.loads(result.read_text())}


def launch(command: Sequence[str], log_path: Path, env: dict[str, str]) -> float:
    """Run ``command`` to its end; its wall seconds. A failure shows the log's last lines."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"{' '.join(command[:4])} ... exited {code}; {log_path}:\n" +
                         "\n".join(tail))  # fmt: skip
    return wall


def table(model: str, runs: dict[str, list[dict]]) -> str:
    """The printed comparison: medians per side, and TRL over each of ours."""
    lines = [
        f"Whole job, launch to exit (model={model}; medians of {len(next(iter(runs.values())))})",
        f"{'side':<18} {'wall s':>8} {'TRL / side':>10} {'best val':>9} {'vals':>5} {'steps':>6}",
    ]
    trl = statistics.median([r["wall_s"] for r in runs["trl"]]) if "trl" in runs else None
    for side, rs in runs.items():
        wall = statistics.median([r["wall_s"] for r in rs])
        ratio = f"{trl / wall:.2f}x" if trl is not None else "-"
        r0 = rs[0]
        lines.append(
            f"{LABELS[side]:<18} {wall:>8.1f} {ratio:>10} {r0['best_val_loss']:>9.4f} "
            f"{r0['validations']:>5} {r0['steps'] if r0['steps'] is not None else '-':>6}"
        )
    ours = runs.get("ours", [{}])[0].get("time_split")
    if ours:
        split = ", ".join(f"{k} {v:.1f}" for k, v in ours.items())
        lines.append(f"ours' time split (s, first repeat): {split}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--overrides", nargs="*", default=[], help="run overrides for every side")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write every repeat's figures here")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child.read_text())
        args.child_result.write_text(json.dumps(child_trl(spec, args.child_out)))
        return {}
    model = MODELS[args.model]
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(root),
               "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        spec = prepare(compose_job(model, args.overrides), root)
        spec_path = root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for repeat in range(args.repeats):
            for side in args.sides:
                work = root / f"{side}-{repeat}"
                work.mkdir()
                if side == "trl":
                    runs[side].append(run_trl(spec_path, work, env))
                else:
                    extra = ["trainer.samples=0"] if side == "ours-nosamples" else []
                    runs[side].append(run_ours(model, [*args.overrides, *extra], work, env))
                print(f"repeat {repeat + 1}/{args.repeats} {side}: "
                      f"{runs[side][-1]['wall_s']:.1f} s", flush=True)  # fmt: skip
    print(table(model, runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return runs


if __name__ == "__main__":
    main()
