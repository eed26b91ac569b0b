"""Pairwise judge (``eval.suites: [judge]``): an LLM behind any OpenAI-compatible endpoint
compares the tuned model's reply with a reference reply, as AlpacaEval and MT-Bench do.

- Prompts: ``eval.judge.prompts_path`` (JSONL/JSON records with instruction/input/output,
  messages, ... as training data; the answer is optional unless ``reference=answers``),
  else the run's validation split; the first ``max_prompts``.
- Reference replies (``eval.judge.reference``): ``base`` (the base model's), ``answers`` (the
  prompts' own answers), or the path of an earlier run folder, evaluation folder,
  checkpoint or ``judge.jsonl`` whose replies to take (matched by prompt id).
- Every pair is judged in both orders (tuned as A, then as B) so the judge's position bias
  cancels: per prompt the tuned reply scores the mean over the two orders of 1 (win),
  0.5 (tie) or 0 (loss). ``win_rate`` is the mean over prompts; ``info["inconsistent"]``
  counts prompts whose two orders disagree. Identical replies tie without a request.
- The verdict is JSON ``{"winner": "A" | "B" | "tie", "reason": ...}`` asked for with a JSON
  Schema through :class:`instruct.openai_client.ChatClient` (structured output, bounded
  adaptive concurrency, ``judge/responses.jsonl`` and ``judge/meta.json`` under the
  suite's folder); lenient parsing (``[[A]]``, a ``"winner"`` in broken JSON) is the fallback.
- Verdicts are cached one file per judgement, written atomically as each arrives, in
  ``eval.judge.cache_dir`` (default ``$INSTRUCT_CACHE/judge``), keyed by a hash of the
  prompt, both replies in order, the judge model and the judge prompt's text: a second
  identical run, or the base model judged again by another job of a sweep, sends nothing,
  and a judge that fails halfway keeps what it decided.

Each model's replies go to ``<suite folder>/judge.jsonl``, one JSON object per prompt:
``{"id", "prompt", "reply", "reference", "verdicts", "score"}`` — ``id`` and ``reply`` are
what ``reference=<path>`` reads back. An id is the record's own ``id`` or a hash of the
prompt's messages, so two runs on the same prompts match.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instruct.data import DataError, load_splits, normalise, prompt_and_reference, read_records
from instruct.data.templates import Message, to_messages
from instruct.eval.suite import EvalContext, Score, Suite, SuiteResult, register_suite
from instruct.openai_client import (
    ChatClient,
    ClientError,
    ClientSettings,
    Completion,
    RequestFailed,
    gather_or_cancel,
)

log = logging.getLogger(__name__)

REPLIES_FILE = "judge.jsonl"
WINNERS = ("A", "B", "tie")
# Bump with any change to the judge's instructions or schema below: it is part of each
# cached verdict's key (with the texts' hash, so an edit without a bump still misses).
JUDGE_PROMPT_VERSION = 1
JUDGE_SYSTEM = (
    "You are an impartial judge of AI assistants. You compare two responses to the same "
    "user request and decide which one serves the user better."
)
JUDGE_PROMPT = """\
[User request]
{prompt}

[Response A]
{a}

[Response B]
{b}

Which response better fulfils the user request? Judge helpfulness, correctness, relevance, \
completeness and clarity. Do not let the order of the responses, their length or their style \
sway you: a longer response is not better unless the extra content helps. Answer "tie" only \
when neither is better.

Reply with only a JSON object: {{"winner": "A" or "B" or "tie", "reason": "one short \
sentence"}}."""
# The verdict first: it survives a reply cut off by max_tokens, and AlpacaEval's own
# annotators decide without a written rationale too; the reason is kept for reading.
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": list(WINNERS)},
        "reason": {"type": "string"},
    },
    "required": ["winner", "reason"],
    "additionalProperties": False,
}
VERDICT_TOKENS = 60  # a typical verdict's length, for the cost estimate
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English, for the estimate only


class JudgeError(ClientError):
    """The judge could not finish; the verdicts it made are kept in the cache."""


@dataclass
class Prompt:
    """One prompt: its id, the conversation to answer, and its own answer if it has one."""

    id: str
    messages: list[Message]
    answer: str | None


@dataclass
class Pair:
    """One judgement to make: reply A against reply B for prompt ``index``."""

    index: int
    tuned_first: bool  # the tuned reply is A
    a: str
    b: str
    key: str


# ---------------------------------------------------------------------------- pieces


def render_prompt(messages: Sequence[Message]) -> str:
    """The conversation as the judge reads it: one user turn as itself, else role-labelled."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_messages(prompt: str, a: str, b: str) -> list[Message]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, a=a, b=b)},
    ]


def judge_text_hash() -> str:
    text = json.dumps([JUDGE_PROMPT_VERSION, JUDGE_SYSTEM, JUDGE_PROMPT, VERDICT_SCHEMA])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def verdict_key(prompt: str, a: str, b: str, model: str) -> str:
    """The cache key of one judgement: what was asked, of whom, with which instructions."""
    parts = {"prompt": prompt, "a": a, "b": b, "model": model, "judge": judge_text_hash()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _winner(value: Any) -> str | None:
    text = str(value).strip().strip("[]\"' ").lower()
    return {"a": "A", "b": "B", "tie": "tie", "c": "tie", "draw": "tie"}.get(text)


def parse_verdict(text: str, cut_off: bool = False) -> tuple[dict[str, str] | None, str]:
    """``({"winner", "reason"}, "ok")``, or ``(None, why)``: strict JSON first, then a
    ``"winner"`` field in broken JSON, then MT-Bench's ``[[A]]`` / ``[[B]]`` / ``[[C]]``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and _winner(data.get("winner")):
        return {"winner": _winner(data["winner"]), "reason": str(data.get("reason", ""))}, "ok"
    found = re.search(r'"winner"\s*:\s*"([^"]*)"', text) or re.search(
        r"\[\[(A|B|C|tie)\]\]", text, re.IGNORECASE
    )
    if found and _winner(found.group(1)):
        return {"winner": _winner(found.group(1)), "reason": text.strip()[:500]}, "ok"
    if isinstance(data, dict):
        return None, "bad_winner"
    return None, "cut_off" if cut_off else "unparseable"


def tuned_score(winner: str, tuned_first: bool) -> float:
    """1 when the tuned reply won, 0.5 for a tie, 0 when it lost."""
    if winner == "tie":
        return 0.5
    return 1.0 if (winner == "A") == tuned_first else 0.0


def prompt_id(example: dict[str, Any], messages: Sequence[Message]) -> str:
    if example.get("id") not in (None, ""):
        return str(example["id"])
    digest = hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()
    return "p-" + digest[:12]


def _example_of(record: Any, where: str) -> tuple[dict[str, Any], bool]:
    """``record`` normalised, and whether it had its own answer: a prompts file for the
    judge may hold prompts only, which training data may not."""
    try:
        return normalise(record, where), True
    except DataError:
        if not isinstance(record, dict):
            raise
        filled = dict(record)
        if isinstance(filled.get("messages"), list):
            filled["messages"] = [*filled["messages"], {"role": "assistant", "content": "-"}]
        else:
            filled["output"] = "-"
        return normalise(filled, where), False


# ---------------------------------------------------------------------------- cache


class VerdictCache:
    """One JSON file per verdict, ``<dir>/<key[:2]>/<key>.json``, written atomically (temp
    file + rename): parallel jobs of a sweep share it and a kill never leaves half a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, str] | None:
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("winner") in WINNERS else None

    def put(self, key: str, verdict: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verdict, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)


def cache_dir(judge_cfg: Any) -> Path:
    if judge_cfg.cache_dir:
        return Path(judge_cfg.cache_dir).expanduser()
    from instruct.model import cache_root

    return cache_root() / "judge"


# ---------------------------------------------------------------------------- the suite


@register_suite
class JudgeSuite(Suite):
    """Pairwise win rate of the tuned replies against reference replies; see the module."""

    name = "judge"

    @property
    def judge(self) -> Any:
        return self.cfg.judge

    def fingerprint(self) -> dict[str, Any]:
        j = self.judge
        prompts = "validation"
        if j.prompts_path:
            path = Path(j.prompts_path)
            prompts = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path)
        return {
            "prompts": prompts,
            "max_prompts": j.max_prompts,
            "reference": str(j.reference),
            "model": j.model,
            "judge": judge_text_hash(),
        }

    def run(self, ctx: EvalContext) -> SuiteResult:
        prompts = self.prompts(ctx)
        if not prompts:
            log.warning("judge: no prompts to judge; skipped")
            return self._empty("no prompts")
        conversations = [p.messages for p in prompts]
        replies = list(ctx.generate(conversations))
        references = self.references(ctx, prompts, replies)
        # Written before judging, so a judge that fails still leaves this model's replies.
        write_rows(ctx.out_dir / REPLIES_FILE, reply_rows(prompts, replies, references))
        keep = [i for i, ref in enumerate(references) if ref is not None]
        if not keep:
            return self._empty("no prompt has a reference reply")
        pairs = self._pairs(prompts, replies, references, keep)
        verdicts, cached = self._judge(ctx, prompts, pairs)
        result = self._result(prompts, replies, references, keep, pairs, verdicts)
        result.info.update(cached=cached, requested=len({p.key for p in pairs}) - cached)
        write_rows(ctx.out_dir / REPLIES_FILE, result.rows)
        return result

    # ------------------------------------------------------------ prompts and replies

    def prompts(self, ctx: EvalContext) -> list[Prompt]:
        """The prompts to judge on, first ``max_prompts`` of the file or validation split."""
        j = self.judge
        limit = j.max_prompts
        if limit is not None and limit <= 0:
            return []
        if j.prompts_path:
            path = Path(j.prompts_path)
            if path.is_file() and not path.read_text(encoding="utf-8").strip():
                return []
            examples = [_example_of(rec, where) for where, rec in read_records(path)]
        else:
            if ctx.run_cfg is None:
                raise ValueError("eval.judge.prompts_path is needed when there is no run config")
            val = load_splits(ctx.run_cfg.data, ctx.run_cfg.seed)[1]
            examples = [(e, True) for e in val]
        out, seen = [], set()
        for example, answered in examples[:limit]:
            prompt, answer = prompt_and_reference(example)
            messages = to_messages(prompt, ctx.template)
            pid = prompt_id(example, messages)
            while pid in seen:  # a repeated id would mix two prompts' replies up
                pid += "+"
            seen.add(pid)
            out.append(Prompt(pid, messages, answer if answered else None))
        return out

    def references(
        self, ctx: EvalContext, prompts: list[Prompt], replies: list[str]
    ) -> list[str | None]:
        """The reply each tuned one is compared with; None where there is none."""
        ref = str(self.judge.reference)
        if ref == "base":
            if ctx.label == "base":
                return list(replies)  # the base model against itself: every pair a tie
            if ctx.base_generate is None:
                raise ValueError(
                    "eval.judge.reference=base needs the base model's replies, and none is "
                    "available here; use reference=answers or a path to an earlier evaluation"
                )
            return list(ctx.base_generate([p.messages for p in prompts]))
        if ref == "answers":
            missing = sum(p.answer is None for p in prompts)
            if missing:
                raise DataError(
                    f"eval.judge.reference=answers: {missing} of {len(prompts)} prompts have "
                    f"no answer of their own in {self.judge.prompts_path or 'the data'}"
                )
            return [p.answer for p in prompts]
        file = find_replies(Path(ref).expanduser())
        earlier = read_replies(file)
        found = [earlier.get(p.id) for p in prompts]
        if not any(r is not None for r in found):
            raise DataError(
                f"eval.judge.reference={ref}: {file} has a reply for none of these "
                f"{len(prompts)} prompts (matched by id); was it evaluated on other prompts?"
            )
        missing = sum(r is None for r in found)
        if missing:
            log.warning("judge: %s lacks replies for %d prompts; they are left out", file, missing)
        return found

    # ------------------------------------------------------------ judging

    def _pairs(
        self,
        prompts: list[Prompt],
        replies: list[str],
        references: list[str | None],
        keep: list[int],
    ) -> list[Pair]:
        model, pairs = self.judge.model, []
        for i in keep:
            text, tuned, ref = render_prompt(prompts[i].messages), replies[i], references[i] or ""
            for tuned_first in (True, False):
                a, b = (tuned, ref) if tuned_first else (ref, tuned)
                pairs.append(Pair(i, tuned_first, a, b, verdict_key(text, a, b, model)))
        return pairs

    def _judge(
        self, ctx: EvalContext, prompts: list[Prompt], pairs: list[Pair]
    ) -> tuple[dict[str, dict[str, str]], int]:
        """Verdicts by key, and how many needed no request: identical replies tie, the cache
        answers what it can, the judge the rest (each verdict cached as it arrives)."""
        cache = VerdictCache(cache_dir(self.judge))
        verdicts: dict[str, dict[str, str]] = {}
        todo: dict[str, Pair] = {}
        for pair in pairs:
            if pair.a == pair.b:
                verdicts[pair.key] = {"winner": "tie", "reason": "identical replies"}
            elif (hit := cache.get(pair.key)) is not None:
                verdicts[pair.key] = hit
            else:
                todo.setdefault(pair.key, pair)
        cached = len({p.key for p in pairs}) - len(todo)
        if not todo:
            log.info("judge: all %d judgements from the cache %s", len(pairs), cache.folder)
            return verdicts, cached
        self._estimate(prompts, list(todo.values()), len(pairs))
        meta = {
            "suite": "judge",
            "label": ctx.label,
            "judgements": len(pairs),
            "cached": cached,
            "to_request": len(todo),
            "cache_dir": str(cache.folder),
        }
        self._request(ctx, prompts, list(todo.values()), cache, verdicts, meta)
        return verdicts, cached

    def _request(
        self,
        ctx: EvalContext,
        prompts: list[Prompt],
        todo: list[Pair],
        cache: VerdictCache,
        verdicts: dict[str, dict[str, str]],
        meta: dict[str, Any],
    ) -> None:
        """Ask the judge for ``todo``'s verdicts, concurrently; each lands in ``verdicts`` and
        in ``cache`` as it arrives. Raises :class:`JudgeError`, keeping what was made, when
        the server fails or some judgements failed after retries."""
        settings = ClientSettings.from_config(self.judge)
        client = ChatClient(
            settings, ctx.out_dir / "judge", VERDICT_SCHEMA, "verdict", extra_meta=lambda: meta
        )
        failures: list[str] = []

        async def one(pair: Pair) -> None:
            text = render_prompt(prompts[pair.index].messages)
            try:
                done: Completion = await client.complete(
                    judge_messages(text, pair.a, pair.b),
                    parse_verdict,
                    max_tokens=self.judge.max_tokens,
                    temperature=0.0,
                    tag=pair.key,
                )
            except RequestFailed as error:
                failures.append(str(error))
                return
            if done.value is not None:
                verdict = {**done.value, "model": settings.model}
                cache.put(pair.key, verdict)
                verdicts[pair.key] = verdict

        async def run_all() -> None:
            try:
                await gather_or_cancel(one(p) for p in todo)
            finally:
                await client.aclose()

        where = f"the judge at {settings.url} (model {settings.model})"
        made_before = len(verdicts)
        try:
            with client.session():
                asyncio.run(run_all())
        except ClientError as error:
            raise JudgeError(
                f"{where} failed: {error}. {len(verdicts) - made_before} verdicts made before "
                f"are kept in {cache.folder}; a rerun asks only for the rest"
            ) from error
        if failures:
            raise JudgeError(
                f"{where}: {len(failures)} of {len(todo)} judgements failed after retries "
                f"(last: {failures[-1]}); the {len(todo) - len(failures)} made are kept in "
                f"{cache.folder}; a rerun asks only for the rest"
            )

    def _estimate(self, prompts: list[Prompt], todo: list[Pair], total: int) -> None:
        """Log what the requests will cost before any is sent."""
        chars = 0
        for pair in todo:
            asked = judge_messages(render_prompt(prompts[pair.index].messages), pair.a, pair.b)
            chars += sum(len(m["content"]) for m in asked)
        prompt_tokens, completion_tokens = chars // CHARS_PER_TOKEN, VERDICT_TOKENS * len(todo)
        j = self.judge
        cost = ""
        if j.price_input_per_mtok is not None and j.price_output_per_mtok is not None:
            usd = (prompt_tokens * j.price_input_per_mtok
                   + completion_tokens * j.price_output_per_mtok) / 1e6  # fmt: skip
            cost = f", about ${usd:.4f}"
        log.info(
            "judge: %d of %d judgements to request from %s (model %s): about %d prompt and "
            "%d completion tokens%s",
            len(todo),
            total,
            j.base_url or "api.openai.com",
            j.model,
            prompt_tokens,
            completion_tokens,
            cost,
        )

    # ------------------------------------------------------------ the result

    def _result(
        self,
        prompts: list[Prompt],
        replies: list[str],
        references: list[str | None],
        keep: list[int],
        pairs: list[Pair],
        verdicts: dict[str, dict[str, str]],
    ) -> SuiteResult:
        by_prompt: dict[int, list[tuple[Pair, dict[str, str] | None]]] = {}
        for pair in pairs:
            by_prompt.setdefault(pair.index, []).append((pair, verdicts.get(pair.key)))
        rows = reply_rows(prompts, replies, references)
        ids, nums, inconsistent, unjudged = [], [], 0, []
        for i in keep:
            rows[i]["verdicts"] = [
                {"tuned_as": "A" if p.tuned_first else "B", **(v or {})} for p, v in by_prompt[i]
            ]
            scores = [tuned_score(v["winner"], p.tuned_first) for p, v in by_prompt[i] if v]
            if not scores:  # every verdict unparseable: left out of the score
                unjudged.append(prompts[i].id)
                continue
            rows[i]["score"] = sum(scores) / len(scores)
            inconsistent += len(scores) == 2 and scores[0] != scores[1]
            ids.append(prompts[i].id)
            nums.append(rows[i]["score"])
        tuned_len = [len(replies[i]) for i in keep]
        ref_len = [len(references[i] or "") for i in keep]
        info = {
            "prompts": len(prompts),
            "judged": len(ids),
            "reference": str(self.judge.reference),
            "judge_model": self.judge.model,
            "judge_prompt_version": JUDGE_PROMPT_VERSION,
            "inconsistent": inconsistent,  # prompts whose two orders disagree
            "tie_verdicts": sum(
                v is not None and v["winner"] == "tie" for i in keep for _, v in by_prompt[i]
            ),
            "mean_length": {
                "tuned": sum(tuned_len) / len(tuned_len),
                "reference": sum(ref_len) / len(ref_len),
                "unit": "characters",
            },
            "missing_reference": len(prompts) - len(keep),
            "unjudged": unjudged,
        }
        return SuiteResult(
            suite=self.name,
            ids=ids,
            scores={"win_rate": Score(nums, [1.0] * len(nums))},
            headline="win_rate",
            rows=rows,
            info=info,
        )

    def _empty(self, why: str) -> SuiteResult:
        return SuiteResult(
            suite=self.name,
            ids=[],
            scores={"win_rate": Score([], [])},
            headline="win_rate",
            info={"prompts": 0, "skipped": why},
        )


def reply_rows(
    prompts: list[Prompt], replies: list[str], references: list[str | None]
) -> list[dict[str, Any]]:
    """One row per prompt (the ``judge.jsonl`` format); verdicts and score come later."""
    return [
        {"id": p.id, "prompt": p.messages, "reply": reply, "reference": ref, "score": None}
        for p, reply, ref in zip(prompts, replies, references, strict=True)
    ]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """JSONL written to a temporary file and renamed, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def find_replies(path: Path) -> Path:
    """The ``judge.jsonl`` that ``eval.judge.reference=<path>`` names: the file itself, or
    the one in an evaluation folder, a run folder (``eval/``, ``eval-*/``) or a checkpoint
    (``<run>/checkpoints/<name>``)."""
    if path.is_file():
        return path
    roots = [path]
    if path.parent.name == "checkpoints":
        roots.append(path.parent.parent)
    for root in roots:
        newest = sorted(root.glob("eval-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        evals = [root / "eval", *newest]
        for folder in [root, *evals]:
            for candidate in (folder / REPLIES_FILE, folder / "tuned" / REPLIES_FILE):
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(
        f"eval.judge.reference={path}: no {REPLIES_FILE} there, nor in its tuned/, eval/ or "
        f"eval-*/ folders (for a checkpoint, its run's); evaluate that run with the judge "
        f"suite first, or use reference=base or reference=answers"
    )


def read_replies(path: Path) -> dict[str, str]:
    """``id -> reply`` from a ``judge.jsonl``."""
    replies = {}
    for where, row in read_records(path):
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("reply"), str):
            raise DataError(f"{where}: expected an object with an id and a reply")
        replies[str(row["id"])] = row["reply"]
    return replies
