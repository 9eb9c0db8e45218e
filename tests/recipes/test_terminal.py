"""What `python -m magi_train` prints: each log record once, a step progress bar, no Lightning tips."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Hydra's console format ("[time][logger][INFO] - message") and Lightning's own handler's ("INFO: message")
LOG_RECORD = re.compile(r"^(?:\[[^\]]*\]\[[\w.]+\]\[[A-Z]+\] - |[A-Z]+: )(?P<message>.+)$")


def test_smoke_run_terminal_output(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "magi_train",
            "recipe=pretrain_base",
            "experiment=smoke",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.checkpoint_every_n_steps=3",
            "data.synthetic.num_clips=8",
            "data.synthetic.samples_per_shard=8",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny model on a shared CPU
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    segments = [s.strip() for s in re.split(r"[\r\n]", text)]  # a progress bar redraws itself after "\r"

    # one line per record: the duplicate would come from a second handler, in another format or stream
    messages = Counter(m["message"] for s in segments if (m := LOG_RECORD.match(s)))
    assert not [m for m, n in messages.items() if n > 1], messages
    # the control: a known INFO line of Lightning's, exactly once (twice if its handler were still attached)
    assert text.count("Seed set to 0") == 1, text[-3000:]
    assert messages["`Trainer.fit` stopped: `max_steps=6` reached."] == 1, messages
    # Hydra's <job>.log still gets the records, Lightning's included
    (log_file,) = run_dir.glob("*.log")
    assert "Seed set to 0" in log_file.read_text()

    # a training bar over optimizer steps out of max_steps, not Lightning's "Epoch 0/-2"
    assert any(re.match(r"train 6/6 .*loss=", s) for s in segments), text[-3000:]
    assert "Epoch" not in text and "/-2" not in text
    assert any(s.startswith("val ") for s in segments)  # validation ran and drew its own bar
    # a log record written while the bar is up starts a line of its own instead of landing inside the bar
    assert not [s for s in segments if re.search(r"train \d+/\d+", s) and "[INFO]" in s]

    assert "Tip:" not in text and "💡" not in text  # Lightning's litlogger / litmodels advertisements
