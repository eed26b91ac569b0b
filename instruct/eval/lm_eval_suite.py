"""Any lm-evaluation-harness task on the checkpoint: knowledge retention (MMLU and the like).

``eval.lm_eval.tasks`` names tasks (or groups, or tags) defined by YAMLs in
``eval.lm_eval.include_path``; lm-eval scores them through its Hugging Face wrapper around
the model already loaded, and every document's metric value becomes one entry of a
:class:`~instruct.eval.suite.Score` keyed ``<task>/<metric>``, so the figures get bootstrap
intervals and paired comparisons like every other suite. The per-document values are
lm-eval's own, and their means equal the aggregates lm-eval reports (kept in ``info``).

Data are local, never downloaded: every task must read files (``dataset_path: json`` with
``dataset_kwargs.data_files``, csv, parquet, ...) or a local data set folder, checked before
lm-eval builds anything. Relative data paths are read from the folder of the task's YAML.

With ``apply_chat_template`` the prompts are rendered with the run's own template
(:func:`instruct.data.templates.chat_template`) on a copy of the tokenizer, and content stays
data: a special-token string inside a document or an answer choice is encoded as text; only
the template's own special tokens are control tokens (:class:`SpecialMarks`).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import importlib.metadata
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

try:
    import lm_eval
    from lm_eval.api.group import Group
    from lm_eval.api.registry import get_aggregation
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError as err:  # an optional dependency: only runs that ask for the suite need it
    raise ImportError(
        "eval.suites: lm_eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13'"
    ) from err

from instruct.data.batching import padded
from instruct.data.content import ControlTokens, TextEncoder
from instruct.data.templates import chat_template, end_of_turn
from instruct.eval.suite import EvalContext, Score, Suite, SuiteResult, register_suite
from instruct.modes import evaluating

log = logging.getLogger(__name__)

# datasets' builders that read only the files named in data_files
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
HOW_TO_BE_LOCAL = (
    "The lm_eval suite runs only tasks whose data are local files; it never downloads a data "
    "set. Write a task YAML in eval.lm_eval.include_path with `dataset_path: json` and "
    "`dataset_kwargs: {data_files: {test: questions.jsonl}}` (relative paths are read from "
    "the YAML's folder); lm-eval's own YAMLs (lm_eval/tasks/mmlu/...) can be copied there "
    "and pointed at local files."
)

# Private-use characters (plane 16) stand for control tokens in rendered prompts; documents
# do not contain them in practice, and a prompt needs one per special token of the tokenizer.
_FIRST_MARK = 0x100000
_HOLE = "\U0010fffd"  # brackets a message's index while the template renders around it
_HOLES = re.compile(f"{_HOLE}(\\d+){_HOLE}")


@dataclass(frozen=True)
class SpecialMarks:
    """Text in which only the chat template's special tokens are control tokens.

    lm-eval renders a prompt to a string and encodes it with the tokenizer, which turns every
    special-token string into a control token, including one quoted in a document. Here the
    template's own special tokens are replaced by marker characters when the prompt is
    rendered (:meth:`mark`); :meth:`encode` makes each marker its token and encodes the text
    between them as training does (:class:`~instruct.data.content.TextEncoder`), so a document's
    ``<|im_end|>`` stays text.
    """

    marker: Mapping[str, str]  # special-token string -> its marker character
    token_id: Mapping[str, int]  # marker character -> token id
    specials: re.Pattern[str]  # any special-token string, longest first
    markers: re.Pattern[str]  # any marker character
    text: TextEncoder  # the tokenizer's encoding of the text between control tokens

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialMarks:
        controls = ControlTokens.of(tokenizer)  # longest first: "<|im_end|>" before "<|im"
        marker = {t: chr(_FIRST_MARK + i) for i, t in enumerate(controls.strings)}
        token_id = {m: controls.ids[t] for t, m in marker.items()}
        chars = "".join(marker.values())
        return cls(
            marker,
            token_id,
            controls.exact,
            re.compile(f"[{chars}]" if chars else r"(?!)"),
            TextEncoder.of(tokenizer, controls),
        )

    def mark(self, text: str) -> str:
        """``text`` with every special-token string made a marker (a control token)."""
        return self.specials.sub(lambda m: self.marker[m.group(0)], text)

    def unmark(self, text: str) -> str:
        """The plain text: markers back to their special-token strings."""
        inverse = {m: t for t, m in self.marker.items()}
        return self.markers.sub(lambda m: inverse[m.group(0)], text)

    def quotes_specials(self, text: str) -> bool:
        """Whether ``text`` holds a special-token string as data (markers are not data)."""
        return self.specials.search(text) is not None

    def encode(self, text: str, tokenizer: Any) -> list[int]:
        """Token ids of ``text``: markers are control tokens, everything else is text."""
        encoder = self.text if tokenizer is self.text.tokenizer else TextEncoder.of(tokenizer)
        marks = [
            (m.start(), m.end(), self.token_id[m.group(0)]) for m in self.markers.finditer(text)
        ]
        return encoder.between(text, marks)[0]


def special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text when asked to (BOS, for Llama)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


class TemplateHFLM(HFLM):
    """lm-eval's Hugging Face wrapper, with content kept as data and our end of turn.

    Prompts from :meth:`apply_chat_template` carry :class:`SpecialMarks` markers; the encode
    methods (public hooks that every lm-eval request type goes through) turn them into
    control tokens and any other special-token string into text. A prompt without quoted
    special tokens, the usual case, is encoded by lm-eval's own code unchanged.
    """

    def __init__(self, *, marks: SpecialMarks, stop: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marks = marks
        self.stop = list(stop)  # the template's end of turn, when it is not EOS
        self.wrapping = special_wrapping(self.tokenizer)
        self.fallbacks = 0  # prompts whose template rewrites content (see apply_chat_template)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render with the tokenizer's template, special tokens outside contents as markers.

        The template renders numbered placeholders, whose surroundings are then marked, and
        the contents go back in verbatim. A template that rewrites contents (a native one
        that trims them, say) fails the check against a plain rendering; such prompts keep
        lm-eval's behaviour (every special-token string a control token), counted in
        :attr:`fallbacks`.
        """
        holes = [{**m, "content": f"{_HOLE}{i}{_HOLE}"} for i, m in enumerate(chat_history)]
        shaped = self.marks.mark(super().apply_chat_template(holes, add_generation_prompt))
        marked = _HOLES.sub(lambda m: chat_history[int(m.group(1))]["content"], shaped)
        plain = super().apply_chat_template(chat_history, add_generation_prompt)
        if self.marks.unmark(marked) == plain:
            return marked
        if not self.fallbacks:
            log.warning(
                "lm_eval: the chat template rewrites message contents, so special-token "
                "strings inside documents are encoded as control tokens"
            )
        self.fallbacks += 1
        return self.marks.mark(plain)

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        if not self.marks.quotes_specials(string):
            plain = self.marks.unmark(string)
            return super().tok_encode(plain, add_special_tokens, left_truncate_len, **kwargs)
        ids = self.marks.encode(string, self.tokenizer)
        add = add_special_tokens
        if add is None:  # as lm-eval decides: no BOS when the prompt starts with one
            prefix = self.marks.mark(self.tokenizer.decode(self.prefix_token_id))
            add = self.add_bos_token if self.add_bos_token is not None else True
            add = add and not (prefix and string.startswith(prefix))
        if add:
            before, after = self.wrapping
            ids = before + ids + after
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_batch_encode(
        self,
        strings: list[str],
        padding_side: str = "left",
        left_truncate_len: int | None = None,
        truncation: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not any(self.marks.quotes_specials(s) for s in strings):
            plain = [self.marks.unmark(s) for s in strings]
            return super().tok_batch_encode(plain, padding_side, left_truncate_len, truncation)
        rows = [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings]
        return padded(rows, self.tokenizer.pad_token_id, left=padding_side == "left")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """lm-eval stops at EOS and the task's ``until``; a reply in our template ends at its
        end of turn (``<|im_end|>``), which is added to every request's stop strings."""
        if self.stop:
            for req in requests:
                context, kwargs = req.arguments
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                until += [s for s in self.stop if s not in until]
                req.arguments = (context, {**kwargs, "until": until})
        return super().generate_until(requests, disable_tqdm)


@dataclass(frozen=True)
class LeafTask:
    """One lm-eval task as its YAML (includes resolved) defines it."""

    name: str
    cfg: Mapping[str, Any]
    folder: Path | None  # the folder of the YAML that defines it; relative paths start there


def leaf_tasks(index: Mapping[str, Any], name: str, trail: tuple[str, ...] = ()) -> list[LeafTask]:
    """The tasks that ``name`` (a task, group or tag in lm-eval's index) stands for."""
    if name in trail:
        raise ValueError(f"eval.lm_eval.tasks: {name!r} includes itself ({' -> '.join(trail)})")
    entry = index.get(name)
    if entry is None:
        raise ValueError(
            f"eval.lm_eval.tasks: no task {name!r} among the YAMLs in "
            f"eval.lm_eval.include_path. {HOW_TO_BE_LOCAL}"
        )
    kind = entry.kind.name
    folder = entry.yaml_path.parent if entry.yaml_path else None
    if kind == "TAG":
        return [leaf for t in sorted(entry.tags) for leaf in leaf_tasks(index, t, (*trail, name))]
    if kind == "GROUP":
        return [
            leaf
            for item in _as_list(entry.cfg.get("task"))
            for leaf in _group_item(index, item, folder, (*trail, name))
        ]
    if kind != "TASK":  # a Python class: what it reads cannot be checked from here
        raise ValueError(
            f"eval.lm_eval.tasks: {name!r} is a Python task class, whose data this suite "
            f"cannot check to be local. {HOW_TO_BE_LOCAL}"
        )
    return [LeafTask(name, entry.cfg, folder)]


def _group_item(
    index: Mapping[str, Any], item: Any, folder: Path | None, trail: tuple[str, ...]
) -> list[LeafTask]:
    """The tasks of one entry of a group's ``task:`` list: a name, or an inline config."""
    if isinstance(item, str):
        return leaf_tasks(index, item, trail)
    if "group" in item:  # an inline subgroup, or a registered one named with overrides
        if "task" not in item:
            return leaf_tasks(index, item["group"], trail)
        return [
            leaf for x in _as_list(item["task"]) for leaf in _group_item(index, x, folder, trail)
        ]
    name = str(item.get("task"))
    if name in index:  # a registered task with the group's overrides on top
        return [replace(leaf, cfg={**leaf.cfg, **item}) for leaf in leaf_tasks(index, name, trail)]
    return [LeafTask(name, item, folder)]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def local_data(task: LeafTask) -> tuple[list[Path], bool]:
    """The local files (or folder) ``task`` reads, and whether any path was relative.

    Raises before anything would be downloaded: a data set named on the Hub, a URL, a file
    that does not exist.
    """
    cfg = task.cfg
    if cfg.get("custom_dataset"):  # the user's own Python loader: theirs to keep local
        return [], False
    path = cfg.get("dataset_path")
    where = f"lm_eval task {task.name!r}"
    if path not in LOCAL_BUILDERS:
        resolved, relative = _resolve(str(path), task.folder)
        if path and resolved.exists():  # a local data set folder, by path
            return [resolved], relative
        raise ValueError(
            f"{where}: dataset_path {path!r} is no local folder (looked for {resolved}), so "
            f"lm-eval would download it from the Hugging Face Hub. {HOW_TO_BE_LOCAL}"
        )
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        raise ValueError(f"{where}: dataset_path: {path} needs dataset_kwargs.data_files")
    found: list[Path] = []
    relative = False
    for split in files.values() if isinstance(files, Mapping) else [files]:
        for name in _as_list(split):
            if "://" in str(name):
                raise ValueError(f"{where} reads {name}, not a local file. {HOW_TO_BE_LOCAL}")
            resolved, was_relative = _resolve(str(name), task.folder)
            matches = sorted(glob.glob(str(resolved)))  # data_files may be glob patterns
            if not matches:
                raise FileNotFoundError(f"{where}: no data file {name} (looked for {resolved})")
            found += [Path(m) for m in matches]
            relative |= was_relative
    return found, relative


def _resolve(path: str, folder: Path | None) -> tuple[Path, bool]:
    p = Path(path).expanduser()
    if p.is_absolute() or folder is None:
        return p, False
    return folder / p, True


def load_tasks(manager: Any, names: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    """Check every named task reads local data, then build it; (objects to evaluate, tasks).

    lm-eval hands relative ``data_files`` to ``datasets``, which reads them from the working
    directory; building each name inside its YAML's folder reads them from there instead.
    The working directory is the process's, so it is restored before anything else runs.
    """
    index = manager.task_index
    objects: list[Any] = []
    tasks: dict[str, Any] = {}
    for name in names:
        leaves = leaf_tasks(index, name)
        folders = {leaf.folder for leaf in leaves if local_data(leaf)[1]}
        if len(folders) > 1:
            raise ValueError(
                f"eval.lm_eval.tasks: {name!r} has tasks in {len(folders)} folders with relative "
                "data paths; give their data_files as absolute paths, or name the tasks one by one"
            )
        folder = folders.pop() if folders else None
        with contextlib.chdir(folder) if folder else contextlib.nullcontext():
            loaded = manager.load([name])
        tasks |= loaded["tasks"]
        if name in loaded["groups"]:  # a group: lm-eval adds its aggregate to the results
            objects.append(loaded["groups"][name])
        else:
            objects += loaded["tasks"].values()
    return objects, tasks


def folder_hash(path: str | None) -> str | None:
    """A hash of every file under ``path`` (names and bytes); None without a path."""
    if not path:
        return None
    root = Path(path).expanduser()
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            digest.update(p.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(p.read_bytes()).digest())
    return digest.hexdigest()


def score_key(task: str, metric: str, filter_name: str) -> str:
    """``<task>/<metric>``, with lm-eval's ``,<filter>`` when the task names filters."""
    return f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric},{filter_name}"


def _number(value: Any) -> float | None:
    """``value`` as a float (numpy scalars included); None for tuples, strings and the like."""
    if isinstance(value, str | bytes | list | tuple | dict):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _choice(task: Any, sample: Mapping[str, Any]) -> dict[str, Any]:
    """The model's answer to one document: the likeliest choice, or the generated text."""
    resps = sample["filtered_resps"]
    if task.OUTPUT_TYPE == "multiple_choice":
        lls = [r[0] if isinstance(r, list | tuple) else r for r in resps]
        best = max(range(len(lls)), key=lls.__getitem__)
        choices = task.doc_to_choice(sample["doc"])
        return {"choice": _plain(choices[best]) if isinstance(choices, list) else best}
    if task.OUTPUT_TYPE == "generate_until":
        return {"response": resps[0] if len(resps) == 1 else resps}
    return {}


def _figure(value: Any) -> Any:
    """An aggregate as JSON can hold it: a float, or lm-eval's text ("N/A")."""
    number = _number(value)
    return _plain(value) if number is None else number


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def to_result(
    out: Mapping[str, Any],
    tasks: Mapping[str, Any],
    groups: Sequence[Any],
    marks: SpecialMarks,
) -> tuple[list[str], dict[str, Score], list[dict[str, Any]], dict[str, Any]]:
    """lm-eval's output as per-document Scores: (ids, scores, rows, info).

    ``tasks`` are lm-eval's task objects by name, in the order the config names them, and
    ``groups`` its groups, whose scores pool their tasks' documents (:func:`group_scores`).
    """
    ids: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[str, float]] = {}  # score key -> id -> value
    better: dict[str, bool] = {}
    skipped: set[str] = set()
    mean = get_aggregation("mean")
    for name, task in tasks.items():
        aggregation = task.aggregation()
        for sample in out["samples"].get(name, []):
            doc_id = f"{name}:{sample['doc_id']}"
            if doc_id not in rows:
                ids.append(doc_id)
                prompt = sample["arguments"][0][0] if sample["arguments"] else ""
                rows[doc_id] = {
                    "task": name,
                    "doc_id": sample["doc_id"],
                    "prompt": marks.unmark(prompt) if isinstance(prompt, str) else prompt,
                    "target": _plain(sample["target"]),
                    **_choice(task, sample),
                }
            for metric in sample["metrics"]:
                key = score_key(name, metric, sample["filter"])
                value = _number(sample[metric])
                if aggregation.get(metric) is not mean or value is None:
                    skipped.add(key)  # corpus-level (BLEU, perplexity): no per-document mean
                    continue
                values.setdefault(key, {})[doc_id] = value
                better[key] = bool(out["higher_is_better"][name].get(metric, True))
                rows[doc_id][key] = value
    scores = {
        key: Score(
            num=[per_doc.get(i, 0.0) for i in ids],
            den=[1.0 if i in per_doc else 0.0 for i in ids],
            higher_is_better=better[key],
        )
        for key, per_doc in values.items()
    }
    scores |= group_scores(groups, scores, out.get("groups", {}))
    figures = {**out["results"], **out.get("groups", {})}
    aggregates = {
        score_key(name, *metric.split(",", 1)): _figure(value)
        for name in [*tasks, *(g.name for g in groups)]
        for metric, value in figures.get(name, {}).items()
        if "," in metric and "_stderr" not in metric
    }
    info = {"aggregates": aggregates, "skipped_metrics": sorted(skipped - scores.keys())}
    return ids, scores, [rows[i] for i in ids], info


def group_scores(
    groups: Sequence[Any], scores: Mapping[str, Score], figures: Mapping[str, Any]
) -> dict[str, Score]:
    """A group's figures as Scores over its tasks' documents, weighted as lm-eval weighs them.

    With ``weight_by_size`` (MMLU's) every document counts once, a ratio of sums over all
    of them; without, every task counts once: a document of a task of n weighs 1/n.
    """
    pooled: dict[str, Score] = {}
    for group in groups:
        members = [t.task_name for t in group.get_all_tasks()]
        for agg in group.aggregate_metric_list or []:
            for key in figures.get(group.name, {}):
                metric, _, filter_name = key.partition(",")
                parts = [scores.get(score_key(t, metric, filter_name)) for t in members]
                if metric != agg.metric or not members or None in parts:
                    continue
                num = [0.0] * len(parts[0].num)
                den = [0.0] * len(parts[0].num)
                for part in parts:
                    weight = 1.0 if agg.weight_by_size else 1.0 / sum(part.den)
                    for i, (n, d) in enumerate(zip(part.num, part.den, strict=True)):
                        num[i] += weight * n
                        den[i] += weight * d
                better = parts[0].higher_is_better
                pooled[score_key(group.name, metric, filter_name)] = Score(num, den, better)
    return pooled


def headline(scores: Mapping[str, Score], first: str) -> str | None:
    """The first figure of the first named task (or group) where higher is better."""
    better = [k for k in scores if scores[k].higher_is_better]
    return next((k for k in better if k.startswith(f"{first}/")), better[0] if better else None)


@register_suite
class LmEvalSuite(Suite):
    """Any lm-evaluation-harness task whose data are local (``eval.lm_eval``)."""

    name = "lm_eval"

    def fingerprint(self) -> dict[str, Any]:
        c = self.cfg.lm_eval
        return {
            "tasks": list(c.tasks),
            "limit": c.limit,
            "num_fewshot": c.num_fewshot,
            "apply_chat_template": bool(c.apply_chat_template),
            "include_path": folder_hash(c.include_path),
        }

    def _evaluate(self, ctx: EvalContext, objects: list[Any], manager: Any) -> tuple[Any, Any, Any]:
        """lm-eval's ``simple_evaluate`` output on ``ctx.model`` with the run's chat template,
        the model wrapper (its fallbacks counted) and the special-token marks it used."""
        c = self.cfg.lm_eval
        # A copy, so the caller's tokenizer (shared with other suites) keeps its template and
        # lm-eval's padding and pad-token changes stay here.
        tokenizer = copy.deepcopy(ctx.tokenizer)
        stop: list[str] = []
        if c.apply_chat_template:
            tokenizer.chat_template = chat_template(ctx.template, ctx.tokenizer)
            eot = end_of_turn(ctx.template, ctx.tokenizer).strip()
            stop = [eot] if eot and eot != tokenizer.eos_token else []
        marks = SpecialMarks.of(tokenizer)
        with evaluating(ctx.model):  # HFLM switches the model to eval mode; this switches back
            lm = TemplateHFLM(
                pretrained=ctx.model,
                tokenizer=tokenizer,
                batch_size=c.batch_size,
                marks=marks,
                stop=stop,
            )
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=objects,
                task_manager=manager,
                num_fewshot=c.num_fewshot,
                limit=c.limit,
                log_samples=True,
                apply_chat_template=bool(c.apply_chat_template),
                fewshot_as_multiturn=bool(c.apply_chat_template),
                bootstrap_iters=0,  # intervals come from our bootstrap over the same documents
                # None: leave the process's random generators alone (scoring here is greedy;
                # the few-shot sampler keeps lm-eval's fixed seed).
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
        return out, lm, marks

    def run(self, ctx: EvalContext) -> SuiteResult:
        c = self.cfg.lm_eval
        if not c.tasks:
            raise ValueError("eval.lm_eval.tasks is empty: name the lm-eval tasks to run")
        if not c.include_path:
            raise ValueError(f"eval.lm_eval.include_path is not set. {HOW_TO_BE_LOCAL}")
        include = str(Path(c.include_path).expanduser().resolve())
        # lm-eval's own task folder is not indexed: its tasks download their data from the
        # Hub, and indexing its many thousands of YAMLs is slow.
        # (measured: docs/performance.md, "Measurements behind design choices")
        manager = TaskManager(include_path=include, include_defaults=False)
        objects, tasks = load_tasks(manager, list(c.tasks))

        out, lm, marks = self._evaluate(ctx, objects, manager)
        groups = [g for o in objects if isinstance(o, Group) for g in [o, *o.get_all_groups()]]
        ids, scores, rows, info = to_result(out, tasks, groups, marks)
        first = objects[0].name if isinstance(objects[0], Group) else objects[0].task_name
        info |= {
            "lm_eval_version": importlib.metadata.version("lm_eval"),
            "tasks": list(c.tasks),
            "evaluated_tasks": list(tasks),
            "limit": c.limit,
            "num_fewshot": c.num_fewshot,
            "apply_chat_template": bool(c.apply_chat_template),
            "n_samples": out.get("n-samples", {}),
            "chat_template_fallbacks": lm.fallbacks,
        }
        return SuiteResult(self.name, ids, scores, headline(scores, first), rows, info)
