"""Run the ``eval`` config's suites on one model: the tuned model, then the base model.

The same function serves the end of a training run (on its best checkpoint) and
``python -m instruct.evaluate``, so both give the same numbers. What it writes, under the
output folder:

- ``<label>/<suite>.json``: the per-prompt scores (prompt ids, ``num``/``den`` per figure),
  what the report's bootstrap and paired comparisons read;
- ``<label>/<suite>.jsonl``: one row per prompt (prompt, reply, verdicts);
- ``summary.json``: every figure with its 95% interval, for both models.

``<label>`` is ``tuned`` or ``base``. The base model's results are cached per (model,
template, suite and its settings) in ``$INSTRUCT_CACHE/eval_base``: a sweep over learning
rates scores the base model once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from instruct.data.templates import Message
from instruct.eval.stats import bootstrap_interval
from instruct.eval.suite import SUITES, EvalContext, Score, Suite, SuiteResult

log = logging.getLogger(__name__)

# Where each shipped suite lives; a module registers its class when imported, so a suite's
# heavy imports (lm-eval) are paid only by runs that ask for it. A user's own suite is named
# "package.module:Class" and registered the same way.
SUITE_MODULES = {
    "ifeval": "instruct.eval.ifeval",
    "judge": "instruct.eval.judge",
    "lm_eval": "instruct.eval.lm_eval_suite",
}
# Bump when a suite's scoring or the saved layout changes meaning: old base-model caches are
# then not reused.
CACHE_VERSION = 1
LABELS = ("tuned", "base")


def suite_class(name: str) -> type[Suite]:
    """The class registered as ``name`` (importing its module first)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"eval.suites: cannot load {name!r} ({err})") from None
        if not (isinstance(cls, type) and issubclass(cls, Suite)):
            raise ValueError(f"eval.suites: {name!r} is not a subclass of instruct.eval.Suite")
        return cls
    if name not in SUITES:
        if name not in SUITE_MODULES:
            known = ", ".join(sorted(SUITE_MODULES.keys() | SUITES.keys()))
            raise ValueError(
                f"eval.suites: unknown suite {name!r}; expected one of {known}, "
                "or package.module:Class for a suite of your own"
            )
        importlib.import_module(SUITE_MODULES[name])
    return SUITES[name]


def check_eval(cfg: Any) -> None:
    """The eval config's rules, checked before any model loads (every broken one at once)."""
    rules = [
        ("eval.batch_size", cfg.batch_size >= 1, "at least 1"),
        ("eval.max_new_tokens", cfg.max_new_tokens >= 1, "at least 1"),
        ("eval.bootstrap_samples", cfg.bootstrap_samples >= 1, "at least 1"),
        ("eval.confidence", 0 < cfg.confidence < 1, "in (0, 1)"),
        (
            "eval.ifeval.subset",
            cfg.ifeval.subset is None or cfg.ifeval.subset >= 1,
            "null (every prompt) or at least 1",
        ),
    ]
    bad = [f"{key} must be {want}, got {OmegaConf.select(cfg, key.removeprefix('eval.'))!r}"
           for key, ok, want in rules if not ok]  # fmt: skip
    for name in cfg.suites:
        try:
            suite_class(name)
        except ValueError as err:
            bad.append(str(err))
    if len(set(cfg.suites)) != len(cfg.suites):
        bad.append(f"eval.suites names a suite twice: {list(cfg.suites)}")
    if bad:
        raise ValueError("invalid eval config: " + "; ".join(bad))


def greedy(max_new_tokens: int) -> SimpleNamespace:
    """Evaluation decodes greedily: the same replies on every run of the same model."""
    return SimpleNamespace(
        max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0, seed=0
    )


def generator(
    model: Any, tokenizer: Any, template: Any, cfg: Any, merge: bool = False
) -> Callable[[Sequence[Sequence[Message]]], list[str]]:
    """Replies through the shared batched generation path, greedy. ``merge``: with LoRA
    merged into the weights while generating (the tuned model; never the base model, whose
    adapters are switched off around this)."""
    from instruct.decoding import generate, merged_adapter

    def answer(conversations: Sequence[Sequence[Message]]) -> list[str]:
        with merged_adapter(model) if merge else contextlib.nullcontext(model) as m:
            return generate(
                m,
                tokenizer,
                template,
                conversations,
                greedy(cfg.max_new_tokens),
                batch_size=cfg.batch_size,
                desc="eval",
            )

    return answer


@contextmanager
def untuned_model(model: Any, run_cfg: Any, tokenizer: Any) -> Iterator[Any]:
    """The model before tuning: LoRA adapters switched off, or the base weights rebuilt."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
        return
    from instruct.model import base_model_of

    base, _ = base_model_of(run_cfg.model, tokenizer)
    yield base.to(next(model.parameters()).device).eval()


def summarise(result: SuiteResult, cfg: Any) -> dict[str, Any]:
    """Each figure's value and bootstrap interval, plus the suite's own information."""
    scores = {
        key: {
            "value": score.value,
            "ci": list(
                bootstrap_interval(
                    score.num, score.den, cfg.bootstrap_samples, cfg.confidence, cfg.seed
                )
            ),
            "higher_is_better": score.higher_is_better,
        }
        for key, score in result.scores.items()
    }
    return {
        "prompts": len(result.ids),
        "headline": result.headline,
        "scores": scores,
        "info": result.info,
    }


def save_result(folder: Path, label: str, result: SuiteResult) -> None:
    """``<label>/<suite>.json`` (per-prompt scores) and ``<label>/<suite>.jsonl`` (rows)."""
    where = folder / label
    where.mkdir(parents=True, exist_ok=True)
    data = {
        "suite": result.suite,
        "label": label,
        "headline": result.headline,
        "ids": result.ids,
        "scores": {k: asdict(v) for k, v in result.scores.items()},
        "info": result.info,
    }
    write_json(where / f"{result.suite}.json", data)
    with open(where / f"{result.suite}.jsonl", "w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def load_result(folder: Path, label: str, suite: str) -> SuiteResult:
    """What :func:`save_result` wrote."""
    data = json.loads((folder / label / f"{suite}.json").read_text(encoding="utf-8"))
    lines = (folder / label / f"{suite}.jsonl").read_text(encoding="utf-8").splitlines()
    return SuiteResult(
        suite=data["suite"],
        ids=[str(i) for i in data["ids"]],
        scores={k: Score(**v) for k, v in data["scores"].items()},
        headline=data["headline"],
        rows=[json.loads(line) for line in lines],
        info=data.get("info", {}),
    )


def write_json(path: Path, data: Any) -> None:
    """Written to a temporary file and renamed: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def base_cache_dir(run_cfg: Any, suite: Suite, cfg: Any) -> Path:
    """The cache entry for the base model on this suite: keyed by everything that decides
    its replies and scores (the model, the template, the suite's data and settings, the
    generation length), never by what only trains (LoRA, optimizer, data)."""
    from instruct.config import to_container
    from instruct.model import cache_root

    key = {
        "version": CACHE_VERSION,
        "model": to_container(run_cfg.model),
        "template": to_container(run_cfg.template),
        "suite": suite.name,
        "suite_settings": suite.fingerprint(),
        "max_new_tokens": cfg.max_new_tokens,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_root() / "eval_base" / digest[:32]


def evaluate_model(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    run_cfg: Any,
    out_dir: Path,
    tracker: Any | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """Run every suite of ``cfg`` (the eval config) on ``model`` and on its base model.

    Returns the summary that goes into ``results.json`` under ``eval``; writes the files
    named in the module docstring into ``out_dir``, and logs to ``tracker`` when given.
    """
    check_eval(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = run_cfg.template
    suites = [suite_class(name)(cfg) for name in cfg.suites]
    answer = generator(model, tokenizer, template, cfg, merge=True)

    def base_answer(conversations: Sequence[Sequence[Message]]) -> list[str]:
        with untuned_model(model, run_cfg, tokenizer) as base:
            return generator(base, tokenizer, template, cfg)(conversations)

    summary: dict[str, Any] = {"name": cfg.name, "suites": list(cfg.suites), "seconds": {}}
    for label in LABELS if cfg.base else LABELS[:1]:
        summary[label] = {}
    for suite in suites:
        start = time.perf_counter()
        ctx = EvalContext(
            "tuned", model, tokenizer, template, answer, out_dir / "tuned",
            base_generate=base_answer, run_cfg=run_cfg,
        )  # fmt: skip
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        result = suite.run(ctx)
        save_result(out_dir, "tuned", result)
        summary["tuned"][suite.name] = summarise(result, cfg)
        if cfg.base:
            base = base_result(suite, cfg, model, tokenizer, run_cfg, out_dir)
            save_result(out_dir, "base", base)
            summary["base"][suite.name] = summarise(base, cfg)
        summary["seconds"][suite.name] = time.perf_counter() - start
        log.info("eval %s: %s", suite.name, describe(summary, suite.name))
    summary["headline"] = headline(summary)
    write_json(out_dir / "summary.json", summary)
    if tracker is not None:
        log_eval(tracker, summary, out_dir, step)
    return summary


def base_result(
    suite: Suite, cfg: Any, model: Any, tokenizer: Any, run_cfg: Any, out_dir: Path
) -> SuiteResult:
    """The base model's result on ``suite``: from the cache, else scored now and cached."""
    cache = base_cache_dir(run_cfg, suite, cfg)
    try:
        result = load_result(cache, "base", suite.name)
        log.info("eval %s: base model's scores read from the cache %s", suite.name, cache)
        return result
    except (OSError, ValueError, KeyError, TypeError):
        pass
    template = run_cfg.template
    with untuned_model(model, run_cfg, tokenizer) as base:
        answer = generator(base, tokenizer, template, cfg)
        ctx = EvalContext("base", base, tokenizer, template, answer, out_dir / "base",
                          base_generate=answer, run_cfg=run_cfg)  # fmt: skip
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        result = suite.run(ctx)
    try:
        save_result(cache, "base", result)
    except OSError as err:
        log.warning("could not cache the base model's scores in %s (%s)", cache, err)
    return result


def headline(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The first suite's headline figure: what ``report.metric=auto`` ranks by."""
    for suite in summary["suites"]:
        part = summary["tuned"].get(suite)
        if part and part["headline"]:
            score = part["scores"][part["headline"]]
            return {"metric": f"{suite}/{part['headline']}", **score}
    return None


def describe(summary: dict[str, Any], suite: str) -> str:
    parts = []
    for label in LABELS:
        part = summary.get(label, {}).get(suite)
        if not part:
            continue
        figures = ", ".join(
            f"{k} {s['value']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"
            for k, s in part["scores"].items()
        )
        parts.append(f"{label} ({part['prompts']} prompts): {figures or 'nothing scored'}")
    return "; ".join(parts)


def flat_scores(summary: dict[str, Any]) -> dict[str, float]:
    """``eval/<suite>/<figure>`` (tuned) and ``eval/base/<suite>/<figure>``, with
    ``_ci_low``/``_ci_high``: the names W&B's summary and history use."""
    out: dict[str, float] = {}
    for label in LABELS:
        prefix = "eval/" if label == "tuned" else "eval/base/"
        for suite, part in summary.get(label, {}).items():
            for key, score in part["scores"].items():
                name = f"{prefix}{suite}/{key}"
                out[name] = score["value"]
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = score["ci"]
    return out


def log_eval(tracker: Any, summary: dict[str, Any], out_dir: Path, step: int) -> None:
    """Scores to the history and summary; each suite's rows as a table."""
    values = flat_scores(summary)
    tracker.log(values, step)
    tracker.summary(values)
    for suite in summary["suites"]:
        path = out_dir / "tuned" / f"{suite}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if not rows:
            continue
        columns = list(dict.fromkeys(k for row in rows for k in row))
        cells = [[cell(row.get(c)) for c in columns] for row in rows]
        tracker.table(f"eval/{suite}", columns, cells, step)


def cell(value: Any) -> Any:
    """A table cell W&B accepts: numbers and text as they are, anything else as JSON."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def eval_enabled(cfg: DictConfig | None) -> bool:
    return cfg is not None and bool(cfg.get("suites"))
