"""Interrupting a training script from the notebook: it stops cleanly, keeps its log and checkpoint, and resumes."""

import io
import json
import subprocess

import pytest
from stlib_testing import REPO, TINY_TRAINING

from stlib.train_scripts import plan_scripts, run_scripts, status_table


class InterruptOnFirstStep(io.StringIO):
    """A notebook cell's output that raises KeyboardInterrupt (the kernel's interrupt) at the first step line."""

    def write(self, text):
        super().write(text)
        if "[stlib] step " in text and not getattr(self, "fired", False):
            self.fired = True
            raise KeyboardInterrupt
        return len(text)


@pytest.mark.slow
def test_interrupt_stops_cleanly_and_running_again_resumes(tiny_study, tiny_base, tmp_path):
    runs = tmp_path / "runs"
    overrides = [f"data.toml_config_path={tiny_study / 'data' / 'wound_healing.toml'}", f"model.init_from={tiny_base}",
                 f"output_dir={runs}", "training.max_steps=400", "model.cell_set_len=8", *TINY_TRAINING,
                 "training.val_every_n_steps=100", "training.ckpt_every_n_steps=100"]
    specs = plan_scripts(["st_lora"], out_dir=tmp_path / "train_scripts", root=REPO, overrides=overrides,
                         log_dir=tmp_path / "logs")
    cell = InterruptOnFirstStep()
    with pytest.raises(KeyboardInterrupt):
        run_scripts(specs, root=REPO, stream=cell)
    run_dir = runs / "st_lora"
    pgrep = subprocess.run(["pgrep", "-f", str(specs[0].path)], check=False, capture_output=True)
    assert not pgrep.stdout  # no child left
    assert json.loads((run_dir / "run_summary.json").read_text())["status"] == "interrupted"
    assert status_table(specs, root=REPO)["status"].tolist() == ["interrupted"]
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "checkpoints" / "final.ckpt").exists()
    log = (tmp_path / "logs" / "st_lora_training.log").read_text()
    assert "[stlib] step " in log and "last.ckpt written" in log  # the log kept what ran, and the stop
    assert "interrupted; its checkpoints and log are kept" in cell.getvalue()

    table = run_scripts(specs, root=REPO, stream=io.StringIO())  # the cell run again
    assert table["status"].tolist() == ["completed"]
    log = (tmp_path / "logs" / "st_lora_training.log").read_text()
    assert "resuming from" in log and (run_dir / "checkpoints" / "final.ckpt").exists()
    assert log.index("last.ckpt written") < log.index("resuming from")  # appended: the first run's log is kept
