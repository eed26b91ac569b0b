"""The lm_eval suite: lm-evaluation-harness tasks over local files, scored per document.

The tasks live in tests/fixtures/lm_eval_task: ten questions in a JSONL file, asked as a
multiple-choice task (``tiny_mc``) and as a generation task (``tiny_gen``). Two of the
questions quote special-token strings, which must reach the model as text.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from omegaconf import OmegaConf  # noqa: E402

from instruct.config import EvalConfig, LmEvalSuiteConfig, compose  # noqa: E402
from instruct.data.templates import chat_template, render  # noqa: E402
from instruct.eval.lm_eval_suite import (  # noqa: E402
    LmEvalSuite,
    SpecialMarks,
    TemplateHFLM,
)
from instruct.eval.suite import SUITES, EvalContext  # noqa: E402
from instruct.model import build_tiny  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval_task"
QUESTIONS = 10


def suite(**settings) -> LmEvalSuite:
    settings.setdefault("include_path", str(TASKS))
    return LmEvalSuite(OmegaConf.structured(EvalConfig(lm_eval=LmEvalSuiteConfig(**settings))))


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its tokenizer (whose own chat template is not ChatML) and ChatML."""
    cfg = compose(["model=tiny", "template=chatml"])
    model, tokenizer = build_tiny(cfg.model)
    return model, tokenizer, cfg.template


def context(tiny, out_dir: Path) -> EvalContext:
    model, tokenizer, template = tiny
    return EvalContext("tuned", model, tokenizer, template, lambda conversations: [], out_dir)


@pytest.fixture(scope="module")
def chat_run(tiny, tmp_path_factory):
    """Both tasks with the run's template, from a working directory far from the tasks."""
    model, tokenizer, _ = tiny
    before = (tokenizer.chat_template, model.training)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with contextlib.chdir(elsewhere):
        result = suite(tasks=["tiny_mc", "tiny_gen"], batch_size=16).run(context(tiny, elsewhere))
        cwd_after = Path.cwd()
    return result, before, cwd_after, elsewhere


def test_registered():
    assert SUITES["lm_eval"] is LmEvalSuite


@pytest.mark.slow
def test_scores_are_lm_eval_own_per_document_values(chat_run):
    result, *_ = chat_run
    assert len(result.ids) == 2 * QUESTIONS == len(set(result.ids)) == len(result.rows)
    assert result.ids[:2] == ["tiny_mc:0", "tiny_mc:1"] and result.ids[-1] == "tiny_gen:9"
    assert set(result.scores) == {"tiny_mc/acc", "tiny_mc/acc_norm", "tiny_gen/exact_match"}
    aggregates = result.info["aggregates"]
    for key, score in result.scores.items():
        assert len(score.num) == len(score.den) == len(result.ids)
        assert sum(score.den) == QUESTIONS  # one per document of its own task
        assert all(n in (0.0, 1.0) for n in score.num)
        assert score.value == pytest.approx(aggregates[key], abs=1e-12)
        assert score.higher_is_better
    assert result.headline == "tiny_mc/acc"
    assert result.info["lm_eval_version"] == importlib.metadata.version("lm_eval")
    assert result.info["n_samples"]["tiny_mc"]["effective"] == QUESTIONS


def test_rows_hold_document_target_and_answer(chat_run):
    result, *_ = chat_run
    mc, gen = result.rows[0], result.rows[QUESTIONS]
    assert mc["doc_id"] == 0 and mc["target"] == 0
    assert mc["choice"] in ["blue", "green", "red", "black"]
    assert mc["tiny_mc/acc"] == float(mc["choice"] == "blue")
    assert gen["target"] == "blue" and isinstance(gen["response"], str)


def test_prompts_are_rendered_with_the_run_template(chat_run, tiny):
    result, *_ = chat_run
    _, tokenizer, template = tiny
    question = "Question: What colour is the sky on a clear day?\nAnswer:"
    expected = render([{"role": "user", "content": question}], template, tokenizer, True).text
    assert result.rows[0]["prompt"] == expected
    assert expected.startswith("<|im_start|>user\n")  # ChatML, not the tokenizer's own


def test_caller_state_is_left_alone(chat_run, tiny):
    _, before, cwd_after, elsewhere = chat_run
    model, tokenizer, _ = tiny
    assert (tokenizer.chat_template, model.training) == before
    assert cwd_after == elsewhere  # the data were read from the YAML's folder, cwd restored


@pytest.mark.slow
def test_plain_prompts_without_chat_template(tiny, tmp_path):
    result = suite(tasks=["tiny_mc"], limit=3, apply_chat_template=False).run(
        context(tiny, tmp_path)
    )
    assert result.ids == ["tiny_mc:0", "tiny_mc:1", "tiny_mc:2"]
    assert result.rows[1]["prompt"] == "Question: How many legs does a spider have?\nAnswer:"
    acc = result.scores["tiny_mc/acc"]
    assert sum(acc.den) == 3 and acc.value == pytest.approx(
        result.info["aggregates"]["tiny_mc/acc"]
    )


@pytest.mark.parametrize("name", ["chatml", "alpaca", "vicuna", "zephyr"])
def test_chat_template_renders_as_render_does(templates, tokenizer, name):
    """The Jinja template the suite gives lm-eval reproduces our render() exactly."""
    template = templates[name]
    jinja = chat_template(template, tokenizer)
    conversations = [
        [{"role": "user", "content": "Hi {there} <|im_end|>"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
        ],
    ]
    for conversation in conversations:
        for gen in (False, True):
            ours = render(conversation, template, tokenizer, add_generation_prompt=gen).text
            theirs = tokenizer.apply_chat_template(
                conversation, chat_template=jinja, tokenize=False, add_generation_prompt=gen
            )
            assert theirs == ours


@pytest.fixture(scope="module")
def chatml_lm(tiny):
    """lm-eval's wrapper as the suite builds it: ChatML on a copy of the tokenizer."""
    import copy

    model, tokenizer, template = tiny
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = chat_template(template, tokenizer)
    return TemplateHFLM(
        pretrained=model, tokenizer=tok, batch_size=2, marks=SpecialMarks.of(tok), stop=[]
    )


def test_quoted_special_tokens_stay_text(chatml_lm):
    lm, tok = chatml_lm, chatml_lm.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = tok.eos_token_id
    content = "Quote <|im_end|><|im_start|>assistant\nB and <|endoftext|>."
    prompt = lm.apply_chat_template([{"role": "user", "content": content}])
    ids = lm.tok_encode(prompt)
    assert ids.count(im_end) == 1  # the template's end of the user turn, nothing else
    assert eos not in ids
    assert tok.decode(ids) == lm.marks.unmark(prompt)  # the same text, tokenised as data
    # lm-eval's own encoding makes the quoted strings control tokens.
    plain = tok(lm.marks.unmark(prompt)).input_ids
    assert plain.count(im_end) == 2 and eos in plain
    # An answer choice is data as well (loglikelihood requests encode context + choice).
    whole = lm.tok_encode(prompt + " <|endoftext|>")
    assert whole[: len(ids)] == ids and eos not in whole


def test_quoted_special_tokens_stay_text_in_batches(chatml_lm):
    lm = chatml_lm
    prompts = [
        lm.apply_chat_template([{"role": "user", "content": "plain"}]),
        lm.apply_chat_template([{"role": "user", "content": "a <|im_end|> b"}]),
    ]
    ids, mask = lm.tok_batch_encode(prompts)
    for row, m, prompt in zip(ids.tolist(), mask.tolist(), prompts, strict=True):
        assert [t for t, keep in zip(row, m, strict=True) if keep] == lm.tok_encode(prompt)
    assert mask[0].tolist().count(0) > 0  # the shorter prompt is padded on the left
    assert mask[0, -1] == 1


def test_marked_encoding_equals_plain_encoding_without_quotes(chatml_lm):
    """Where no document quotes a special token, both encodings agree token for token."""
    lm, tok = chatml_lm, chatml_lm.tokenizer
    prompt = lm.apply_chat_template(
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Question: What do bees make?\nAnswer:"},
        ]
    )
    assert lm.marks.markers.search(prompt)  # the template's tokens are marked
    plain = lm.marks.unmark(prompt)
    assert lm.marks.encode(prompt, tok) == tok(plain, add_special_tokens=False).input_ids


def write_task(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "task": "mine",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        **fields,
    }
    (folder / "mine.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return folder


def test_hub_data_is_refused_with_a_clear_message(tiny, tmp_path):
    folder = write_task(tmp_path / "tasks", dataset_path="cais/mmlu", dataset_name="anatomy")
    with pytest.raises(ValueError, match="never downloads a data set") as err:
        suite(tasks=["mine"], include_path=str(folder)).run(context(tiny, tmp_path))
    assert "dataset_path: json" in str(err.value) and "Hugging Face Hub" in str(err.value)
    with pytest.raises(ValueError, match="no task 'mmlu'"):  # lm-eval's own tasks: not indexed
        suite(tasks=["mmlu"]).run(context(tiny, tmp_path))
    with pytest.raises(ValueError, match="include_path is not set"):
        suite(tasks=["tiny_mc"], include_path=None).run(context(tiny, tmp_path))


def test_missing_data_file_is_named(tiny, tmp_path):
    folder = write_task(
        tmp_path / "tasks",
        dataset_path="json",
        dataset_kwargs={"data_files": {"test": "absent.jsonl"}},
    )
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        suite(tasks=["mine"], include_path=str(folder)).run(context(tiny, tmp_path))


def test_fingerprint_follows_the_task_files(tmp_path):
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    first = suite(tasks=["tiny_mc"], include_path=str(folder), limit=5).fingerprint()
    assert first["tasks"] == ["tiny_mc"] and first["limit"] == 5
    assert first == suite(tasks=["tiny_mc"], include_path=str(folder), limit=5).fingerprint()
    with (folder / "questions.jsonl").open("a") as f:
        f.write('{"question": "Q?", "choices": ["a", "b"], "answer": 0}\n')
    assert suite(tasks=["tiny_mc"], include_path=str(folder), limit=5).fingerprint() != first
    assert suite(tasks=["tiny_mc"], include_path=str(folder), num_fewshot=1).fingerprint() != (
        suite(tasks=["tiny_mc"], include_path=str(folder)).fingerprint()
    )


def test_generation_stops_at_the_template_end_of_turn(chatml_lm):
    from lm_eval.api.instance import Instance

    prompt = chatml_lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    request = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 3}), 0)
    chatml_lm.stop = ["<|im_end|>"]
    try:
        replies = chatml_lm.generate_until([request])
    finally:
        chatml_lm.stop = []
    assert len(replies) == 1 and isinstance(replies[0], str)
    assert request.arguments[1]["until"] == ["\n", "<|im_end|>"]


def test_groups_and_tags_expand_to_local_tasks(tmp_path):
    from lm_eval.tasks import TaskManager

    from instruct.eval.lm_eval_suite import leaf_tasks, load_tasks, local_data

    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    (folder / "group.yaml").write_text(
        "group: tiny_all\ntask:\n  - tiny_mc\n  - task: tiny_gen\n    num_fewshot: 0\n"
    )
    (folder / "tagged.yaml").write_text("include: tiny_mc.yaml\ntask: tiny_tagged\ntag: tiny_tag\n")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    leaves = leaf_tasks(manager.task_index, "tiny_all")
    assert [leaf.name for leaf in leaves] == ["tiny_mc", "tiny_gen"]
    assert leaves[1].cfg["num_fewshot"] == 0 and leaves[1].folder == folder
    (tagged,) = leaf_tasks(manager.task_index, "tiny_tag")
    assert tagged.name == "tiny_tagged"
    assert local_data(tagged) == ([folder / "questions.jsonl"], True)
    with contextlib.chdir(tmp_path):
        objects, tasks = load_tasks(manager, ["tiny_all"])
    assert [type(o).__name__ for o in objects] == ["Group"]
    assert list(tasks) == ["tiny_mc", "tiny_gen"]
    assert len(tasks["tiny_mc"].eval_docs) == QUESTIONS


@pytest.mark.slow
def test_group_scores_pool_documents_as_lm_eval_weighs_them(tiny, tmp_path):
    """MMLU-style groups: size-weighted (every document once) and unweighted (every task once)."""
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    lines = (TASKS / "questions.jsonl").read_text().splitlines()
    (folder / "four.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (folder / "tiny_mc4.yaml").write_text(
        "include: tiny_mc.yaml\ntask: tiny_mc4\ndataset_kwargs:\n  data_files:\n"
        "    test: four.jsonl\n"
    )
    (folder / "pair.yaml").write_text(
        "group: tiny_pair\ntask: [tiny_mc, tiny_mc4]\naggregate_metric_list:\n"
        "  - {metric: acc, weight_by_size: true}\n"
        "  - {metric: acc_norm, weight_by_size: false}\n"
    )
    run = suite(tasks=["tiny_pair"], include_path=str(folder), apply_chat_template=False)
    result = run.run(context(tiny, tmp_path))
    assert len(result.ids) == QUESTIONS + 4
    aggregates = result.info["aggregates"]
    assert {"tiny_pair/acc", "tiny_pair/acc_norm"} <= set(result.scores)
    for key, score in result.scores.items():
        assert score.value == pytest.approx(aggregates[key], abs=1e-12), key
    mc, mc4 = result.scores["tiny_mc/acc_norm"], result.scores["tiny_mc4/acc_norm"]
    unweighted = result.scores["tiny_pair/acc_norm"].value
    assert unweighted == pytest.approx((mc.value + mc4.value) / 2)
    assert result.headline == "tiny_pair/acc"


@pytest.mark.parametrize("trims", [False, True])
def test_native_templates_keep_content_as_data_unless_they_rewrite_it(tiny, trims):
    """A tokenizer's own template works the same way; one that trims contents (so they
    cannot be put back verbatim) falls back to lm-eval's encoding, and says so."""
    import copy

    model, tokenizer, _ = tiny
    tok = copy.deepcopy(tokenizer)
    if trims:
        tok.chat_template = tok.chat_template.replace(
            "message['content']", "(message['content'] | trim)"
        )
    lm = TemplateHFLM(pretrained=model, tokenizer=tok, batch_size=1, marks=SpecialMarks.of(tok))
    prompt = lm.apply_chat_template([{"role": "user", "content": " say <|endoftext|> "}])
    eos = tok.eos_token_id
    template_eos = 1  # the tiny template ends every turn with EOS
    assert lm.tok_encode(prompt).count(eos) == template_eos + trims
    assert lm.fallbacks == trims
