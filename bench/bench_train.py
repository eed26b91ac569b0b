"""Training throughput and memory: our trainer vs TRL's SFTTrainer vs a bare PyTorch loop.

    python bench/bench_train.py                                   # everything, 3 repeats
    python bench/bench_train.py --repeats 1 --workloads tiny --precisions fp32   # smoke run
    python bench/bench_train.py --workloads smollm2 --sides ours trl --repeats 5
    python bench/bench_train.py --workloads prep                  # dataset preparation only
    python bench/bench_train.py --workloads prep_1m --repeats 1   # 1M rows from Parquet
    python bench/bench_train.py --json bench-train.json           # also keep every raw figure
    python bench/bench_train.py --workloads smollm2 --data my.parquet # a user's file (data=file)
    python bench/bench_train.py --device cuda --workloads smollm2 smollm2-1.7b --precisions bf16 \
        --sides ours trl liger --repeats 1                        # on a GPU (bench/gpu.sh)

TRL is a benchmark-only dependency: ``pip install -e ".[bench]"``.

Workloads (same model init, data, batch 8, max_length 512, constant LR, no warmup, weight
decay 0, max_grad_norm 1.0, one epoch, loss on completions only, on every side):

- ``tiny``: a randomly initialised Llama-style model (hidden 128, 2 layers, SmolLM2's 49,152
  token vocabulary, tied head), full fine-tuning at LR 1e-3 on 256 examples;
- ``smollm2``: SmolLM2-135M-Instruct with LoRA (rank 16, alpha 32, dropout 0.05, all linear
  layers) at LR 1e-4 on 48 examples;
- ``smollm2-1.7b`` (only when named): SmolLM2-1.7B's published shape with random weights
  (built in-process, nothing downloaded), LoRA and data as ``smollm2``;
- ``prep``: dataset preparation of 20,000 examples, TRL's against ours (twice: cold, cached).
- ``prep_1m`` (only when named; ``--rows`` sets its size): a million Alpaca-sized rows from
  Parquet, streamed by ours in record batches, against TRL's from_parquet + SFTTrainer.

Each (workload, precision, side, repeat) runs in its own child process, so the peak RSS
(``ru_maxrss`` from ``os.wait4``) is that side's alone; with ``--device cuda`` the peak is
the child's ``torch.cuda.max_memory_allocated`` instead. Sides alternate within each repeat and
the tables show medians over the repeats. Precisions are never compared with each other.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRL_MISSING = 'TRL is not installed; it is a benchmark-only dependency: pip install -e ".[bench]"'
IGNORE_INDEX = -100  # the label that HF, TRL and our trainer all skip in the loss

BATCH_SIZE = 8
MAX_LENGTH = 512
MAX_GRAD_NORM = 1.0
LORA = {"rank": 16, "alpha": 32, "dropout": 0.05}  # target: every linear layer but the head
# The tiny model: SmolLM2's shape in miniature, same tokenizer, same tied head.
TINY = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "init_seed": 0,
}
# SmolLM2-1.7B's published config (HuggingFaceTB/SmolLM2-1.7B, config.json): the shape is a
# fact, the weights are random and built in-process, so nothing is downloaded. Its vocabulary
# (49,152) and tied head come from SmolLM2's tokenizer, as the tiny model's do.
SMOLLM2_1_7B = {
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 8192,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 130000.0,  # transformers 5 moves it into rope_parameters itself
    "init_seed": 0,
}
VAL_EXAMPLES = 4  # a token validation file for our trainer; nothing is trained on it


@dataclass(frozen=True)
class Workload:
    name: str
    examples: int
    lr: float
    lora: bool
    shape: dict[str, Any] | None = None  # random weights of this shape; None: the real model


WORKLOADS = {
    "tiny": Workload("tiny", examples=256, lr=1e-3, lora=False, shape=TINY),
    "smollm2": Workload("smollm2", examples=48, lr=1e-4, lora=True),
    "smollm2-1.7b": Workload("smollm2-1.7b", examples=48, lr=1e-4, lora=True, shape=SMOLLM2_1_7B),
}
DEFAULT_WORKLOADS = ("tiny", "smollm2", "prep")  # smollm2-1.7b and prep_1m only when named
SIDES = ("ours", "trl", "bare", "liger")  # liger: TRL with use_liger_kernel=True (GPU only)
DEFAULT_SIDES = ("ours", "trl", "bare")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")
LIGER_MISSING = "liger-kernel is not installed (pip install liger-kernel): no TRL+Liger column"
LIGER_CPU = "Liger's kernels are Triton GPU kernels: no TRL+Liger column with --device cpu"

FLOPS_FORMULA = """\
Model FLOPs per epoch (the same formula and token counts for every side):
  N_body = weights of the matmuls inside the decoder layers (no embeddings, no output head)
  V*d    = output-head matmul size;  N_lora = LoRA A+B weights;  T = real (non-pad) tokens;
  S      = supervised tokens (labels after the shift)
  full fine-tuning: 6*N_body*T + 6*V*d*S   (a head tied to the embeddings is trained too)
  LoRA:             (4*N_body + 6*N_lora)*T + 4*V*d*S   (frozen weights: no weight gradient)
  Attention-score FLOPs are ignored. Work on padding or on logits at unsupervised positions
  is not counted, so a side that does it gets a lower MFU.
  MFU = model FLOPs / train seconds / matmul peak of the same precision (the higher of the
  measurement at the start and one taken after the group's runs)."""


# ---------------------------------------------------------------- small helpers


def median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def current_rss_kib() -> int:
    """Resident memory now (``VmRSS``), falling back to the peak so far."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# The matmul size of the peak probe: 2048 on a CPU (seconds), 8192 on a GPU, where a 2048
# matmul (17 GFLOP, some 25 us on an H100/H200) would time the launch rather than the card.
PEAK_SIZE = {"cpu": 2048, "cuda": 8192}


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def matmul_peak_gflops(
    dtype_name: str, n: int | None = None, warmup: int = 3, timed: int = 7, device: str = "cpu"
) -> float:
    """Median speed of one large square matmul (all threads on a CPU): the device's
    practical peak. ``n`` defaults to :data:`PEAK_SIZE` of the device."""
    import torch

    n = PEAK_SIZE[device] if n is None else n
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
    for _ in range(warmup):
        torch.matmul(a, b)
    times = []
    for _ in range(timed):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def device_name(device: str) -> str:
    """The GPU's name for ``cuda``; ``cpu`` for the CPU."""
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def memory_now_kib(device: str) -> int:
    """Memory held now, in KiB: the resident set on a CPU, the tensors allocated on a GPU."""
    if device != "cuda":
        return current_rss_kib()
    import torch

    return torch.cuda.memory_allocated() // 1024


def cuda_peak_kib(device: str) -> int | None:
    """``torch.cuda.max_memory_allocated`` in KiB on a GPU, None on a CPU."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() // 1024


# ---------------------------------------------------------------- data and models


def single_turn_records() -> list[dict[str, str]]:
    """The shipped manual set's instruction/input/output records (multi-turn ones skipped)."""
    from instruct.data import manual_path

    keep = ("instruction", "input", "output")
    return [
        {k: r[k] for k in keep if r.get(k)}
        for r in read_jsonl(manual_path())
        if "messages" not in r
    ]


def make_examples(n: int, offset: int = 0) -> list[dict[str, str]]:
    """``n`` examples cycled from the manual set; "(k) " keeps every copy distinct."""
    base = single_turn_records()
    out = []
    for k in range(offset, offset + n):
        record = dict(base[k % len(base)])
        record["instruction"] = f"({k}) {record['instruction']}"
        out.append(record)
    return out


def compose_run(*overrides: str) -> Any:
    from instruct.config import compose

    return compose(
        ["template=chatml", f"trainer.max_length={MAX_LENGTH}", "run_dir=/tmp/x", *overrides]
    )


def smollm2_folder() -> Path:
    """SmolLM2's cached safetensors folder, converted from its GGUF file on first use."""
    from instruct.model import build_model, cache_root, locate_gguf

    cfg = compose_run("model=smollm2-135m").model
    gguf = locate_gguf(cfg)
    folder = cache_root() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (folder / "model.safetensors").is_file():
        build_model(cfg)  # converts once, as our trainer would
    return folder


def private_cache(folder: Path, models: Path) -> None:
    """Point our trainer's ``$INSTRUCT_CACHE`` (in every child) at ``folder``.

    The converted models are linked in, so nothing is converted again, and the tokenised
    splits our runs write go to ``folder`` and are deleted with it, not to the user's cache.
    """
    folder.mkdir(parents=True)
    (folder / "models").symlink_to(models, target_is_directory=True)
    os.environ["INSTRUCT_CACHE"] = str(folder)


def random_model_config(tokenizer: Any, shape: dict[str, Any]) -> Any:
    """A Llama config of ``shape`` (a workload's, ``init_seed`` aside) around ``tokenizer``:
    its vocabulary, a head tied to the embeddings, its EOS and pad ids."""
    from transformers import LlamaConfig

    shape = {"max_position_embeddings": 2048, **shape}
    shape.pop("init_seed", None)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **shape,
    )


def build_random_folder(
    out: Path, tokenizer_folder: Path, shape: dict[str, Any], device: str = "cpu"
) -> Path:
    """Save a model of ``shape`` with random weights (seeded by its ``init_seed``) and the
    tokenizer once: every side loads that folder. Initialised on ``device`` (a 1.7B model
    takes minutes on a few CPU cores, a second on a GPU); saved in fp32, or in bf16 when made
    on a GPU (half the bytes to write and read; every side loads it as fp32 all the same)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = random_model_config(tok, shape)
    on_device = nullcontext() if device == "cpu" else torch.device(device)
    with torch.random.fork_rng(devices=[]), on_device:
        torch.manual_seed(shape["init_seed"])
        model = LlamaForCausalLM(config)
    if device != "cpu":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_folder(out: Path, tokenizer_folder: Path) -> Path:
    """Save the tiny model once (fixed seed) with SmolLM2's tokenizer: every side loads it."""
    return build_random_folder(out, tokenizer_folder, TINY)


def model_dims(folder: Path, rank: int) -> dict[str, int]:
    """N_body, V*d and N_lora of the model in ``folder``, counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.get_decoder().layers
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    return {
        "n_body": sum(m.in_features * m.out_features for m in linears),
        "n_lora": sum(rank * (m.in_features + m.out_features) for m in linears),
        "v_d": head.in_features * head.out_features,
        "tied_head": int(bool(getattr(config, "tie_word_embeddings", False))),
    }


def model_flops(dims: dict[str, int], lora: bool, tokens: int, supervised: int) -> float:
    """Model FLOPs of one epoch, by :data:`FLOPS_FORMULA`."""
    if lora:
        return (4 * dims["n_body"] + 6 * dims["n_lora"]) * tokens + 4 * dims["v_d"] * supervised
    return 6 * dims["n_body"] * tokens + 6 * dims["v_d"] * supervised


def features_and_prompts(
    train_path: Path, tokenizer: Any
) -> tuple[list[dict[str, list[int]]], list[dict[str, str]], Any]:
    """Our features (what ours and the bare loop train on) and TRL's prompt/completion rows.

    Both come from one rendering by our template code, so both sides tokenise the same text.
    """
    from instruct.data import load_records
    from instruct.data.features import tokenize_split
    from instruct.data.templates import render_many, to_messages

    cfg = compose_run()
    if "tokenized_cache" in cfg.trainer:
        cfg.trainer.tokenized_cache = False  # never leave bench entries in the user's cache
    examples = load_records([train_path])  # exactly what our data=file loader reads
    rendered = render_many(
        [to_messages(e, cfg.template) for e in examples], cfg.template, tokenizer
    )
    rows = prompt_completion_rows(rendered, tokenizer)
    if rows is None:
        raise ValueError("expected one trained span ending each text, the text ending in EOS")
    features, stats = tokenize_split(examples, cfg, tokenizer)
    feats = [{"input_ids": f.input_ids.tolist(), "labels": f.labels.tolist()} for f in features]
    return feats, rows, stats


def prompt_completion_rows(rendered: Sequence[Any], tokenizer: Any) -> list[dict] | None:
    """TRL's prompt/completion rows of rendered examples (``prompt = text[:reply start]``,
    ``completion = reply``), or None unless each has one trained span that ends its text in
    EOS (TRL would otherwise append another EOS, or miss a trained turn)."""
    rows = []
    for r in rendered:
        (start, end), *more = r.spans
        if more or end != len(r.text) or not r.text.endswith(tokenizer.eos_token):
            return None
        rows.append({"prompt": r.text[:start], "completion": r.text[start:end]})
    return rows


def hydra_quoted(path: Path) -> str:
    """``path`` as a quoted string in a Hydra override (spaces, commas and brackets kept)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class DataFile:
    """``--data``: a user's file in any format ``data=file`` reads, read for every side by
    the project's own code.

    Our trainer gets the file itself (``data=file``, with ``--data-set`` overrides such as
    ``data.format=csv`` or ``+data.columns={q:instruction}``): its first ``examples +
    VAL_EXAMPLES`` records (``data.max_examples``), split with the run's seed so that
    ``VAL_EXAMPLES`` of them validate. TRL and the bare loop get the train split that
    ``load_splits`` gives for the same config and seed, rendered and tokenised by
    ``tokenize_split``: the same examples, text, token ids and labels as ours.
    """

    path: Path
    settings: tuple[str, ...] = ()
    seed: int = 0

    def overrides(self, examples: int) -> tuple[str, ...]:
        """Our trainer's data overrides for ``examples`` training examples."""
        n = examples + VAL_EXAMPLES
        return (
            "data=file",
            f"data.paths=[{hydra_quoted(self.path.resolve())}]",
            f"data.max_examples={n}",
            f"data.val_fraction={VAL_EXAMPLES / n!r}",  # round(n x fraction) = VAL_EXAMPLES
            *self.settings,
        )

    def config(self, examples: int) -> Any:
        cfg = compose_run(*self.overrides(examples))
        if "tokenized_cache" in cfg.trainer:
            cfg.trainer.tokenized_cache = False  # never leave bench entries in the user's cache
        return cfg

    def train_examples(self, examples: int) -> list[dict[str, Any]]:
        """The training examples our trainer reads: a :class:`~instruct.data.DataError`
        naming the file, line and key for a bad record."""
        from instruct.data import load_splits

        return load_splits(self.config(examples).data, self.seed)[0]

    def features(self, examples: int, tokenizer: Any) -> tuple[list[dict], list[dict], Any]:
        """Our features (what ours and the bare loop train on) and TRL's rows: prompt and
        completion text when every example is one reply ending the text and none is dropped
        (TRL tokenises them as it would a user's data set), else our token ids with
        ``completion_mask`` (TRL's pre-tokenised form: multi-turn conversations, examples
        that ``max_length`` leaves without a reply)."""
        from instruct.data import DataError
        from instruct.data.features import render_split, tokenize_split

        cfg = self.config(examples)
        train = self.train_examples(examples)
        features, stats = tokenize_split(train, cfg, tokenizer)
        if any(f.weights is not None for f in features):
            raise DataError(
                f"--data {self.path}: messages with loss weights (data.train_on=per_message) "
                "have no TRL or bare-loop equivalent; leave the weights out"
            )
        feats = [{"input_ids": f.input_ids.tolist(), "labels": f.labels.tolist()} for f in features]
        rows = None if stats.dropped else prompt_completion_rows(
            render_split(train, cfg, tokenizer).rendered, tokenizer)  # fmt: skip
        if rows is None:
            rows = [{"input_ids": f["input_ids"],
                     "completion_mask": [int(x != IGNORE_INDEX) for x in f["labels"]]}
                    for f in feats]  # fmt: skip
        return feats, rows, stats


@dataclass
class Prepared:
    """One workload's files and the token counts every side is measured against."""

    workload: Workload
    folder: Path
    train: Path
    val: Path
    trl_data: Path
    features: Path
    tokens: int
    supervised: int
    truncated: int
    dims: dict[str, int]
    data: tuple[str, ...] = ()  # --data: our data overrides; empty: train and val above

    @property
    def flops(self) -> float:
        return model_flops(self.dims, self.workload.lora, self.tokens, self.supervised)


def prepare_workload(
    w: Workload, folder: Path, root: Path, data: DataFile | None = None
) -> Prepared:
    """The workload's data, on the manual set cycled to ``w.examples``, or with ``data``
    (``--data``) the first records of a user's file as ``data=file`` reads them."""
    from transformers import AutoTokenizer

    out = root / w.name
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{k}.jsonl" for k in ("train", "val", "trl")}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if data is None:
        write_jsonl(paths["train"], make_examples(w.examples))
        write_jsonl(paths["val"], make_examples(VAL_EXAMPLES, offset=w.examples))
        feats, rows, stats = features_and_prompts(paths["train"], tokenizer)
    else:
        ours_data = data.overrides(w.examples)
        feats, rows, stats = data.features(w.examples, tokenizer)
        w = replace(w, examples=len(feats))  # what every side trains on: the kept examples
        trl_form = "prompt/completion text" if rows and "prompt" in rows[0] else (
            "our token ids + completion_mask (pre-tokenised)")  # fmt: skip
        print(f"[{w.name}] --data {data.path}: {len(feats)} training examples (truncated "
              f"{stats.truncated}, dropped {stats.dropped}); TRL gets {trl_form}")  # fmt: skip
    write_jsonl(paths["trl"], rows)
    (out / "features.json").write_text(json.dumps(feats))
    supervised = sum(sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in feats)
    return Prepared(
        w,
        folder,
        paths["train"],
        paths["val"],
        paths["trl"],
        out / "features.json",
        tokens=sum(len(f["input_ids"]) for f in feats),
        supervised=supervised,
        truncated=stats.truncated,
        dims=model_dims(folder, LORA["rank"]),
        data=() if data is None else ours_data,
    )


# ---------------------------------------------------------------- running the children


# glibc's malloc tuned as ours tunes it in-process (trainer.keep_freed_memory), given to the TRL
# and bare children with --peer-malloc: freed memory is kept for the next step.
KEEP_FREED_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
}
PEER_ENV: dict[str, str] = {}


def spawn(
    cmd: Sequence[str], log_path: Path, extra_env: dict[str, str] | None = None
) -> tuple[int, int, float]:
    """Run ``cmd`` to the end; return (exit code, peak RSS in KiB, wall seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.update(extra_env or {})
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, usage.ru_maxrss, time.perf_counter() - start


def check_exit(code: int, log_path: Path, what: str) -> None:
    if code == 0:
        return
    tail = log_path.read_text(errors="replace").splitlines()[-40:]
    if code == 3 and any(TRL_MISSING in line for line in tail):
        sys.exit(TRL_MISSING)
    raise RuntimeError(f"{what} failed with exit code {code}; log {log_path}:\n" + "\n".join(tail))


def model_overrides(p: Prepared) -> list[str]:
    """Our trainer's model and LoRA overrides: SmolLM2 through its shipped config, a random
    model from its folder."""
    w = p.workload
    if w.shape is None:
        model = ["model=smollm2-135m"]
    else:
        model = ["model=hf", f"model.path={p.folder}", "model.dtype=float32"]
    if not w.lora:
        return [*model, "lora=none"]
    return [
        *model,
        f"lora.rank={LORA['rank']}",
        f"lora.alpha={LORA['alpha']}",
        f"lora.dropout={LORA['dropout']}",
    ]


# On a GPU our CLI runs in-process under this wrapper, which writes the process's
# torch.cuda.max_memory_allocated to $BENCH_CUDA_PEAK at exit (0 where CUDA is absent).
OURS_WITH_CUDA_PEAK = """\
import atexit, os, runpy, torch
def peak():
    with open(os.environ["BENCH_CUDA_PEAK"], "w") as f:
        f.write(str(torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0))
atexit.register(peak)
runpy.run_module("instruct.run", run_name="__main__", alter_sys=True)
"""


def ours_command(overrides: Sequence[str], device: str, peak_file: Path) -> tuple[list, dict]:
    """The command line of our side and its extra environment. On a CPU it is ``python -m
    instruct.run`` with no GPU visible; on a GPU the same module under
    :data:`OURS_WITH_CUDA_PEAK`."""
    if device == "cpu":
        return [sys.executable, "-m", "instruct.run", *overrides], {"CUDA_VISIBLE_DEVICES": ""}
    env = {"BENCH_CUDA_PEAK": str(peak_file)}
    return [sys.executable, "-c", OURS_WITH_CUDA_PEAK, *overrides], env


def run_ours(
    p: Prepared,
    precision: str,
    seed: int,
    adamw: str,
    run_dir: Path,
    extra: Sequence[str] = (),
    device: str = "cpu",
) -> dict:
    w = p.workload
    model = model_overrides(p)
    overrides = [
        *model,
        "template=chatml",
        *(p.data or ("data=file", f"data.paths=[{p.train}]", f"data.val_paths=[{p.val}]")),
        f"hydra.run.dir={run_dir}",
        "logger=none",
        "trainer.save_best=false",
        "trainer.samples=0",
        "trainer.eval_every=1000000",
        "trainer.epochs=1",
        f"trainer.batch_size={BATCH_SIZE}",
        f"trainer.max_length={MAX_LENGTH}",
        f"trainer.precision={precision}",
        f"optimizer.lr={w.lr}",
        "optimizer.scheduler=constant",
        "optimizer.warmup_ratio=0",
        "optimizer.warmup_steps=0",
        "optimizer.weight_decay=0",
        f"optimizer.max_grad_norm={MAX_GRAD_NORM}",
        f"seed={seed}",
    ]
    if adamw == "foreach":  # the default (fused where torch has it) needs no override
        overrides.append("optimizer.fused=false")
    overrides.extend(extra)  # --ours-set: a lever switched off, for an ablation
    run_dir.mkdir(parents=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    peak_file = run_dir.parent / f"{run_dir.name}.cuda-peak"
    cmd, env = ours_command(overrides, device, peak_file)
    code, peak, wall = spawn(cmd, log, env)
    check_exit(code, log, f"ours ({w.name} {precision})")
    res = json.loads((run_dir / "results.json").read_text())
    losses = [loss for _, loss in res["train_loss_history"]]
    cuda = {"cuda_peak_kib": int(peak_file.read_text()) // 1024} if device == "cuda" else {}
    return {
        **cuda,
        "train_s": res["train_seconds"],
        "supervised": res["supervised_tokens"],
        "tokens": res.get("data", {}).get("train", {}).get("tokens"),
        "mean_loss": statistics.fmean(losses),
        "final_loss": res["final_train_loss"],
        "steps": res.get("steps"),
        "peak_rss_kib": peak,
        "rss_before_kib": None,  # inside our trainer's process: not observable from outside
        "process_s": wall,
        "eval_s_excluded": "eval_seconds" in res,
        "trainable": res.get("trainable_parameters"),
        "packing": res.get("packing"),
        "command": shlex.join(["python", "-m", "instruct.run", *overrides]),
    }


def run_child(kind: str, spec: dict[str, Any], work: Path) -> dict:
    """Run ``--child kind`` on ``spec``; its result JSON plus peak RSS and process wall."""
    spec_path, log = work / "spec.json", work / "child.log"
    spec = {**spec, "out": str(work / "result.json")}
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)]
    code, peak, wall = spawn(cmd, log, PEER_ENV)
    check_exit(code, log, f"{kind} child")
    return {**json.loads(Path(spec["out"]).read_text()), "peak_rss_kib": peak, "process_s": wall}


def side_spec(
    p: Prepared, precision: str, seed: int, adamw: str, device: str = "cpu", liger: bool = False
) -> dict[str, Any]:
    return {
        "device": device,
        "liger": liger,
        "folder": str(p.folder),
        "trl_data": str(p.trl_data),
        "features": str(p.features),
        "precision": precision,
        "lr": p.workload.lr,
        "lora": p.workload.lora,
        "seed": seed,
        "fused": adamw == "fused",
    }


def run_side(
    side: str,
    p: Prepared,
    precision: str,
    seed: int,
    adamw: str,
    work: Path,
    ours_set: Sequence[str] = (),
    device: str = "cpu",
) -> dict:
    work.mkdir(parents=True)
    if side == "ours":
        return run_ours(p, precision, seed, adamw, work / "run", ours_set, device)
    spec = side_spec(p, precision, seed, adamw, device, liger=side == "liger")
    return run_child("trl" if side == "liger" else side, spec, work)


# ---------------------------------------------------------------- children: TRL and bare loop


def load_model(folder: str, device: str = "cpu") -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return (model if device == "cpu" else model.to(device)), tokenizer


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def token_counts(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict:
    """Real tokens and supervised tokens (labels after the loss's shift) of a data set."""
    return {
        "tokens": sum(len(x) for x in input_ids),
        "supervised": sum(sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in labels),
    }


def compare_with_ours(ids: list[list[int]], labels: list[list[int]], feats: list[dict]) -> dict:
    """How TRL's processed rows differ from our features, example by example."""
    if len(ids) != len(feats):
        return {"examples_ours": len(feats), "examples_trl": len(ids)}
    ids_differ = sum(a != f["input_ids"] for a, f in zip(ids, feats, strict=True))
    labels_differ = sum(b != f["labels"] for b, f in zip(labels, feats, strict=True))
    return {"examples_with_other_ids": ids_differ, "examples_with_other_labels": labels_differ}


def trl_config(spec: dict[str, Any], output_dir: str) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_length=MAX_LENGTH,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        bf16=spec["precision"] == "bf16",
        fp16=False,
        gradient_checkpointing=False,  # TRL 1.16 defaults to True; like for like, it stays off
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=spec["seed"],
        use_cpu=spec.get("device", "cpu") == "cpu",
        use_liger_kernel=spec.get("liger", False),
        disable_tqdm=True,
        dataset_num_proc=None,
        optim="adamw_torch_fused" if spec["fused"] else "adamw_torch",
    )


def import_trl() -> None:
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        print(TRL_MISSING, file=sys.stderr)
        sys.exit(3)


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import_trl()
    from datasets import Dataset
    from trl import SFTTrainer

    device = spec.get("device", "cpu")
    model, tokenizer = load_model(spec["folder"], device)
    dataset = Dataset.from_list(read_jsonl(spec["trl_data"]))
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        trainer = SFTTrainer(
            model=model,
            args=trl_config(spec, tmp),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config() if spec["lora"] else None,
        )
        ids, labels = trainer.train_dataset["input_ids"], trainer.train_dataset["labels"]
        feats = json.loads(Path(spec["features"]).read_text())
        rss_before = current_rss_kib()
        cuda_before = memory_now_kib(device) if device == "cuda" else None
        synchronize(device)
        start = time.perf_counter()
        output = trainer.train()
        synchronize(device)
        wall = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    cuda = {"cuda_peak_kib": cuda_peak_kib(device), "cuda_before_kib": cuda_before}
    return {
        **(cuda if device == "cuda" else {}),
        "train_s": wall,
        "train_runtime": output.metrics.get("train_runtime"),
        **token_counts(ids, labels),
        "vs_ours": compare_with_ours(ids, labels, feats),
        "mean_loss": statistics.fmean(losses),
        "final_loss": losses[-1],
        "steps": trainer.state.global_step,
        "rss_before_kib": rss_before,
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def pad_batch(feats: Sequence[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch to its longest row: dynamic padding, pad labels ignored."""
    import torch

    width = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), width), pad_id, dtype=torch.long)
    labels = torch.full((len(feats), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(feats), width), dtype=torch.long)
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        ids[row, :n], labels[row, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def child_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """The reference: HF forward with labels (full logits), torch AdamW, constant LR."""
    import torch

    torch.manual_seed(spec["seed"])
    device = spec.get("device", "cpu")
    model, tokenizer = load_model(spec["folder"], device)
    if spec["lora"]:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=spec["lr"], weight_decay=0.0, fused=spec["fused"] or None
    )
    feats = json.loads(Path(spec["features"]).read_text())
    order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(spec["seed"]))
    batches = [order[i : i + BATCH_SIZE].tolist() for i in range(0, len(feats), BATCH_SIZE)]
    bf16 = spec["precision"] == "bf16"
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()
    losses, supervised = [], 0
    rss_before = current_rss_kib()
    cuda_before = memory_now_kib(device) if device == "cuda" else None
    synchronize(device)
    start = time.perf_counter()
    for indices in batches:
        inputs = pad_batch([feats[i] for i in indices], tokenizer.pad_token_id)
        supervised += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        if device != "cpu":
            inputs = {k: v.to(device) for k, v in inputs.items()}
        with autocast:
            loss = model(**inputs).loss  # HF: mean over the supervised tokens of the batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    synchronize(device)
    wall = time.perf_counter() - start
    cuda = {"cuda_peak_kib": cuda_peak_kib(device), "cuda_before_kib": cuda_before}
    return {
        **(cuda if device == "cuda" else {}),
        "train_s": wall,
        "supervised": supervised,
        "tokens": sum(len(f["input_ids"]) for f in feats),
        "mean_loss": statistics.fmean(losses),
        "final_loss": losses[-1],
        "steps": len(batches),
        "rss_before_kib": rss_before,
        "trainable": sum(p.numel() for p in params),
    }


# ---------------------------------------------------------------- dataset preparation


def child_prep_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's preparation: the construction of SFTTrainer, which tokenises the data set.

    A construction on 8 examples first (on its own model copy) warms the imports up and
    measures what construction costs besides the data.
    """
    import_trl()
    from datasets import Dataset
    from trl import SFTTrainer

    rows = read_jsonl(spec["trl_data"])
    fp32 = {**spec, "precision": "fp32", "lr": 1e-3, "seed": 0, "fused": True}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-trl-prep-") as tmp:
        for name, subset in (("baseline_8", rows[:8]), ("full", rows)):
            model, tokenizer = load_model(spec["folder"])
            start = time.perf_counter()
            dataset = Dataset.from_list(subset)
            out[f"{name}_from_list_s"] = time.perf_counter() - start
            start = time.perf_counter()
            trainer = SFTTrainer(
                model=model,
                args=trl_config(fp32, tmp),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
            out[f"{name}_construct_s"] = time.perf_counter() - start
    ids, labels = trainer.train_dataset["input_ids"], trainer.train_dataset["labels"]
    return {**out, "examples": len(ids), **token_counts(ids, labels)}


def child_prep_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Ours: ``tokenize_split`` (render + tokenise) twice, on a fresh tokenised cache."""
    from transformers import AutoTokenizer

    from instruct.data import load_records
    from instruct.data.features import tokenize_split

    os.environ["INSTRUCT_CACHE"] = spec["cache"]  # cold: nothing from earlier runs
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    cfg = compose_run()
    start = time.perf_counter()
    examples = load_records([spec["train"]])
    out: dict[str, Any] = {"load_records_s": time.perf_counter() - start}
    for run in ("first", "second"):
        start = time.perf_counter()
        features, stats = tokenize_split(examples, cfg, tokenizer)
        out[f"{run}_s"] = time.perf_counter() - start
    cache = Path(spec["cache"]) / "tokenized"
    out["cache_entries"] = len(list(cache.glob("*"))) if cache.is_dir() else 0
    ids = [f.input_ids for f in features]
    return {**out, "examples": len(ids), **token_counts(ids, [f.labels for f in features])}


def run_prep(folder: Path, root: Path, n: int, repeats: int) -> dict[str, Any]:
    """Each side ``repeats`` times, alternating (ours, TRL, ours, ...), each in a fresh child
    and ours on an empty tokenised cache every time."""
    from transformers import AutoTokenizer

    out = root / "prep"
    out.mkdir(parents=True)
    train, trl_data = out / "train.jsonl", out / "trl.jsonl"
    write_jsonl(train, make_examples(n))
    _, rows, _ = features_and_prompts(train, AutoTokenizer.from_pretrained(folder))
    write_jsonl(trl_data, rows)
    result: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    for rep in range(repeats):
        for side in ("ours", "trl"):
            work = out / f"{side}-{rep}"
            work.mkdir()
            spec = {
                "folder": str(folder),
                "train": str(train),
                "trl_data": str(trl_data),
                "cache": str(work / "cache"),
            }
            result[side].append(run_child(f"prep-{side}", spec, work))
    return result


def print_prep(n: int, r: dict[str, list[dict[str, Any]]]) -> None:
    ours, trl = r["ours"], r["trl"]
    trl_prep = [x["full_construct_s"] - x["baseline_8_construct_s"] for x in trl]
    first, second = [x["first_s"] for x in ours], [x["second_s"] for x in ours]

    def runs(values: list[float]) -> str:
        return "  [" + ", ".join(f"{v:.2f}" for v in values) + "]"

    print(
        f"\n== dataset preparation: {n:,} examples, ChatML, max_length {MAX_LENGTH}; "
        f"{len(ours)} alternating repeats, medians =="
    )
    print(
        f"TRL  SFTTrainer(...) construction, {n:,} examples:   "
        f"{median(x['full_construct_s'] for x in trl):8.2f} s"
        f"  (8 examples: {median(x['baseline_8_construct_s'] for x in trl):.2f} s;"
        f" difference {median(trl_prep):.2f} s{runs(trl_prep)};"
        f" Dataset.from_list {median(x['full_from_list_s'] for x in trl):.2f} s, not included)"
    )
    print(
        f"ours tokenize_split, first run (render + tokenise): {median(first):8.2f} s{runs(first)}"
    )
    entries = min(x["cache_entries"] for x in ours)
    print(
        f"ours tokenize_split, second run:                    {median(second):8.2f} s"
        f"{runs(second)}  (tokenised cache entries after the runs: {entries})"
    )
    if not entries:
        print("     (no tokenised cache: the second run repeats the work)")
    print(
        f"     ours also renders the text; TRL gets it pre-rendered. load_records "
        f"{median(x['load_records_s'] for x in ours):.2f} s, not included"
    )
    for side in ("ours", "trl"):
        x = r[side][-1]
        peak = max(y["peak_rss_kib"] for y in r[side])
        print(
            f"{side:4} {x['examples']:,} examples, {x['tokens']:,} tokens, "
            f"{x['supervised']:,} supervised; child peak RSS {peak / 2**20:.2f} GiB"
        )
    print(
        f"speed-up ours (first run) vs TRL construction: {median(trl_prep) / median(first):.1f}x;"
        f" cached: {median(trl_prep) / median(second):.1f}x"
    )
    report_mismatch("prep", trl[-1]["supervised"], ours[-1]["supervised"], "TRL", "ours")


# ---------------------------------------------------------------- a million rows from Parquet

PREP_1M_CHUNK = 50_000  # rows generated, rendered and written at a time (the parent's memory)


def write_prep_1m_data(out: Path, n: int, tokenizer: Any) -> dict[str, Any]:
    """``n`` rows as two Parquet files, written a chunk at a time: ``alpaca.parquet``
    (instruction, input, output: what ours reads and renders) and ``trl.parquet`` (the same
    rows rendered once by our template code, as prompt and completion text for TRL)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from instruct.data.templates import render_many, to_messages

    template = compose_run().template
    alpaca, trl = out / "alpaca.parquet", out / "trl.parquet"
    writers: dict[str, Any] = {}
    chars = 0
    for offset in range(0, n, PREP_1M_CHUNK):
        rows = make_examples(min(PREP_1M_CHUNK, n - offset), offset)
        chars += sum(
            len(r["instruction"]) + len(r.get("input", "")) + len(r["output"]) for r in rows
        )
        table = pa.Table.from_pylist(
            [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
             for r in rows]
        )  # fmt: skip
        rendered = render_many([to_messages(r, template) for r in rows], template, tokenizer)
        prompts, completions = [], []
        for r in rendered:
            (start, end), *more = r.spans
            if more or end != len(r.text) or not r.text.endswith(tokenizer.eos_token):
                raise ValueError(f"expected one trained span ending with EOS, got {r.spans}")
            prompts.append(r.text[:start])
            completions.append(r.text[start:end])
        pairs = pa.table({"prompt": prompts, "completion": completions})
        for path, t in ((alpaca, table), (trl, pairs)):
            if path not in writers:
                writers[path] = pq.ParquetWriter(path, t.schema)
            writers[path].write_table(t, row_group_size=10_000)
    for w in writers.values():
        w.close()
    return {
        "alpaca": str(alpaca),
        "trl": str(trl),
        "rows": n,
        "mean_chars": chars / n,
        "alpaca_mib": alpaca.stat().st_size / 2**20,
        "trl_mib": trl.stat().st_size / 2**20,
    }


def peak_rss_kib() -> int:
    """This process's peak resident memory since it started its program (``VmHWM``).

    Not ``ru_maxrss``: a child started by fork + exec keeps in it the peak of the parent's
    memory it was forked from (Linux carries it across exec), so a child of a parent
    holding 0.8 GB reads at least 0.8 GB, whatever it does itself.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_prep_1m_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Ours: the Parquet file read in record batches, each rendered, tokenised and kept as
    int32 arrays (:func:`instruct.data.stream.prepare_stream`)."""
    from transformers import AutoTokenizer

    from instruct.data import Location, Source
    from instruct.data.stream import prepare_stream

    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    template = compose_run().template
    rss_before = current_rss_kib()
    start = time.perf_counter()
    source = Source((Location(spec["alpaca"]),))
    features = prepare_stream(source.batches(), template, tokenizer, MAX_LENGTH)
    wall = time.perf_counter() - start
    stats = features.stats
    return {
        "prep_s": wall,
        "peak_after_prep_kib": peak_rss_kib(),
        "rss_before_kib": rss_before,
        "features_mib": features.nbytes / 2**20,
        "examples": stats.kept,
        "dropped": stats.dropped,
        "truncated": stats.truncated,
        "tokens": stats.tokens,
        "supervised": stats.supervised_tokens,
    }


def child_prep_1m_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL: ``Dataset.from_parquet`` on the rendered rows, then ``SFTTrainer(...)``, whose
    construction tokenises, builds labels, truncates and filters (``datasets`` maps, written
    to a fresh cache folder, so nothing is reused from an earlier run). A construction on 8
    rows first warms the imports up and measures what construction costs besides the data."""
    os.environ["HF_DATASETS_CACHE"] = spec["cache"]  # before datasets is imported
    import_trl()
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Dataset
    from trl import SFTTrainer

    fp32 = {**spec, "precision": "fp32", "lr": 1e-3, "seed": 0, "fused": True}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-trl-prep-") as tmp:
        model, tokenizer = load_model(spec["folder"])
        few = Dataset.from_list([{"prompt": "Hi", "completion": "Hello" + tokenizer.eos_token}] * 8)
        start = time.perf_counter()
        SFTTrainer(model=model, args=trl_config(fp32, tmp), train_dataset=few,
                   processing_class=tokenizer)  # fmt: skip
        out["baseline_8_construct_s"] = time.perf_counter() - start
        out["rss_before_kib"] = current_rss_kib()
        start = time.perf_counter()
        dataset = Dataset.from_parquet(spec["trl"], cache_dir=spec["cache"])
        out["from_parquet_s"] = time.perf_counter() - start
        start = time.perf_counter()
        trainer = SFTTrainer(model=model, args=trl_config(fp32, tmp), train_dataset=dataset,
                             processing_class=tokenizer)  # fmt: skip
        out["construct_s"] = time.perf_counter() - start
        out["peak_after_prep_kib"] = peak_rss_kib()
        # Counted a batch at a time, in Arrow: never all rows as Python lists.
        tokens = supervised = 0
        data = trainer.train_dataset.with_format("arrow")
        for table in data.iter(batch_size=20_000):
            ids, labels = table["input_ids"].combine_chunks(), table["labels"].combine_chunks()
            tokens += int(pc.sum(pc.list_value_length(ids)).as_py())
            flat = np.asarray(labels.flatten())
            firsts = np.asarray(labels.offsets)[:-1]
            supervised += int((flat != IGNORE_INDEX).sum() - (flat[firsts] != IGNORE_INDEX).sum())
        out.update(examples=len(trainer.train_dataset), tokens=tokens, supervised=supervised)
    out["cache_mib"] = sum(f.stat().st_size for f in Path(spec["cache"]).rglob("*") if f.is_file())
    out["cache_mib"] /= 2**20
    return out


def run_prep_1m(folder: Path, root: Path, n: int, repeats: int) -> dict[str, Any]:
    """The rows written once; then ours and TRL, alternating, each in a fresh child."""
    from transformers import AutoTokenizer

    out = root / "prep_1m"
    out.mkdir(parents=True)
    start = time.perf_counter()
    data = write_prep_1m_data(out, n, AutoTokenizer.from_pretrained(folder))
    data["write_s"] = time.perf_counter() - start
    print(
        f"[prep_1m] {n:,} rows written in {data['write_s']:.1f} s: alpaca.parquet "
        f"{data['alpaca_mib']:.1f} MiB, trl.parquet {data['trl_mib']:.1f} MiB, "
        f"{data['mean_chars']:.0f} characters a row (instruction + input + output)",
        flush=True,
    )
    result: dict[str, Any] = {"data": data, "ours": [], "trl": []}
    for rep in range(repeats):
        for side in ("ours", "trl"):
            work = out / f"{side}-{rep}"
            work.mkdir()
            spec = {**data, "folder": str(folder), "cache": str(work / "hf-cache")}
            r = run_child(f"prep_1m-{side}", spec, work)
            print(f"[prep_1m repeat {rep + 1}/{repeats}] {side}: {prep_1m_seconds(r):.1f} s, "
                  f"peak RSS {r['peak_after_prep_kib'] / 2**20:.2f} GiB", flush=True)  # fmt: skip
            result[side].append(r)
            shutil.rmtree(work / "hf-cache", ignore_errors=True)
    return result


def prep_1m_seconds(r: dict[str, Any]) -> float:
    """Ours: the stream; TRL: from_parquet + construction - the 8-row construction."""
    if "prep_s" in r:
        return r["prep_s"]
    return r["from_parquet_s"] + r["construct_s"] - r["baseline_8_construct_s"]


def print_prep_1m(r: dict[str, Any]) -> None:
    ours, trl, n = r["ours"], r["trl"], r["data"]["rows"]
    gib = 2**30 / 1024  # KiB per GiB

    def row(name: str, runs: list[dict[str, Any]], how: str) -> tuple[float, float]:
        secs = median(prep_1m_seconds(x) for x in runs)
        peak = median(x["peak_after_prep_kib"] for x in runs) / gib
        before = median(x["rss_before_kib"] for x in runs) / gib
        print(f"{name:5} {secs:9.1f} {n / secs:12,.0f} {peak:9.2f} {before:9.2f}   {how}")
        return secs, peak

    print(
        f"\n== prep_1m: {n:,} Alpaca-sized rows from Parquet, ChatML, SmolLM2 tokenizer, "
        f"max_length {MAX_LENGTH}; {len(ours)} alternating repeat(s), medians =="
    )
    print(f"{'side':5} {'seconds':>9} {'rows/s':>12} {'peak GiB':>9} {'pre GiB':>9}")
    ours_s, ours_peak = row("ours", ours, "read (record batches) + render + tokenise")
    trl_s, trl_peak = row(
        "TRL", trl,
        "from_parquet {:.1f} s + SFTTrainer construction {:.1f} s - 8-row construction "
        "{:.1f} s".format(*(median(x[k] for x in trl) for k in (
            "from_parquet_s", "construct_s", "baseline_8_construct_s"))),
    )  # fmt: skip
    print(
        "(peak: the child's VmHWM after preparing, imports and tokenizer included (TRL also "
        "a 25 MB model); pre: RSS just before the timed preparation)"
    )
    print(
        f"speed ours/TRL: {trl_s / ours_s:.2f}x (target >= 4x); peak RSS ours/TRL: "
        f"{ours_peak / trl_peak:.2f} (target <= 0.5)"
    )
    o, t = ours[-1], trl[-1]
    print(
        f"ours keeps {o['features_mib']:,.0f} MiB of token ids + trained mask in memory; TRL wrote "
        f"{t['cache_mib']:,.0f} MiB of Arrow cache files (memory-mapped, on disk)"
    )
    print(
        f"examples kept: ours {o['examples']:,} (dropped {o['dropped']}, truncated "
        f"{o['truncated']}), TRL {t['examples']:,}"
    )
    same = "=" if t["tokens"] == o["tokens"] else "DIFFER:"
    print(f"[prep_1m] tokens: TRL {t['tokens']:,} {same} ours {o['tokens']:,}")
    report_mismatch("prep_1m", t["supervised"], o["supervised"], "TRL", "ours")


# ---------------------------------------------------------------- reporting


def report_mismatch(where: str, value: int | None, expected: int, name: str, ref: str) -> None:
    if value is None:
        return
    if value == expected:
        print(f"[{where}] supervised tokens: {name} {value:,} = {ref} {expected:,}")
    else:
        print(
            f"[{where}] SUPERVISED TOKENS DIFFER: {name} {value:,} vs {ref} {expected:,} "
            f"({value - expected:+,})"
        )


def explain_trl(where: str, runs: list[dict], p: Prepared) -> None:
    if not runs:
        return
    r = runs[0]
    report_mismatch(where, r["supervised"], p.supervised, "TRL", "our features")
    report_mismatch(where, r["tokens"], p.tokens, "TRL real tokens", "ours")
    diff = r.get("vs_ours", {})
    if any(diff.values()):
        print(
            f"[{where}] TRL's processed rows vs our features: {diff}. TRL tokenises prompt and "
            "prompt+completion apart and supervises from where they diverge; ours tokenises "
            "the whole text once and supervises tokens that start inside the reply."
        )


# The memory columns of each device: (peak, just before training), as the results name them.
MEMORY_KEYS = {
    "cpu": ("peak_rss_kib", "rss_before_kib"),  # resident memory
    "cuda": ("cuda_peak_kib", "cuda_before_kib"),  # torch.cuda.max_memory_allocated, allocated
}


def summarise(
    runs: list[dict], flops: float, peak_gflops: float, device: str = "cpu"
) -> dict[str, float | None]:
    peak_key, before_key = MEMORY_KEYS[device]
    train_s = median(r["train_s"] for r in runs)
    sup = median(r["supervised"] for r in runs)
    before = median(r.get(before_key) for r in runs)
    return {
        "train_s": train_s,
        "sup_per_s": sup / train_s,
        "peak_gib": median(r[peak_key] for r in runs) / 2**20,
        "before_gib": before / 2**20 if before is not None else None,
        "mean_loss": median(r["mean_loss"] for r in runs),
        "mfu": flops / train_s / (peak_gflops * 1e9),
        "process_s": median(r["process_s"] for r in runs),
    }


def fmt(value: float | None, spec: str, width: int = 0) -> str:
    return "-".rjust(width) if value is None else format(value, f"{width}{spec}")


def print_group(
    key: str, p: Prepared, sides: dict[str, list[dict]], peak: float, device: str = "cpu"
) -> None:
    w = p.workload
    kind = "LoRA r16" if w.lora else "full fine-tuning"
    n = len(next(iter(sides.values())))
    print(
        f"\n== {key}: {kind}, {w.examples} examples, LR {w.lr:g}, {p.tokens:,} real tokens, "
        f"{p.supervised:,} supervised, model {p.flops / 1e12:.3f} TFLOP/epoch, "
        f"peak {peak:.0f} GFLOP/s; medians of {n} =="
    )
    peak_label, pre_label = ("GPU GiB", "GPU pre") if device == "cuda" else ("peak GiB", "pre GiB")
    print(
        f"{'side':6} {'train s':>8} {'sup tok/s':>10} {peak_label:>9} {pre_label:>9} "
        f"{'mean loss':>9} {'MFU':>6} {'process s':>9}"
    )
    rows = {side: summarise(runs, p.flops, peak, device) for side, runs in sides.items()}
    for side, s in rows.items():
        print(
            f"{side:6} {s['train_s']:8.2f} {s['sup_per_s']:10.1f} {s['peak_gib']:9.2f} "
            f"{fmt(s['before_gib'], '.2f', 9)} {s['mean_loss']:9.4f} {s['mfu']:6.1%} "
            f"{s['process_s']:9.1f}"
        )
    print(
        "(train s: ours = results.json train_seconds, TRL = wall around train(), bare = its loop; "
        "pre GiB: RSS just before training, '-' where the process is our CLI; process s: the "
        "whole child, imports and model load included)"
    )
    if device == "cuda":
        print(
            "(on the GPU: GPU GiB = the child's torch.cuda.max_memory_allocated, GPU pre = "
            "allocated just before training; train s timed after torch.cuda.synchronize)"
        )
    if "ours" in rows:
        for other in ("trl", "bare", "liger"):
            if other in rows:
                ratio = rows["ours"]["sup_per_s"] / rows[other]["sup_per_s"]
                print(f"ours/{other} supervised tokens/s: {ratio:.2f}x")
        if "trl" in rows:
            ratio = rows["ours"]["peak_gib"] / rows["trl"]["peak_gib"]
            print(
                f"peak {'GPU memory' if device == 'cuda' else 'RSS'} ours/trl: {ratio:.2f} "
                f"({rows['ours']['peak_gib']:.2f} vs "
                f"{rows['trl']['peak_gib']:.2f} GiB)"
            )
    if "ours" in sides:
        ours = sides["ours"][0]
        report_mismatch(key, ours["supervised"], p.supervised, "ours (results.json)", "features")
        if not ours["eval_s_excluded"]:
            print(
                f"[{key}] results.json has no eval_seconds: ours' train_seconds may include "
                "validation time"
            )
    if "bare" in sides:
        report_mismatch(key, sides["bare"][0]["supervised"], p.supervised, "bare", "features")
    explain_trl(key, sides.get("trl", []), p)
    for side in ("trl", "liger"):
        if side in sides:
            runtime = median(r["train_runtime"] for r in sides[side])
            print(
                f"[{key}] {'TRL' if side == 'trl' else 'TRL+Liger'} train_runtime metric "
                f"{fmt(runtime, '.2f')} s (the table shows the wall clock around train())"
            )
    trainable = {side: runs[0].get("trainable") for side, runs in sides.items()}
    print(f"[{key}] trainable parameters: {trainable}")


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workloads",
        nargs="+",
        choices=[*WORKLOADS, "prep", "prep_1m"],
        default=list(DEFAULT_WORKLOADS),  # prep_1m only when named: ~15 minutes on 2 cores
    )
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument(
        "--sides",
        nargs="+",
        choices=SIDES,
        default=list(DEFAULT_SIDES),
        help="liger: TRL with use_liger_kernel=True (needs liger-kernel and --device cuda)",
    )
    ap.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where every side trains: cpu (no GPU visible to ours) or cuda (timed after "
        "torch.cuda.synchronize; peak memory from torch.cuda.max_memory_allocated)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--peak-size", type=int, default=None,
        help="side of the square matmul that measures the peak (default: the device's, "
        "2048 on a CPU)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--examples",
        type=int,
        default=None,
        help="training examples per workload (default: 256 tiny, 48 smollm2 and smollm2-1.7b)",
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="FILE",
        help="train the training workloads on this file instead of the cycled manual set: any "
        "format data=file reads (JSONL, JSON, CSV/TSV, Parquet, a saved data set; Alpaca, Dolly, "
        "prompt/completion, messages, ShareGPT); its first --examples records (default: the "
        f"workload's count) train and {VAL_EXAMPLES} more validate",
    )
    ap.add_argument(
        "--data-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="data.* overrides for --data, on every side: e.g. data.format=csv "
        "'+data.columns={question:instruction,answer:output}'",
    )
    ap.add_argument("--prep-examples", type=int, default=20_000)
    ap.add_argument(
        "--rows", type=int, default=1_000_000, help="rows of the prep_1m workload (try 50000)"
    )
    ap.add_argument(
        "--adamw",
        choices=["fused", "foreach"],
        default="fused",
        help="torch AdamW kernel on every side (ours defaults to fused on CPU)",
    )
    ap.add_argument(
        "--peer-malloc",
        action="store_true",
        help="give the TRL and bare children glibc's malloc tuned as ours keeps it "
        "(trainer.keep_freed_memory), through MALLOC_*_THRESHOLD_",
    )
    ap.add_argument(
        "--ours-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for our side, e.g. lora.dropout_draw=mask to measure "
        "what one lever is worth",
    )
    ap.add_argument("--json", type=Path, default=None, help="write every raw figure here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, run dirs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "trl": child_trl,
    "bare": child_bare,
    "prep-trl": child_prep_trl,
    "prep-ours": child_prep_ours,
    "prep_1m-trl": child_prep_1m_trl,
    "prep_1m-ours": child_prep_1m_ours,
}


def child_main(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = CHILDREN[kind](spec)
    result["child_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(spec["out"]).write_text(json.dumps(result))


def header(args: argparse.Namespace, peaks: dict[str, float]) -> None:
    import torch

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"torch threads: {torch.get_num_threads()}; CPUs: {os.cpu_count()}")
    if args.device != "cpu":
        print(f"device: {args.device} ({device_name(args.device)}, CUDA {torch.version.cuda})")
    if peaks:
        n = PEAK_SIZE[args.device]
        print(
            f"matmul peak ({n}x{n}, median of 7): "
            + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
        )
    print(
        f"settings: batch {BATCH_SIZE}, max_length {MAX_LENGTH}, constant LR, no warmup, "
        f"weight decay 0, max_grad_norm {MAX_GRAD_NORM}, 1 epoch, completion-only loss, "
        f"AdamW {args.adamw}; TRL: gradient_checkpointing=False, padding_free=False, "
        "packing=False"
        + ("; TRL and bare: glibc malloc keeps freed memory, as ours" if PEER_ENV else "")
        + (f"; ours with {' '.join(args.ours_set)}" if args.ours_set else "")
        + (f"; data {shlex.join([str(args.data), *args.data_set])}" if args.data else "")
    )
    if peaks:
        print(FLOPS_FORMULA)


def usable_sides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The sides asked for that can run here, and a note for each left out (TRL+Liger
    without liger-kernel or without a GPU: the table then has no such column)."""
    sides, notes = list(args.sides), []
    if "liger" in sides:
        missing = importlib.util.find_spec("liger_kernel") is None
        if args.device == "cpu" or missing:
            sides.remove("liger")
            notes.append(LIGER_CPU if args.device == "cpu" else LIGER_MISSING)
    return sides, notes


def model_folders(names: Sequence[str], root: Path, device: str) -> dict[str, Path]:
    """The model folder of each training workload named (and of ``tiny``, which ``prep``
    uses): SmolLM2's converted weights, the random models built and saved under ``root``."""
    smol = smollm2_folder()
    private_cache(root / "instruct-cache", smol.parent)
    folders = {"tiny": build_tiny_folder(root / "tiny-model", smol), "smollm2": smol}
    for name in names:
        shape = WORKLOADS[name].shape
        if name not in folders and shape is not None:
            folders[name] = build_random_folder(root / f"{name}-model", smol, shape, device)
    return folders


def run_group(
    p: Prepared, precision: str, args: argparse.Namespace, sides: Sequence[str], root: Path
) -> dict[str, list[dict]]:
    """Every side of one (workload, precision), ``args.repeats`` times, sides alternating."""
    key = f"{p.workload.name} {precision}"
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        for side in sides:
            work = root / p.workload.name / precision / f"{side}-{rep}"
            r = run_side(
                side, p, precision, args.seed, args.adamw, work, args.ours_set, args.device
            )
            runs[side].append(r)
            peak = r[MEMORY_KEYS[args.device][0]]
            print(
                f"[{key} repeat {rep + 1}/{args.repeats}] {side}: train "
                f"{r['train_s']:.2f} s, peak {'GPU memory' if args.device == 'cuda' else 'RSS'} "
                f"{peak / 2**20:.2f} GiB, mean loss {r['mean_loss']:.4f}",
                flush=True,
            )
    return runs


def data_file(args: argparse.Namespace) -> DataFile | None:
    """``--data`` as a :class:`DataFile`, its records read once here: a bad file or setting
    ends the run with the project's own error (file:line and key) before anything is measured."""
    if args.data is None:
        if args.data_set:
            sys.exit("--data-set: it sets how --data is read; give --data FILE")
        return None
    from hydra.errors import HydraException

    from instruct.errors import UserError

    others = [s for s in args.data_set if not s.lstrip("+~").startswith("data.")]
    if others:
        sys.exit(f"--data-set: only data.* keys (use --ours-set for our trainer), got {others}")
    data = DataFile(args.data, tuple(args.data_set), args.seed)
    try:
        data.train_examples(args.examples or 1)
    except (UserError, HydraException) as err:
        sys.exit(f"--data {args.data}: {err}")
    return data


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """A timeout's SIGTERM ends the run through ``finally``: the groups finished so far are
    written to ``--json`` and the work folder is removed (the children, in the same process
    group, get the signal too)."""
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec)
        return
    needs_trl = {"trl", "liger"} & set(args.sides) or {"prep", "prep_1m"} & set(args.workloads)
    if needs_trl and (importlib.util.find_spec("trl") is None):
        sys.exit(TRL_MISSING)
    data = data_file(args)  # --data: read and checked before anything is measured
    if args.peer_malloc:
        PEER_ENV.update(KEEP_FREED_MEMORY_ENV)
    training = [w for w in args.workloads if w in WORKLOADS]
    sides, notes = usable_sides(args)
    # The matmul peak only serves the MFU of training workloads, and only in the precisions
    # they run (an emulated bf16 peak takes minutes on a CPU without native bf16).
    dev, size = args.device, args.peak_size
    peaks = (
        {name: matmul_peak_gflops(name, size, device=dev) for name in args.precisions}
        if training
        else {}
    )
    header(args, peaks)
    for note in notes:
        print(f"note: {note}")
    root = Path(tempfile.mkdtemp(prefix="bench_train-"))
    raw: dict[str, Any] = {"argv": sys.argv, "versions": versions(), "peak_gflops": dict(peaks)}
    if dev != "cpu":
        raw.update(device=dev, device_name=device_name(dev), sides=sides, notes=notes)
    try:
        folders = model_folders(training, root, dev)
        for name in training:
            w = WORKLOADS[name]
            w = replace(w, examples=args.examples) if args.examples else w
            p = prepare_workload(w, folders[name], root, data)
            raw[name] = {
                "dims": p.dims,
                "tokens": p.tokens,
                "supervised": p.supervised,
                "truncated": p.truncated,
            }
            for precision in args.precisions:
                key = f"{name} {precision}"
                group = run_group(p, precision, args, sides, root)
                # A busy machine only lowers a peak measurement: the table uses the higher of
                # the one at the start and one taken now, after the group's runs.
                again = matmul_peak_gflops(precision, size, device=dev)
                peaks[precision] = max(peaks[precision], again)
                raw.setdefault("peak_gflops_by_group", {})[key] = again
                print_group(key, p, group, peaks[precision], dev)
                raw[key] = group
        if "prep" in args.workloads:
            raw["prep"] = run_prep(folders["tiny"], root, args.prep_examples, args.repeats)
            print_prep(args.prep_examples, raw["prep"])
        if "prep_1m" in args.workloads:
            raw["prep_1m"] = run_prep_1m(folders["tiny"], root, args.rows, args.repeats)
            print_prep_1m(raw["prep_1m"])
        if training:
            print_peak_again(raw, peaks, dev, size)
    finally:
        if args.json:
            args.json.write_text(json.dumps(raw, indent=1, default=str))
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def print_peak_again(
    raw: dict[str, Any], peaks: dict[str, float], device: str, size: int | None = None
) -> None:
    """Measure the matmul peak once more and say whether it moved during the run."""
    after = {name: matmul_peak_gflops(name, size, device=device) for name in peaks}
    raw["peak_gflops_after"] = after
    print(
        "\nmatmul peak again at the end: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in after.items())
    )
    if any(abs(after[k] / raw["peak_gflops"][k] - 1) > 0.2 for k in peaks):
        print(
            "the peak moved by more than 20% during the run: the machine was busy, so the "
            "timings above are noisy"
        )


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    main()
