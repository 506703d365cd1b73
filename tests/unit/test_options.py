"""The typed-options tables: generated CLI flags, validation, defaults, environment transport."""

import argparse
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from a2ats_sglang import options
from a2ats_sglang.calibration.calibrate import CollectSettings, FitSettings, main, parser, settings_from_args
from a2ats_sglang.config import ENV_PREFIX, A2ATSConfig
from a2ats_sglang.core.codebook import MAX_CODES
from a2ats_sglang.core.retrieval import wrope_distances


@dataclass(frozen=True)
class Toy:
    ratio: float = options.option(0.5, "a share", min=0, max=1, min_exclusive=True)
    share: float = options.option(0.0, "another share", min=0, max=1, max_exclusive=True)
    count: int = options.option(3, "a count", min=1)
    mode: str = options.option("a", "a mode", choices=("a", "b"))
    on: bool = options.option(False, "a switch")
    sizes: tuple = options.option((1, 2), "sizes", min=1)

    def __post_init__(self):
        options.validate(self, where=options.cli_flag)


def bad_values(o: options.Option) -> list:
    """Values just outside an option's bounds."""
    if o.choices is not None:
        return ["not-a-choice"]
    out = []
    if o.min is not None:
        out.append(o.min if o.min_exclusive else o.min - 1)
    if o.max is not None:
        out.append(o.max if o.max_exclusive else o.max + 1)
    return out


def bounded(cls):
    return [(f, v) for f in fields(cls) for v in bad_values(options.spec(f))]


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(k)


def toy_parse(argv):
    p = argparse.ArgumentParser()
    options.add_arguments(p, Toy)
    return Toy(**options.given(p.parse_args(argv), Toy))


def test_generic_validation_names_the_option_the_value_and_the_range():
    for kw, words in [({"ratio": 0.0}, "ratio must be in (0, 1], got 0.0 (--ratio)"),
                      ({"share": 1.0}, "share must be in [0, 1), got 1.0 (--share)"),
                      ({"count": 0}, "count must be >= 1, got 0 (--count)"),
                      ({"mode": "c"}, "mode must be one of ('a', 'b'), got 'c' (--mode)"),
                      ({"sizes": (2, 0)}, "sizes must be >= 1, got (2, 0) (--sizes)")]:
        with pytest.raises(ValueError) as e:
            Toy(**kw)
        assert str(e.value) == words
    Toy(ratio=1.0, share=0.0, count=1, mode="b", sizes=(1,))  # the bounds themselves


def test_generic_cli_defaults_bools_and_tuples():
    assert toy_parse([]) == Toy()
    assert toy_parse(["--on"]).on is True and toy_parse(["--on", "0"]).on is False
    assert toy_parse(["--sizes", "4,8"]).sizes == (4, 8)
    assert toy_parse(["--count", "7", "--ratio", "0.25"]) == Toy(count=7, ratio=0.25)
    with pytest.raises(ValueError, match=r"--count"):
        toy_parse(["--count", "0"])
    with pytest.raises(SystemExit):
        toy_parse(["--mode", "c"])  # argparse checks choices itself
    p = argparse.ArgumentParser()
    options.add_arguments(p, Toy)
    helps = {a.dest: a.help for a in p._actions}
    assert helps["ratio"] == "a share (default: 0.5; in (0, 1])" and helps["sizes"] == "sizes (default: 1,2; >= 1)"


def test_serving_cli_defaults_are_the_table_defaults(clean_env):
    p = argparse.ArgumentParser()
    A2ATSConfig.add_cli_args(p)
    cfg = A2ATSConfig.from_cli_namespace(p.parse_args([]))
    for f in fields(A2ATSConfig):
        assert getattr(cfg, f.name) == f.default, f.name
    assert {a.option_strings[0] for a in p._actions if a.dest.startswith("a2ats_")} == {
        A2ATSConfig.flag(f.name) for f in fields(A2ATSConfig)}
    assert A2ATSConfig().budget_policy == A2ATSConfig.from_env({}).budget_policy


@pytest.mark.parametrize("f,bad", bounded(A2ATSConfig), ids=lambda x: getattr(x, "name", str(x)))
def test_serving_cli_refuses_each_out_of_range_value_naming_the_flag(clean_env, capsys, f, bad):
    p = argparse.ArgumentParser()
    A2ATSConfig.add_cli_args(p)
    flag = A2ATSConfig.flag(f.name)
    if isinstance(bad, str):  # a choice: argparse refuses it, the environment path too
        with pytest.raises(SystemExit):
            p.parse_args([flag, bad])
        assert flag in capsys.readouterr().err
        with pytest.raises(ValueError, match=f"{ENV_PREFIX}{f.name.upper()}"):
            A2ATSConfig.from_env({ENV_PREFIX + f.name.upper(): bad})
        return
    with pytest.raises(ValueError) as e:
        A2ATSConfig.from_cli_namespace(p.parse_args([flag, str(bad)]))
    assert flag in str(e.value) and str(bad) in str(e.value)


def test_serving_budget_message_and_kernels():
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got 1.5 \(--a2ats-budget"):
        A2ATSConfig(budget=1.5)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\], got 1.5 \(--a2ats-top-p"):
        A2ATSConfig(top_p=1.5)
    with pytest.raises(ValueError, match="--a2ats-min-tokens"):
        A2ATSConfig(min_tokens=64, max_tokens=32)
    assert options.spec(next(f for f in fields(A2ATSConfig) if f.name == "kernel")).choices == ("auto", "torch", "cpp", "triton")
    assert A2ATSConfig(kernel="cpp").kernel == "cpp"


def test_environment_round_trip_and_flags_over_environment(clean_env, monkeypatch):
    cfg = A2ATSConfig(codebook="/x/cb.safetensors", budget=0.05, min_tokens=4, max_tokens=999, sinks=2, window=9,
                      dense_below=128, kernel="cpp", offload=True, host_kv_gb=1.5, worker_timeout=2.5)
    env = {}
    cfg.to_env(env)
    assert set(env) == {ENV_PREFIX + f.name.upper() for f in fields(A2ATSConfig)}
    assert A2ATSConfig.from_env(env) == cfg
    assert A2ATSConfig.from_env({ENV_PREFIX + "OFFLOAD": "False"}).offload is False
    with pytest.raises(ValueError, match="SGLANG_A2ATS_WINDOW='wide' is not a valid int"):
        A2ATSConfig.from_env({ENV_PREFIX + "WINDOW": "wide"})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    p = argparse.ArgumentParser()
    A2ATSConfig.add_cli_args(p)
    got = A2ATSConfig.from_cli_namespace(p.parse_args(["--a2ats-window", "17", "--a2ats-offload", "0"]))
    assert got.window == 17 and got.offload is False and got.budget == 0.05  # flag > env > default


def calib(argv):
    return settings_from_args(parser().parse_args(["--model-path", "m", *argv]))


def test_calibration_cli_defaults_are_the_table_defaults():
    assert calib([]) == (CollectSettings(), FitSettings())
    # calibration fits for the positions the backend will score: same sinks/window defaults
    assert (FitSettings().sinks, FitSettings().window) == (A2ATSConfig().sinks, A2ATSConfig().window)
    fit_flags = {a.option_strings[0] for a in parser()._actions}
    for flag in ("--model-path", "--out", "--text", "--tokens", "--doc-tokens", "--uuid-share", "--num-codes",
                 "--num-distances", "--distances", "--sinks", "--window", "--queries-per-head", "--max-iters", "--tol",
                 "--seed", "--no-compare-plain"):
        assert flag in fit_flags


def test_calibration_cli_values():
    col, fit = calib(["--text", "a.txt", "b.txt", "--tokens", "4096", "--seed", "3", "--num-codes", "64", "--tol", "0.01"])
    assert col == CollectSettings(text_files=(Path("a.txt"), Path("b.txt")), tokens=4096, seed=3)
    assert fit == FitSettings(num_codes=64, tol=0.01, seed=3)  # one --seed for both
    assert calib(["--num-distances", "1"])[1].distances == (2048,)
    assert calib(["--num-distances", "3"])[1].distances == wrope_distances(3)
    assert calib(["--distances", "8192,2048,2048"])[1].distances == (2048, 8192)
    assert calib(["--num-distances", "1", "--distances", "96,768"])[1].distances == (96, 768)  # --distances wins
    assert FitSettings(num_codes=MAX_CODES).num_codes == MAX_CODES


@pytest.mark.parametrize("cls,f,bad", [(c, f, b) for c in (CollectSettings, FitSettings) for f, b in bounded(c)],
                         ids=lambda x: getattr(x, "name", getattr(x, "__name__", str(x))))
def test_calibration_cli_refuses_each_out_of_range_value_naming_the_flag(cls, f, bad):
    flag = "--text" if f.name == "text_files" else options.cli_flag(f.name)
    with pytest.raises(SystemExit) as e:  # refused before the model is loaded
        main(["--model-path", "/nonexistent/model", flag, str(bad)])
    msg = str(e.value.code)
    assert msg.startswith("calibrate: error: ") and flag in msg and f"{f.name} must be" in msg and str(bad) in msg


def test_calibration_module_refuses_one_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "a2ats_sglang.calibration", "--model-path", str(tmp_path),
                        "--num-codes", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert f"num_codes must be in [2, {MAX_CODES}], got 1 (--num-codes)" in r.stderr
    assert not (tmp_path / "a2ats").exists()


def test_cpu_shares_split_the_machine_between_ranks():
    """The bind string the CPU platform gives SGLang for more ranks than NUMA nodes."""
    from a2ats_sglang.offload.cpus import cpu_shares, format_cpu_list

    def bind(cpus, ranks):
        return "|".join(map(format_cpu_list, cpu_shares(cpus, ranks)))

    assert bind([0, 1], 3) == "0|1|0"  # more ranks than cores: one each, round-robin
    assert bind([0, 1], 2) == "0|1"
    assert bind(list(range(8)), 3) == "0-2|3-5|6-7"  # the first ranks one more where they do not divide
    assert bind([4, 5, 6, 7], 1) == "4-7"
    assert bind([0, 2, 4, 6], 2) == "0,2|4,6"


def test_a_rank_finds_its_cpus_in_the_bind_string_or_an_even_share():
    """What a rank's CPU worker is pinned to: its entry of SGLang's bind string, else an
    even share of this process's CPUs; a bind string without the rank is refused."""
    import os

    from a2ats_sglang.offload.cpus import rank_cpus

    assert rank_cpus(1, 2, bind="0-3|4-5,7") == [4, 5, 7]
    assert rank_cpus(0, 3, bind="0|1|0") == [0]
    mine = sorted(os.sched_getaffinity(0))
    assert rank_cpus(0, 1, bind="all") == mine
    shares = [rank_cpus(i, 2, bind="all") for i in range(2)]
    assert sorted(sum(shares, [])) == mine or len(mine) < 2  # the two shares split this process's CPUs
    with pytest.raises(ValueError, match="names 2 ranks' CPUs, not rank 2's"):
        rank_cpus(2, 3, bind="0|1")
