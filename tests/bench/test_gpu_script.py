"""bench/gpu.sh is right by construction: everything it runs that needs no GPU runs here.

The script itself parses and names steps that exist; the workloads build (the SmolLM2-1.7B
shape on the meta device, a random model at a tiny scale on the CPU); bench_train.py's
``--device`` path trains a one-step tiny workload on the CPU, and our side runs under the
wrapper that reads the GPU's peak memory; the peak probe runs at a tiny size; the table
prints given numbers as expected and reads what the steps write.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def bench_module(name: str) -> ModuleType:
    """``bench/<name>.py`` imported (bench/ is a folder of scripts, not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def bt() -> ModuleType:
    return bench_module("bench_train")


@pytest.fixture(scope="module")
def table() -> ModuleType:
    bench_module("bench_train")  # gpu_table imports it by this name
    return bench_module("gpu_table")


def dry_run(tmp_path: Path) -> dict[str, list[str]]:
    """gpu.sh's steps as it would run them: step name -> argv."""
    env = {**os.environ, "GPU_SH_DRY_RUN": "1", "GPU_SH_WORK": str(tmp_path)}
    done = subprocess.run(["bash", str(BENCH / "gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    return {
        name: shlex.split(rest)
        for name, _, rest in (line.partition(":") for line in done.stdout.splitlines())
    }


def test_gpu_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], check=True, timeout=60)


def test_gpu_sh_runs_steps_that_exist_with_arguments_they_take(tmp_path, bt):
    steps = dry_run(tmp_path)
    assert list(steps) == ["PROBE", "TESTS", "BENCH", "TABLE"]
    probe, tests, bench, table = steps.values()
    assert probe[1:] == ["bench/gpu_table.py", "probe", str(tmp_path)]
    assert table[1:] == ["bench/gpu_table.py", "table", str(tmp_path)]
    assert tests[1:5] == ["-m", "pytest", "-m", "gpu"] and (REPO / tests[5]).is_dir()
    assert "--junitxml" in tests and str(tmp_path / "gpu-tests.xml") in tests
    assert bench[1] == "bench/bench_train.py"
    args = bt.parse_args(bench[2:])  # every option exists and every value is a valid choice
    assert args.device == "cuda" and args.precisions == ["bf16"]
    assert args.workloads == ["smollm2", "smollm2-1.7b"]
    assert args.sides == ["ours", "trl", "liger"]
    assert args.json == tmp_path / "bench.json"


class Vocabulary:
    """What a workload's config reads of a tokenizer."""

    eos_token_id, pad_token_id = 2, 2

    def __len__(self) -> int:
        return 49_152  # SmolLM2's


def test_the_smollm2_1_7b_workload_has_the_published_shape(bt):
    from transformers import LlamaForCausalLM

    config = bt.random_model_config(Vocabulary(), bt.SMOLLM2_1_7B)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        2048, 24, 8192)  # fmt: skip
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 32)
    assert config.vocab_size == 49_152 and config.tie_word_embeddings
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 130_000
    with torch.device("meta"):  # the shapes, without allocating 6.8 GB
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.71e9, rel=1e-3)
    workload = bt.WORKLOADS["smollm2-1.7b"]
    assert workload.lora and workload.shape is bt.SMOLLM2_1_7B
    assert "smollm2-1.7b" not in bt.parse_args([]).workloads  # only when named


def test_a_random_workload_model_builds_on_the_cpu_at_a_tiny_scale(tmp_path, bt, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    scale = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "intermediate_size": 128}  # fmt: skip
    small = {**bt.SMOLLM2_1_7B, **scale}
    first = bt.build_random_folder(tmp_path / "a", tmp_path / "tokenizer", small)
    again = bt.build_random_folder(tmp_path / "b", tmp_path / "tokenizer", small)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    config = json.loads((first / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["vocab_size"] == len(tokenizer)
    dims = bt.model_dims(first, rank=16)
    assert dims["n_body"] == 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert dims["v_d"] == 64 * len(tokenizer) and dims["tied_head"] == 1


def test_the_matmul_peak_probe_runs_on_the_cpu_at_a_tiny_size(tmp_path, bt, table):
    assert bt.matmul_peak_gflops("fp32", n=64, warmup=1, timed=3, device="cpu") > 0
    found = table.probe(tmp_path, device="cpu", n=64)
    assert json.loads((tmp_path / "peak.json").read_text()) == found
    assert found["device"] == "cpu" and found["size"] == 64 and found["bf16_gflops"] > 0


def fixed_summary() -> dict:
    row = {"train_s": 2.0, "sup_per_s": 12_000.0, "mfu": 0.25, "peak_gib": 3.5,
           "mean_loss": 2.27431, "before_gib": None, "process_s": 30.0}  # fmt: skip
    return {
        "device": "NVIDIA H200",
        "torch": "2.11.0",
        "cuda": "13.0",
        "peak_gflops": 781_234.5,
        "tests": {
            "passed": 30,
            "failed": 0,
            "skipped": 2,
            "skip_reasons": ["flash_attn is not installed"],
        },  # fmt: skip
        "steps": {"probe": (0, 4.2), "tests": (0, 95.0), "bench": (124, 255.0)},
        "rows": [
            {"workload": "smollm2 bf16", "side": "ours", **row, "ours_over": None},
            {
                "workload": "smollm2 bf16",
                "side": "trl",
                **row,
                "sup_per_s": 3_000.0,
                "mfu": 0.0625,
                "peak_gib": 11.25,
                "ours_over": 4.0,
            },  # fmt: skip
        ],
        "notes": ["liger-kernel is not installed (pip install liger-kernel): no TRL+Liger column"],
    }


EXPECTED_TABLE = """\
== bench/gpu.sh on NVIDIA H200 (torch 2.11.0, CUDA 13.0); bf16 matmul peak 781.2 TFLOP/s ==
steps: probe ok 4 s; tests ok 95 s; bench TIMED OUT 255 s
gpu tests: 30 passed, 0 failed, 2 skipped
  skipped: flash_attn is not installed
workload            side         train s   sup tok/s     MFU   peak GiB  mean loss  ours/side
smollm2 bf16        ours            2.00      12,000   25.0%       3.50     2.2743          -
smollm2 bf16        TRL             2.00       3,000    6.2%      11.25     2.2743      4.00x
"""


def test_the_table_prints_given_numbers_as_expected(table):
    lines = table.format_table(fixed_summary()).splitlines()
    assert "\n".join(lines[:7]) + "\n" == EXPECTED_TABLE
    assert lines[7].startswith("(train s: training alone")
    assert lines[-1] == (
        "note: liger-kernel is not installed (pip install liger-kernel): no TRL+Liger column"
    )


def test_the_table_reads_what_the_steps_write(tmp_path, bt, table):
    (tmp_path / "steps.tsv").write_text("probe\t0\t4.2\ntests\t1\t95.0\n")
    (tmp_path / "peak.json").write_text(
        json.dumps(
            {
                "device": "NVIDIA H200",
                "torch": "2.11.0",
                "cuda": "13.0",
                "size": 8192,
                "bf16_gflops": 600_000.0,
            }
        )  # fmt: skip
    )
    dims = {"n_body": 1_000_000, "n_lora": 10_000, "v_d": 500_000, "tied_head": 1}
    run = {"train_s": 2.0, "supervised": 600, "mean_loss": 2.0, "process_s": 10.0,
           "peak_rss_kib": 1, "cuda_peak_kib": 3 * 2**20, "cuda_before_kib": 2**20}  # fmt: skip
    raw = {
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "peak_gflops": {"fp32": 50_000.0, "bf16": 500_000.0},
        "peak_gflops_by_group": {"smollm2 bf16": 650_000.0},
        "smollm2": {"dims": dims, "tokens": 1000, "supervised": 600, "truncated": 0},
        "smollm2 bf16": {"ours": [run], "liger": [{**run, "train_s": 4.0}]},
        "notes": ["a note"],
    }
    (tmp_path / "bench.json").write_text(json.dumps(raw))
    summary = table.collect(tmp_path)
    assert summary["peak_gflops"] == 650_000.0  # the highest measurement of the run
    assert summary["steps"] == {"probe": (0, 4.2), "tests": (1, 95.0)}
    assert summary["tests"] is None  # no report: the table says so
    ours, liger = summary["rows"]
    flops = (4 * 1_000_000 + 6 * 10_000) * 1000 + 4 * 500_000 * 600  # bench_train's formula
    assert ours["mfu"] == pytest.approx(flops / 2.0 / 650e12)
    assert ours["peak_gib"] == 3.0 and ours["before_gib"] == 1.0  # GPU memory, not RSS
    assert (ours["sup_per_s"], liger["sup_per_s"], liger["ours_over"]) == (300.0, 150.0, 2.0)
    text = table.format_table(summary)
    assert "tests FAILED (exit 1) 95 s" in text and "gpu tests: no report" in text
    assert "smollm2 bf16        TRL+Liger" in text and text.endswith("note: a note")


@pytest.mark.slow
def test_the_gpu_tests_skip_here_for_one_reason(tmp_path, table):
    report = tmp_path / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p",
           "no:cacheprovider", "--junitxml", str(report)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    tests = table.read_tests(report)
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench/gpu.sh runs these tests for real")
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] >= 20
    from tests.conftest import NO_CUDA

    assert tests["skip_reasons"] == [NO_CUDA]
    unmarked = subprocess.run([*cmd[:4], "not gpu", *cmd[5:9]], cwd=REPO, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    assert unmarked.returncode == 5  # no test in tests/gpu goes without the gpu mark


@pytest.fixture
def restored_cache_env():
    """bench_train points $INSTRUCT_CACHE at its work folder; put it back afterwards."""
    before = os.environ.get("INSTRUCT_CACHE")
    yield
    if before is None:
        os.environ.pop("INSTRUCT_CACHE", None)
    else:
        os.environ["INSTRUCT_CACHE"] = before


@pytest.mark.slow
def test_bench_train_on_the_cpu_trains_a_one_step_tiny_workload(
    tmp_path, bt, table, capsys, restored_cache_env
):
    """--device cpu through main: the CPU's table format, a JSON without the GPU's keys,
    which the GPU table reads all the same."""
    out = tmp_path / "bench.json"
    bt.main(["--workloads", "tiny", "--examples", "8", "--precisions", "fp32", "--sides",
             "ours", "bare", "--repeats", "1", "--device", "cpu", "--peak-size", "64",
             "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "== tiny fp32: full fine-tuning, 8 examples, LR 0.001" in printed
    assert "side    train s  sup tok/s  peak GiB   pre GiB mean loss    MFU process s" in printed
    assert "ours/bare supervised tokens/s:" in printed and "GPU" not in printed
    raw = json.loads(out.read_text())
    assert "device" not in raw and set(raw["tiny fp32"]) == {"ours", "bare"}
    ours, bare = raw["tiny fp32"]["ours"][0], raw["tiny fp32"]["bare"][0]
    assert ours["steps"] == bare["steps"] == 1 and ours["supervised"] == bare["supervised"]
    assert ours["mean_loss"] == pytest.approx(bare["mean_loss"], rel=1e-4)  # same model, data
    rows = table.bench_rows(raw, None)
    assert [r["side"] for r in rows] == ["ours", "bare"] and rows[1]["ours_over"] > 0


@pytest.mark.slow
def test_ours_runs_under_the_wrapper_that_reads_the_gpu_peak(tmp_path, bt, restored_cache_env):
    """Our side as --device cuda starts it, on this machine without CUDA: the CLI runs in
    the wrapper, trains, and the peak it writes at exit is 0."""
    smol = bt.smollm2_folder()
    bt.private_cache(tmp_path / "cache", smol.parent)
    folder = bt.build_tiny_folder(tmp_path / "tiny", smol)
    workload = bt.replace(bt.WORKLOADS["tiny"], examples=8)
    prepared = bt.prepare_workload(workload, folder, tmp_path)
    r = bt.run_side("ours", prepared, "fp32", 0, "fused", tmp_path / "ours", device="cuda")
    assert r["steps"] == 1 and r["supervised"] == prepared.supervised
    assert r["cuda_peak_kib"] == (0 if not torch.cuda.is_available() else r["cuda_peak_kib"])
