import json
import subprocess
import sys


def run(*args, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    p = subprocess.run([sys.executable, "-m", "shrink.cli", *args], capture_output=True, text=True, env=env)
    return p.returncode, p.stdout


def test_info_lists_models_and_corpora(data_dir):
    code, out = run("info")
    info = json.loads(out)
    assert code == 0 and "smollm2-135m" in info["models"] and info["corpora"]["wikitext2/test"]["available"]
    assert info["corpora"]["c4/train"]["available"] is False


def test_ppl_on_a_tiny_model(data_dir):
    code, out = run("ppl", "--model", "tiny-llama", "--seqlen", "64", "--windows", "2")
    res = json.loads(out)
    assert code == 0 and res["n_windows"] == 2 and res["seqlen"] == 64 and res["ppl"] > 1


def test_bad_input_exits_2_with_the_fix():
    code, out = run("ppl", "--model", "no-such-model")
    assert code == 2 and "Registry names" in json.loads(out)["message"]
    code, out = run("run", "notebooks/none.md", "--scale", "huge")
    assert code == 2 and "tiny, cpu, paper" in json.loads(out)["message"]
