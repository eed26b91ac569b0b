"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option in ``conf/<group>/`` starts with ``defaults: [<group>_schema, _self_]``, so
Hydra validates it against the dataclass below: ``lora.rank=abc`` or ``lora.rnak=8`` fails at
composition, before any model loads.

A key with a fixed set of values is a :class:`~enum.StrEnum` field, so ``trainer.precision=fp99``
fails there too, with OmegaConf's message naming the key and the allowed values. OmegaConf
matches a value to a member by name, and each member's value is its name: the strings written
in YAML and on the command line are the member names, and a member compares equal to, formats
as and serialises (JSON, ``to_container``, ``to_yaml``) to that same plain string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from instruct.errors import ConfigError


class TemplateKind(StrEnum):
    """How a template renders (instruct.data.templates)."""

    format = "format"  # from the format strings of TemplateConfig
    native = "native"  # the tokenizer's own chat_template


@dataclass
class TemplateConfig:
    """A prompt template as data. ``{content}`` marks where a message goes.

    The text the model must learn to produce after ``assistant_prefix`` is
    ``assistant_format`` with the reply filled in, followed by ``end_of_turn``. ``{bos}`` and
    ``{eos}`` anywhere stand for the tokenizer's own special tokens.
    """

    name: str = MISSING
    # format: render from the fields below; native: the tokenizer's own chat_template.
    kind: TemplateKind = TemplateKind.format
    system: str | None = None  # default system prompt when a conversation has none
    system_with_input: str | None = None  # Alpaca uses a second preamble when there is an input
    input_format: str = "{instruction}\n\n{input}"  # merges instruction and input into one turn
    prefix: str = "{bos}"  # once, at the very start
    system_format: str = "{content}\n\n"
    user_format: str = "{content}\n"
    assistant_prefix: str = ""  # not trained; ends the generation prompt
    assistant_format: str = "{content}"  # trained
    end_of_turn: str = "{eos}"  # trained, so the model learns to stop
    turn_separator: str = ""  # not trained; between an end_of_turn and the next turn
    special_tokens: list[str] = field(default_factory=list)  # added to the tokenizer if missing
    # kind native: extra apply_chat_template arguments for every render (training,
    # generation, chat), e.g. +template.kwargs.enable_thinking=false for Qwen 3.
    kwargs: dict[str, Any] = field(default_factory=dict)


class TrainOn(StrEnum):
    """Which assistant turns are trained (instruct.data.turns)."""

    all_assistant = "all_assistant"  # every reply
    last_assistant = "last_assistant"  # only each conversation's last reply
    # Every reply but those whose message says ``train: false``; ``weight`` in [0, 1] scales
    # a reply's token losses (the loss stays the weighted mean over supervised tokens).
    per_message = "per_message"


@dataclass
class DataConfig:
    source: str = MISSING
    domains: list[str] | None = None  # None: every domain
    val_fraction: float = 0.15
    max_examples: int | None = None  # cap after filtering, before the split
    train_on: TrainOn = TrainOn.all_assistant
    train_on_prompt: bool = False  # true: system and user messages' content is trained too
    # Examples left out of both splits: a list of IDs (an example's "id", else a hash of its
    # content), or the path of a reviewed file saved by python -m instruct.inspect's page
    # (its rejected IDs). None: every example.
    exclude_ids: Any = None


@dataclass
class ManualDataConfig(DataConfig):
    source: str = "manual"


class DataFormat(StrEnum):
    """How a data source is read (instruct.data.readers); ``auto`` goes by the path."""

    auto = "auto"  # by suffix (.gz / .zst stripped first); a folder: saved or hub; else hub
    jsonl = "jsonl"
    json = "json"  # one JSON list of records (or {"data": [...]})
    parquet = "parquet"
    csv = "csv"
    tsv = "tsv"
    saved = "saved"  # a folder written by datasets' save_to_disk
    hub = "hub"  # datasets.load_dataset(path, name, split=..., revision=...)


@dataclass
class FileDataConfig(DataConfig):
    source: str = "file"
    # Files of instruction/input/output, messages, ShareGPT conversations, ...: .jsonl,
    # .json, .parquet, .csv, .tsv, each also .gz or .zst; or a save_to_disk folder.
    paths: list[str] = MISSING
    format: DataFormat = DataFormat.auto  # for every path; auto: by each path's suffix
    # Renames from the file's keys to ours, e.g. {question: instruction, answer: output}.
    columns: dict[str, str] = field(default_factory=dict)
    # A dedicated validation file; when set, val_fraction is ignored.
    val_paths: list[str] | None = None


@dataclass
class HubDataConfig(DataConfig):
    """A Hugging Face dataset: a Hub id (read from the datasets cache when HF_HUB_OFFLINE=1),
    a Hub-style folder (data files + a README.md card with configs) or a save_to_disk folder."""

    source: str = "hf"
    path: str = MISSING  # e.g. tatsu-lab/alpaca, or /data/my_dataset
    name: str | None = None  # the dataset's configuration (load_dataset's ``name``)
    split: str = "train"
    revision: str | None = None  # a branch, tag or commit of the Hub repository
    format: DataFormat = DataFormat.auto  # auto: saved when the folder has save_to_disk's files
    columns: dict[str, str] = field(default_factory=dict)
    val_split: str | None = None  # e.g. test: validation from that split; val_fraction unused


@dataclass
class SourceConfig:
    """One source of a mixture (``data=mixture``): where its rows come from and how many."""

    path: str = MISSING  # a file, a folder (save_to_disk or Hub-style) or a Hub dataset id
    format: DataFormat = DataFormat.auto
    name: str | None = None  # Hub datasets: the configuration
    split: str = "train"  # Hub datasets and save_to_disk DatasetDicts
    revision: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    # The system prompt of this source's examples (a conversation's own comes first).
    system: str | None = None
    # Training examples drawn: weight x this source's training share (2.0: each twice, 0.5:
    # a seeded half); validation examples are never repeated or dropped by the weight.
    weight: float = 1.0
    replacement: bool = False  # draw with replacement (true) or as whole passes + a subset
    max_examples: int | None = None  # None: data.max_examples; first N, before the split
    val_fraction: float | None = None  # None: data.val_fraction; 0: no validation from it
    val_path: str | None = None  # a validation file (same format); val_fraction unused
    val_split: str | None = None  # Hub / saved datasets: a validation split, e.g. test
    label: str | None = None  # its name in logs and results.json; None: from path/name/split


@dataclass
class MixtureDataConfig(DataConfig):
    """Several sources; each is split apart, with a seed from ``seed`` and its label, so
    adding a source never changes another's validation examples."""

    source: str = "mixture"
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class SelfInstructDataConfig(DataConfig):
    """Self-Instruct (Wang et al. 2022) through any OpenAI-compatible chat-completions API."""

    source: str = "self_instruct"
    out_dir: str = "data/self_instruct"  # one sub-folder per distinct generation settings
    seed_path: str | None = None  # None: the shipped instruct/data/seed_tasks.jsonl
    num_instructions: int = 200  # accepted tasks to reach
    model: str = "gpt-4o-mini"
    base_url: str | None = None  # None: api.openai.com; e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    num_examples_in_prompt: int = 3
    num_tasks_per_request: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 3072
    concurrency: int = 4
    request_timeout: float = 60.0  # seconds per request
    max_retries: int = 5  # 429, 5xx and timeouts, with backoff honouring Retry-After
    max_failed_requests: int = 20  # stop when this many requests in a row fail
    generation_seed: int = 0
    min_instruction_words: int = 3
    max_instruction_words: int = 150
    min_output_words: int = 1
    max_output_words: int = 1500
    similarity_threshold: float = 0.7  # ROUGE-L F with any pool instruction rejects
    blacklist: list[str] = field(
        default_factory=lambda: [
            "image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs",
            "plot", "plots", "draw", "drawing", "map", "maps", "file", "files", "video",
            "videos", "audio", "music", "diagram", "flowchart", "go to", "download",
            "upload", "screenshot",
        ]
    )  # fmt: skip
    price_input_per_mtok: float | None = None  # USD per million prompt tokens, for a cost estimate
    price_output_per_mtok: float | None = None


@dataclass
class SelfInstructConfig:
    """``python -m instruct.self_instruct``: generate the data set without training."""

    data: SelfInstructDataConfig = MISSING


class Dtype(StrEnum):
    """The dtype a model's weights load in (instruct.model.resolve_dtype)."""

    auto = "auto"  # bfloat16 on a GPU that supports it, else float32
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class ModelConfig:
    name: str = MISSING
    builder: str = MISSING  # key in instruct.model.BUILDERS
    dtype: Dtype = Dtype.float32
    path: str | None = None  # hf: folder or hub id; gguf: folder holding gguf_file
    trust_remote_code: bool = False
    gguf_file: str | None = None  # gguf: the weights file, dequantised once into the cache
    package: str | None = None  # gguf: a Python package whose folder ships gguf_file
    # The tiny model's architecture (ignored by other builders).
    vocab_size: int = 4096
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    init_seed: int = 0


class DropoutDraw(StrEnum):
    """How fused LoRA layers draw dropout on the CPU (instruct.kernels.dropout.DropoutDrawer);
    the same distribution either way. GPUs always draw a mask."""

    auto = "auto"  # positions below rate instruct.kernels.dropout.POSITIONS_BELOW (0.2), else mask
    positions = "positions"  # the positions of the dropped elements, zeroed in a copy of the input
    mask = "mask"  # a boolean mask of every element


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = 8
    alpha: float | None = None  # None: 2 x rank, so a rank sweep keeps the same scale
    dropout: float = 0.05
    # Each adapted linear layer (base + dropout + A + B + scaling) as one autograd function:
    # the adapter's product accumulated into the base output by the matmul, only what dropout
    # dropped kept instead of two float copies of the input. Same result as peft's layers.
    fused: bool = True
    dropout_draw: DropoutDraw = DropoutDraw.auto  # how fused layers draw dropout on the CPU
    # "all-linear": every linear layer except the output head (peft's own rule).
    target_modules: Any = "all-linear"


class OptimizerName(StrEnum):
    """The optimizers instruct.optim.build_optimizer builds."""

    adamw = "adamw"


class Scheduler(StrEnum):
    """Learning-rate schedules after the warmup (instruct.optim.SCHEDULES)."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    scheduler: Scheduler = Scheduler.cosine
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    max_grad_norm: float | None = 1.0  # None: no clipping
    # One fused kernel for the whole update; None: fused where torch has it for the device.
    fused: bool | None = None


class Precision(StrEnum):
    """Mixed precision, applied through Accelerate (instruct.train.PRECISIONS)."""

    fp32 = "fp32"
    bf16 = "bf16"  # autocast (CPU or GPU), fp32 master weights, frozen LoRA base in bf16
    fp16 = "fp16"
    auto = "auto"  # the faster of bf16 and fp32 on this machine (instruct.hardware)


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    eval_every: int = 20  # optimizer steps
    eval_batch_size: int | None = None  # None: batch_size
    precision: Precision = Precision.fp32
    # Each micro-batch's examples end to end in one row, attention kept within each example:
    # no padding, and the same loss as a padded batch (checked on the model at start-up).
    packing: bool = True
    # The output layer and cross-entropy in chunks of rows, gradients formed on the spot: the
    # full rows x vocabulary logits never exist. Same loss and gradients.
    fused_loss: bool = True
    # glibc (Linux): keep memory freed by one step for the next instead of returning it to the
    # OS, so activations do not page-fault afresh every step. Same numbers, fewer faults.
    keep_freed_memory: bool = True
    # Keep tokenised splits in $INSTRUCT_CACHE/tokenized, keyed by text, tokenizer and length.
    tokenized_cache: bool = True
    save_best: bool = True
    # Resumable state (weights, optimizer, scheduler, RNG, data position, best so far) in
    # checkpoints/step-N every this many optimizer steps; None: at every evaluation.
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2  # the last K resumable checkpoints; best is kept apart
    # None: a fresh run; "auto": continue the latest complete checkpoint of the run folder
    # (a fresh start if there is none); a path: continue that checkpoint.
    resume: str | None = None
    log_every: int = 1
    # At each evaluation, greedy replies to this many validation prompts go to a W&B table.
    samples: int = 3
    sample_max_new_tokens: int = 64


class LoggerBackend(StrEnum):
    wandb = "wandb"
    none = "none"  # no logging beyond the run folder's own files


class LoggerMode(StrEnum):
    """W&B's mode (wandb.init's ``mode``); disabled: no W&B run, as backend none."""

    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.wandb
    mode: LoggerMode = LoggerMode.offline
    # Online: seconds wandb.init may wait for the server; then the run is logged offline
    # (a server that refuses connections is detected at once). W&B's own default is 90.
    init_timeout: float = 30.0
    project: str = "instruct"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    # Filled from Hydra when left null: the job's overrides and, in a multirun, the sweep.
    name: str | None = None
    group: str | None = None
    # Filled from Hydra: the job's command-line overrides as key -> value (lora.rank -> 16,
    # template -> vicuna). W&B's config holds them as a flat top-level `overrides` dict.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingConfig:
    """How replies are generated (generate, chat, evaluate)."""

    max_new_tokens: int = 256
    do_sample: bool = True  # false: greedy, deterministic
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class IFEvalSuiteConfig:
    """Verifiable instruction following, scored as IFEval does (instruct.eval.ifeval)."""

    # A JSONL file in IFEval's format (key, prompt, instruction_id_list, kwargs), such as
    # google/IFEval's input_data.jsonl; None: the shipped set (scripts/make_ifeval_set.py).
    path: str | None = None
    subset: int | None = None  # a seeded random subset of this many prompts; None: all
    subset_seed: int = 0


@dataclass
class JudgeSuiteConfig:
    """Pairwise judge through any OpenAI-compatible endpoint (instruct.eval.judge)."""

    base_url: str | None = None  # e.g. http://127.0.0.1:8080/v1; None: api.openai.com
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    # The replies the tuned ones are compared with: "base" (the base model's, same prompts
    # and template), "answers" (each prompt file's own reference answers), or the path of an
    # earlier run folder or checkpoint whose evaluation replies to take.
    reference: str = "base"
    prompts_path: str | None = None  # JSONL of prompts; None: the run's validation prompts
    max_prompts: int | None = 50
    concurrency: int = 4
    request_timeout: float = 120.0
    max_retries: int = 4
    max_tokens: int = 512  # the verdict's length budget
    cache_dir: str | None = None  # None: $INSTRUCT_CACHE/judge
    price_input_per_mtok: float | None = None  # USD per million tokens, for the cost estimate
    price_output_per_mtok: float | None = None


@dataclass
class LmEvalSuiteConfig:
    """Any lm-evaluation-harness task on the checkpoint (instruct.eval.lm_eval_suite)."""

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None  # a folder of the user's own task YAMLs
    limit: int | None = None  # examples per task; None: all
    num_fewshot: int | None = None
    apply_chat_template: bool = True  # prompts rendered with the run's template
    batch_size: int = 8


@dataclass
class EvalConfig:
    """The shared yardstick: suites run on the best checkpoint at the end of every run, and
    by ``python -m instruct.evaluate`` on any checkpoint, with the same numbers."""

    name: str = "none"
    suites: list[str] = field(default_factory=list)  # names in instruct.eval.suite.SUITES
    ifeval: IFEvalSuiteConfig = field(default_factory=IFEvalSuiteConfig)
    judge: JudgeSuiteConfig = field(default_factory=JudgeSuiteConfig)
    lm_eval: LmEvalSuiteConfig = field(default_factory=LmEvalSuiteConfig)
    base: bool = True  # score the base model too (cached per model, template and suite)
    # Replies generated at once. A decoding step reads every weight whatever the rows, so
    # more rows cost little more, and on the CPU the same replies took less time at 64 rows
    # than at 32. (measured: docs/performance.md, "Measurements behind design choices")
    batch_size: int = 64
    max_new_tokens: int = 512
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0  # the bootstrap's resampling


@dataclass
class ReportConfig:
    """How runs are ranked, by ``python -m instruct.report`` and by sweepers."""

    # "auto": the eval suite's headline score when the run has one (maximised), else the
    # best validation loss (minimised). Or a score such as "ifeval/inst_loose",
    # "judge/win_rate", or "val_loss".
    metric: str = "auto"


@dataclass
class RunConfig:
    template: TemplateConfig = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    lora: LoraConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = MISSING
    report: ReportConfig = field(default_factory=ReportConfig)
    seed: int = 0
    # Filled from Hydra's runtime when run through the CLI; tests set it directly.
    run_dir: str | None = None


class InspectSplit(StrEnum):
    all = "all"
    train = "train"
    validation = "validation"


@dataclass
class InspectOptions:
    """What ``python -m instruct.inspect`` puts in its page."""

    examples: int | None = 1000  # examples shown token by token; None: all (10,000 stay fluid)
    split: InspectSplit = InspectSplit.all  # the report and histograms cover every example
    out: str | None = None  # None: inspect.html in the run folder


@dataclass
class InspectConfig(RunConfig):
    """``python -m instruct.inspect``: the run config (its overrides work) and the page's."""

    inspect: InspectOptions = field(default_factory=InspectOptions)


@dataclass
class GenerateConfig:
    """``python -m instruct.generate``: one reply from a checkpoint."""

    checkpoint: str = MISSING
    prompt: str | None = None  # None: read the prompt from standard input
    input: str | None = None  # optional input text, as in instruction + input examples
    system: str | None = None
    sampling: SamplingConfig = MISSING


@dataclass
class ChatConfig:
    """``python -m instruct.chat``: a multi-turn conversation in the terminal."""

    checkpoint: str = MISSING
    system: str | None = None
    sampling: SamplingConfig = MISSING


@dataclass
class EvaluateConfig:
    """``python -m instruct.evaluate``: the run's eval suites on any checkpoint."""

    checkpoint: str = MISSING
    out: str | None = None  # None: <checkpoint>/../../eval-<name> (the run folder)
    # Validation loss of the tuned (and base) model on this many of the run's validation
    # examples; None: all of them; 0: skipped.
    max_val_examples: int | None = None
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING


@dataclass
class ExportConfig:
    """``python -m instruct.export``: merge LoRA into the base (a standard HF folder), or
    the adapter alone in peft's layout (``merge=false``)."""

    checkpoint: str = MISSING
    out: str = MISSING
    dtype: Dtype | None = None  # None: the training dtype
    merge: bool = True  # false: the LoRA adapter alone, for peft or vLLM's --enable-lora


CLI_SCHEMAS: dict[str, type] = {
    "generate_schema": GenerateConfig,
    "chat_schema": ChatConfig,
    "evaluate_schema": EvaluateConfig,
    "export_schema": ExportConfig,
    "inspect_schema": InspectConfig,
    "self_instruct_schema": SelfInstructConfig,
}

CONFIG_MODULE = "instruct.conf"
HYDRA_VERSION_BASE = "1.3"

SCHEMAS: dict[str, type] = {
    "template": TemplateConfig,
    "data/manual": ManualDataConfig,
    "data/file": FileDataConfig,
    "data/hf": HubDataConfig,
    "data/mixture": MixtureDataConfig,
    "data/self_instruct": SelfInstructDataConfig,
    "model": ModelConfig,
    "lora": LoraConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "sampling": SamplingConfig,
    "eval": EvalConfig,
}


def metric_direction(*, _root_: DictConfig) -> str:
    """``${metric_direction:}``: the direction of the run's ``report.metric``, for a sweeper
    (conf/hydra/sweeper/optuna_lr.yaml): maximise an eval score, minimise a loss."""
    metric = OmegaConf.select(_root_, "report.metric", default="auto")
    evaluated = bool(OmegaConf.select(_root_, "eval.suites", default=None))
    if metric == "val_loss" or (metric == "auto" and not evaluated):
        return "minimize"
    return "maximize"


def register_schemas() -> None:
    """Store every schema so YAML options can name it in their defaults list."""
    if not OmegaConf.has_resolver("metric_direction"):
        OmegaConf.register_new_resolver("metric_direction", metric_direction)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, node in CLI_SCHEMAS.items():
        cs.store(name=name, node=node)
    for key, node in SCHEMAS.items():
        group, _, variant = key.partition("/")
        name = f"{variant}_schema" if variant else f"{group}_schema"
        cs.store(group=group, name=name, node=node)


def compose(
    overrides: list[str] | None = None,
    return_hydra_config: bool = False,
    config_name: str = "config",
) -> DictConfig:
    """Compose the run config from the shipped groups, as the CLI would (used by tests).

    Any error Hydra raises for a bad override (wrong type, unknown key, unknown option)
    propagates unchanged.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_schemas()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=HYDRA_VERSION_BASE):
        return hydra_compose(
            config_name=config_name,
            overrides=list(overrides or []),
            return_hydra_config=return_hydra_config,
        )


def check(cfg: DictConfig) -> None:
    """Range and cross-field checks the schema's types cannot express, run before any model
    loads (a key with a fixed set of values is an Enum field, checked at composition).

    Every broken rule is reported at once: its key, what it must be and the value given.
    """
    t, o, lora = cfg.trainer, cfg.optimizer, cfg.lora
    rules = [
        ("trainer.batch_size", t.batch_size >= 1, "at least 1"),
        ("trainer.grad_accum", t.grad_accum >= 1, "at least 1"),
        ("trainer.eval_every", t.eval_every >= 1, "at least 1"),
        ("trainer.log_every", t.log_every >= 1, "at least 1"),
        (
            "trainer.checkpoint_every",
            t.checkpoint_every is None or t.checkpoint_every >= 1,
            "null or at least 1",
        ),
        ("trainer.keep_checkpoints", t.keep_checkpoints >= 1, "at least 1"),
        ("trainer.max_length", t.max_length >= 2, "at least 2"),
        ("trainer.epochs", t.epochs >= 1 or t.max_steps is not None, "at least 1"),
        ("trainer.max_steps", t.max_steps is None or t.max_steps >= 1, "null or at least 1"),
        ("optimizer.lr", o.lr > 0 and math.isfinite(o.lr), "positive and finite"),
        ("optimizer.eps", o.eps > 0, "positive"),
        ("optimizer.weight_decay", o.weight_decay >= 0, "at least 0"),
        (
            "optimizer.betas",
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            "2 numbers in [0, 1)",
        ),
        ("optimizer.warmup_steps", o.warmup_steps >= 0, "at least 0"),
        (
            "optimizer.max_grad_norm",
            o.max_grad_norm is None or o.max_grad_norm > 0,
            "null (no clipping) or positive",
        ),
        ("optimizer.warmup_ratio", 0 <= o.warmup_ratio < 1, "in [0, 1)"),
        ("lora.rank", not lora.enabled or lora.rank >= 1, "at least 1"),
        ("lora.dropout", 0 <= lora.dropout < 1, "in [0, 1)"),
        ("lora.alpha", lora.alpha is None or lora.alpha > 0, "null (2 x rank) or positive"),
        ("data.val_fraction", 0 < cfg.data.val_fraction < 1, "in (0, 1)"),
        (
            "data.max_examples",
            cfg.data.max_examples is None or cfg.data.max_examples >= 1,
            "null or at least 1",
        ),
        ("logger.init_timeout", cfg.logger.init_timeout > 0, "positive (seconds)"),
    ]
    bad = [
        f"{key} must be {expected}, got {OmegaConf.select(cfg, key)!r}"
        for key, ok, expected in rules
        if not ok
    ]
    if bad:
        raise ConfigError("invalid config: " + "; ".join(bad))


def option_names(group: str) -> list[str]:
    """The YAML options shipped for a config group, e.g. ``["alpaca", "chatml", ...]``."""
    from importlib import resources

    folder = resources.files(CONFIG_MODULE).joinpath(group)
    names = (p.name for p in folder.iterdir())
    return sorted(n.removesuffix(".yaml") for n in names if n.endswith(".yaml"))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python data (for W&B, results and checkpoints); enum
    values as their names, as the YAML a checkpoint saves holds them."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
