"""Bad configurations stop with one line naming the flag, not a traceback."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("flags,named", [
    (["--hidden-size", "100", "--num-attention-heads", "3"], "--hidden-size"),
    (["--num-attention-heads", "12", "--tensor-model-parallel-size", "8"], "--num-attention-heads"),
    (["--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "250",
      "--tensor-model-parallel-size", "4"], "--ffn-hidden-size"),
    (["--activation-fn", "swish"], "--activation-fn"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout"),
    (["--num-layers", "0"], "--num-layers"),
])
def test_bad_model_config_names_the_flag(flags, named):
    out = subprocess.run([sys.executable, "tools/model_summary.py", *flags],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert named in out.stderr
    assert "Traceback" not in out.stderr
